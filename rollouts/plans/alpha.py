"""One alpha, split once: the plan's alpha over every check that can stop or pass the rollout.

Each SLO, each guardrail, the shadow quality check, the eval gate and an A/B's primary metric gets an equal
share (Bonferroni). Each decides on an always-valid bound at its share, and evidence is carried across the
rollout's steps in one sequence per check (rollouts.analysis.checks), so the chance that any check is ever
wrong, at any look of any step, is at most the plan's alpha. The rollout page, the API and `rolloutctl
status` show this split.

A plan that bakes with a holdout (`bake_s` > 0, `holdout` > 0) has one more check per guardrail, "<guardrail>
(bake alone)": the guardrail on the bake's evidence alone (the candidate against the holdout since the bake
began), which only a breach of acts on (a regression that appears only at full load would otherwise be
diluted by the steps' good evidence in the pooled sequence). It is a sequence of its own, so it takes an
equal share like every other check: k checks and g guardrails split alpha over k + g, and the union bound
over all of them still keeps the chance that any is ever wrong at most alpha. The price is paid by every
check: each share is alpha / (k + g) instead of alpha / k.

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
    """The plan's alpha and the checks it is split over, equally."""

    alpha: float
    checks: tuple[str, ...]
    rule: str = ALPHA_RULE

    @property
    def share(self) -> float:
        return self.alpha / max(1, len(self.checks))

    @property
    def text(self) -> str:
        k = len(self.checks)
        if k <= 1:
            return f"alpha {self.alpha:g} for the rollout's one check"
        return f"alpha {self.alpha:g} split equally over {k} checks (Bonferroni): {self.share:.3g} each"

    def as_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha, "rule": self.rule, "checks": list(self.checks), "share": float(f"{self.share:.6g}"),
            "text": self.text,
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
    if bakes_alone(plan):
        names += [bake_alone_name(g.label) for g in plan.guardrails]
    if plan.shadow_quality is not None:
        names.append("shadow quality")
    if plan.eval_gate:
        names.append("eval gate")
    if plan.strategy == "ab" and plan.primary_metric is not None:
        names.append(f"primary: {plan.primary_metric.metric}")
    return AlphaSplit(plan.alpha, tuple(names))


def check_alpha_share(plan: Plan) -> float:
    """The alpha of each of the rollout's checks (the eval gate and shadow quality take theirs from here)."""
    return alpha_split(plan).share
