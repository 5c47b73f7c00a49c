"""One alpha, split once: the plan's alpha over every check that can stop or pass the rollout.

Each SLO, each guardrail, the shadow quality check, the eval gate and an A/B's primary metric gets an equal
share (Bonferroni). Each decides on an always-valid bound at its share, and evidence is carried across the
rollout's steps in one sequence per check (rollouts.analysis.checks), so the chance that any check is ever
wrong, at any look of any step, is at most the plan's alpha. The rollout page, the API and `rolloutctl
status` show this split.

A plan that bakes with a holdout (`bake_s` > 0, `holdout` > 0) has one more check per guardrail, "<guardrail>
(bake alone)": the guardrail on the bake's evidence alone (the candidate against the holdout since the bake
began), which only a breach of acts on (a regression that appears only at full load would otherwise be
diluted by the steps' good evidence in the pooled sequence). It takes no share of its own. A guardrail's
check is two one-sided always-valid sequences, each valid at its own level: its lower bound calls a breach,
its upper bound calls the candidate safe. The bake-alone check acts only on its breach, so it can only be
wrong by a false breach, and half of the guardrail's breach side suffices for it: the pooled check's lower
bound runs at share / 2 and the bake-alone check's at share / 2, while the pooled check's upper bound (the
pass side, the one the step floors and planned samples are about) keeps the whole share. For each
guardrail, a candidate within its margin is then falsely breached by either check with chance at most
share / 2 + share / 2 = share, and one beyond it falsely passed with chance at most share, as before; so the
split is alpha / k over the k checks, with no share for the bake-alone checks, and floors and planned
samples are what they were without them. (The one truth where both kinds of call can be wrong, a candidate
beyond its margin in the steps' pooled evidence but within it in the bake, adds at most share / 2 for a
bake-alone breach that rolls back a candidate the steps showed harmful.) The price is on the breach side:
its multiplier is about a quarter of a standard error larger (3.18 -> 3.41 at 0.0167 and N = N*), so a
breach is called a little later. Without a bake-alone check (no bake, no holdout, no guardrail) nothing is
halved.

Why not Holm: Holm's level for a check depends on where the other checks' p-values rank at that look, so
a check's interval would change level from look to look, the page could not show one interval as "the one
the decision used", and a check computed elsewhere (the eval gate, before any traffic) could not be told
its level in advance. With the few checks a rollout has, Bonferroni costs little (a tenth of a standard
error per check at three checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rollouts.plans.model import Plan

ALPHA_RULE = "bonferroni"


@dataclass(frozen=True)
class AlphaSplit:
    """The plan's alpha and the checks it is split over, equally; `bake_alone`: the guardrails' checks on the
    bake alone, each of which takes half of its guardrail's breach side (none when the plan does not bake
    alone)."""

    alpha: float
    checks: tuple[str, ...]
    rule: str = ALPHA_RULE
    bake_alone: tuple[str, ...] = ()

    @property
    def share(self) -> float:
        return self.alpha / max(1, len(self.checks))

    @property
    def breach_share(self) -> float:
        """The alpha of a guardrail's breach side (its lower bound) in its pooled check, and in its check on
        the bake alone: half the share when the plan bakes alone, else the whole share."""
        return self.share / 2.0 if self.bake_alone else self.share

    @property
    def text(self) -> str:
        k = len(self.checks)
        if k <= 1:
            text = f"alpha {self.alpha:g} for the rollout's one check"
        else:
            text = f"alpha {self.alpha:g} split equally over {k} checks (Bonferroni): {self.share:.3g} each"
        if self.bake_alone:
            text += (
                f"; each guardrail's breach side is split in half between its pooled check and its check on the "
                f"bake alone ({self.breach_share:.3g} each), its pass side keeps {self.share:.3g}"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha, "rule": self.rule, "checks": list(self.checks), "share": float(f"{self.share:.6g}"),
            "bake_alone": list(self.bake_alone), "breach_share": float(f"{self.breach_share:.6g}"), "text": self.text,
        }  # fmt: skip


BAKE_ALONE = " (bake alone)"


def bake_alone_name(label: str) -> str:
    """The name of a guardrail's check on the bake's evidence alone."""
    return f"{label}{BAKE_ALONE}"


def bakes_alone(plan: Plan) -> bool:
    """Whether the plan's guardrails are also checked on the bake's evidence alone: it bakes with a holdout
    to compare with (without one only the SLOs compare in the bake)."""
    return plan.bakes and plan.holdout > 0 and bool(plan.guardrails)


def alpha_split(plan: Plan) -> AlphaSplit:
    """Every check that can stop or pass the rollout, and the alpha each gets."""
    names = [slo.label for slo in plan.slos] + [g.label for g in plan.guardrails]
    if plan.shadow_quality is not None:
        names.append("shadow quality")
    if plan.eval_gate:
        names.append("eval gate")
    if plan.strategy == "ab" and plan.primary_metric is not None:
        names.append(f"primary: {plan.primary_metric.metric}")
    # The bake-alone checks take no share: half of their guardrail's breach side (module docstring).
    alone = tuple(bake_alone_name(g.label) for g in plan.guardrails) if bakes_alone(plan) else ()
    return AlphaSplit(plan.alpha, tuple(names), bake_alone=alone)


def check_alpha_share(plan: Plan) -> float:
    """The alpha of each of the rollout's checks (the eval gate and shadow quality take theirs from here)."""
    return alpha_split(plan).share


def guardrail_breach_share(plan: Plan) -> float:
    """The alpha of each guardrail's breach side, in its pooled check and in its check on the bake alone: half
    of its share when the plan bakes alone (the bake-alone check has the other half), else its whole share."""
    return alpha_split(plan).breach_share
