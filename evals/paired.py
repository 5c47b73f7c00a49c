"""Paired comparison of two eval runs on the same items (pure: numpy and scipy, no Django).

Pass/fail scores: exact McNemar (a two-sided binomial test on the discordant items) for "different at
all", and Tango's score interval for the difference in accuracy (`evals.noninferiority`: its width comes
from the fit under each hypothesised difference, so it does not collapse to [0, 0] when the two sides
agree on every item). Graded scores: the paired bootstrap-t interval of the mean difference (items
resampled with their two scores together), and Wilcoxon's signed-rank test for "different at all".
Everything is reported overall and per tag. Given a margin, the overall row also carries the
non-inferiority decision the eval gate uses (one-sided at alpha; see `evals.noninferiority`).

Every difference is candidate - baseline: positive means the candidate scores higher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from evals.noninferiority import (
    DiscordantCounts,
    NonInferiority,
    ScoreBounds,
    Verdict,
    binary_noninferiority,
    bootstrap_t_bounds,
    graded_noninferiority,
    min_score_items_needed,
    score_bounds,
    tango_bounds,
)

FORMAT = "ramp.eval-comparison/2"


@dataclass(frozen=True)
class PairedItem:
    """One item's score on each side (None: that side could not be scored)."""

    key: str
    baseline: float | None
    candidate: float | None
    baseline_passed: bool | None = None
    candidate_passed: bool | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class McNemar:
    both_pass: int
    baseline_only: int
    candidate_only: int
    both_fail: int

    @property
    def discordant(self) -> int:
        return self.baseline_only + self.candidate_only

    @property
    def p_value(self) -> float:
        """Exact two-sided McNemar p-value: Binomial(discordant, 1/2); 1 when nothing is discordant."""
        if self.discordant == 0:
            return 1.0
        return float(stats.binomtest(self.candidate_only, self.discordant, 0.5).pvalue)

    def as_dict(self) -> dict[str, Any]:
        return {
            "both_pass": self.both_pass,
            "baseline_only": self.baseline_only,
            "candidate_only": self.candidate_only,
            "both_fail": self.both_fail,
            "discordant": self.discordant,
            "p_value": self.p_value,
            "method": "exact",
        }


def mcnemar_counts(baseline: Sequence[bool], candidate: Sequence[bool]) -> McNemar:
    if len(baseline) != len(candidate):
        raise ValueError("baseline and candidate must have one verdict per item each")
    b = np.asarray(baseline, dtype=bool)
    c = np.asarray(candidate, dtype=bool)
    return McNemar(
        both_pass=int(np.sum(b & c)),
        baseline_only=int(np.sum(b & ~c)),
        candidate_only=int(np.sum(~b & c)),
        both_fail=int(np.sum(~b & ~c)),
    )


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")
    return float(alpha)


def _verdicts(scored: Sequence[PairedItem]) -> tuple[list[bool], list[bool]]:
    """Each side's pass/fail verdicts: the scorer's, else a score of exactly 1."""
    b_pass = [bool(i.baseline_passed) if i.baseline_passed is not None else i.baseline == 1.0 for i in scored]
    c_pass = [bool(i.candidate_passed) if i.candidate_passed is not None else i.candidate == 1.0 for i in scored]
    return b_pass, c_pass


def _scored(items: Iterable[PairedItem]) -> list[PairedItem]:
    return [i for i in items if i.baseline is not None and i.candidate is not None]


def _all_zero_or_one(scored: Sequence[PairedItem]) -> bool:
    return all(i.baseline in (0.0, 1.0) and i.candidate in (0.0, 1.0) for i in scored)


def noninferiority(
    items: Iterable[PairedItem], *, binary: bool, margin: float, alpha: float, resamples: int = 2000, seed: int = 0
) -> NonInferiority:
    """Is the candidate at most `margin` worse than the baseline on these items (one-sided at alpha)?

    Pass/fail items, and graded scores that only ever took the values 0 and 1 (a pass/fail table in all
    but name, where the bootstrap is least accurate), go to Tango's score test with the exact
    unconditional check; other graded scores to the bootstrap-t bound."""
    scored = _scored(items)
    if not scored:
        raise ValueError("no item was scored on both sides")
    if binary or _all_zero_or_one(scored):
        b_pass, c_pass = _verdicts(scored) if binary else (
            [i.baseline == 1.0 for i in scored], [i.candidate == 1.0 for i in scored])
        counts = mcnemar_counts(b_pass, c_pass)
        table = DiscordantCounts(n=len(scored), candidate_only=counts.candidate_only, baseline_only=counts.baseline_only)
        return binary_noninferiority(table, margin=margin, alpha=alpha)
    diffs = np.array([float(i.candidate) - float(i.baseline) for i in scored])  # type: ignore[arg-type]
    return graded_noninferiority(diffs, margin=margin, alpha=alpha, resamples=resamples, seed=seed)


def candidate_score_bounds(items: Iterable[PairedItem], *, binary: bool, alpha: float, resamples: int = 2000,
                           seed: int = 0) -> ScoreBounds:  # fmt: skip
    """The candidate's mean score on the items scored on both sides, with one-sided bounds at alpha
    (`evals.noninferiority.score_bounds`): what the gate's `min_score` decides on. Pass/fail items count the
    candidate's verdicts, as the paired test does; graded scores that only took 0 and 1 count as pass/fail."""
    scored = _scored(list(items))
    if not scored:
        raise ValueError("no item was scored on both sides")
    if binary:
        values = [1.0 if passed else 0.0 for passed in _verdicts(scored)[1]]
        return score_bounds(values, binary=True, alpha=alpha)
    values = [float(i.candidate) for i in scored]  # type: ignore[arg-type]
    return score_bounds(values, binary=_all_zero_or_one(scored), alpha=alpha, resamples=resamples, seed=seed)


def wilcoxon_p_value(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    diffs = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    if not np.any(diffs != 0):
        return 1.0
    p = float(stats.wilcoxon(diffs, zero_method="wilcox").pvalue)
    return p if math.isfinite(p) else 1.0


def _row(items: Sequence[PairedItem], *, binary: bool, alpha: float, resamples: int, seed: int) -> dict[str, Any]:
    scored = _scored(items)
    row: dict[str, Any] = {"n": len(scored), "missing": len(items) - len(scored)}
    if not scored:
        row.update(baseline_mean=None, candidate_mean=None, difference=None, ci_low=None, ci_high=None)
        return row
    b = [float(i.baseline) for i in scored if i.baseline is not None]
    c = [float(i.candidate) for i in scored if i.candidate is not None]
    row["baseline_mean"] = float(np.mean(b))
    row["candidate_mean"] = float(np.mean(c))
    has_verdicts = all(i.baseline_passed is not None and i.candidate_passed is not None for i in scored)
    counts = None
    if binary or has_verdicts:
        counts = mcnemar_counts(*_verdicts(scored))
        row["mcnemar"] = counts.as_dict()
    # Two-sided (1 - alpha): each end is a one-sided bound at alpha / 2.
    if binary and counts is not None:
        table = DiscordantCounts(n=len(scored), candidate_only=counts.candidate_only, baseline_only=counts.baseline_only)
        difference = table.difference
        low, high = tango_bounds(table, alpha=alpha / 2.0)
        row["interval_method"] = "tango-score"
    else:
        diffs = np.subtract(c, b)
        difference = float(diffs.mean())
        low, high = bootstrap_t_bounds(diffs, alpha=alpha / 2.0, resamples=resamples, seed=seed)
        row["interval_method"] = "bootstrap-t"
        row["bootstrap"] = {"resamples": resamples, "seed": seed}
        row["wilcoxon_p_value"] = wilcoxon_p_value(b, c)
    row.update(difference=difference, ci_low=min(low, difference), ci_high=max(high, difference))
    return row


def compare_paired(
    items: Iterable[PairedItem], *, binary: bool, alpha: float = 0.05, resamples: int = 2000, seed: int = 0,
    margin: float | None = None,
) -> dict[str, Any]:
    """The comparison as a JSON-serialisable dict: {"format", "kind", "alpha", "confidence", "overall", "per_tag"}.

    A row is {"n", "missing", "baseline_mean", "candidate_mean", "difference", "ci_low", "ci_high" (the
    two-sided 1 - alpha interval), "interval_method" ("tango-score" or "bootstrap-t"), "mcnemar"?:
    {both_pass, baseline_only, candidate_only, both_fail, discordant, p_value, method}, "bootstrap"?:
    {resamples, seed}, "wilcoxon_p_value"?}; per_tag is a list of rows with a "tag", sorted by tag. With a
    `margin`, the overall row also has "noninferiority" (`NonInferiority.as_dict()`, one-sided at alpha)."""
    alpha = _check_alpha(alpha)
    items = list(items)
    options = {"binary": binary, "alpha": alpha, "resamples": resamples, "seed": seed}
    tags = sorted({tag for item in items for tag in item.tags})
    per_tag = []
    for tag in tags:
        row = _row([i for i in items if tag in i.tags], **options)  # type: ignore[arg-type]
        per_tag.append({"tag": tag, **row})
    overall = _row(items, **options)  # type: ignore[arg-type]
    if overall["n"]:
        overall["candidate_bounds"] = candidate_score_bounds(
            items, binary=binary, alpha=alpha, resamples=resamples, seed=seed
        ).as_dict()
    if margin is not None and overall["n"]:
        overall["noninferiority"] = noninferiority(
            items, binary=binary, margin=margin, alpha=alpha, resamples=resamples, seed=seed
        ).as_dict()
    return {
        "format": FORMAT,
        "kind": "pass_fail" if binary else "graded",
        "alpha": alpha,
        "confidence": 1.0 - alpha,
        "overall": overall,
        "per_tag": per_tag,
    }


@dataclass(frozen=True)
class GateDecision:
    """verdict: "pass", "fail", "undecided" (the suite cannot tell at this margin), or None (nothing to
    decide on: no paired item)."""

    verdict: str | None
    reason: str
    detail: dict[str, Any]

    @property
    def passed(self) -> bool | None:
        return None if self.verdict is None else self.verdict == Verdict.PASS.value


def gate_decide(overall: dict[str, Any], *, max_drop: float | None, min_score: float | None,
                alpha: float) -> GateDecision:
    """Non-inferiority with a margin, and/or an absolute minimum, from a comparison's overall row.

    The margin: the row's "noninferiority" (compare_paired with margin=max_drop at this alpha) decides:
    pass when the one-sided (1 - alpha) lower bound of candidate - baseline is above -max_drop (for
    pass/fail items the exact unconditional test must agree), fail when the upper bound is below it,
    otherwise undecided, with the number of items a suite would need. A fixed suite brings no more data,
    so an undecided gate does not pass. The minimum: pass when the one-sided (1 - alpha) lower bound of the
    candidate's mean score (Clopper-Pearson for pass/fail items, bootstrap-t for graded) is at least
    `min_score`, fail when its upper bound is below it, otherwise undecided. With both, the gate passes only
    when both pass (an intersection-union test: a candidate bad on either is passed at most alpha of the
    time) and fails when either fails."""
    detail: dict[str, Any] = {
        "max_drop": max_drop, "min_score": min_score, "alpha": alpha,
        "rule": "pass when the one-sided (1 - alpha) lower bound of candidate - baseline is above -max_drop "
                "and the lower bound of the candidate's mean score is at least min_score; fail when an upper "
                "bound is below its threshold; otherwise undecided",
    }  # fmt: skip
    if not overall.get("n"):
        return GateDecision(None, "no item was scored on both runs", {**detail, "decision": None})
    candidate_score = float(overall["candidate_mean"])
    detail.update(n=overall["n"], candidate_score=candidate_score, baseline_score=float(overall["baseline_mean"]),
                  difference=float(overall["difference"]))
    reasons = []
    verdict = Verdict.PASS
    if max_drop is not None:
        test = overall.get("noninferiority")
        if test is None or test["margin"] != max_drop or test["alpha"] != alpha:
            raise ValueError("the overall row has no non-inferiority test at this margin and alpha")
        verdict = Verdict(test["decision"])
        # drop = baseline - candidate: the names the pages and CI scripts have read since the first gates.
        detail.update(
            decision=test["decision"], method=test["method"], low=test["low"], high=test["high"],
            items_needed=test["items_needed"], drop=-test["estimate"], drop_low=-test["high"],
            drop_upper_bound=-test["low"], noninferiority=test,
        )  # fmt: skip
        reasons.append(test["reason"])
    if min_score is not None:
        bounds = overall.get("candidate_bounds")
        if bounds is None or bounds["alpha"] != alpha:
            raise ValueError("the overall row has no bounds of the candidate's mean score at this alpha")
        low, high = float(bounds["low"]), float(bounds["high"])
        detail.update(min_score_test={**bounds, "minimum": min_score})
        shown = f"mean score {candidate_score:.3f} (one-sided {1 - alpha:.3g} bounds {low:.3f} to {high:.3f}, {bounds['method']})"
        if high < min_score:
            verdict = Verdict.FAIL
            reasons.append(f"{shown} is below the minimum {min_score:g}")
        elif low >= min_score:
            reasons.append(f"{shown} reaches the minimum {min_score:g}")
        else:
            if verdict is Verdict.PASS:
                verdict = Verdict.UNDECIDED
            needed = min_score_items_needed(mean=candidate_score, sd=float(bounds.get("sd") or 0.0), minimum=min_score,
                                            alpha=alpha, binary=bounds["method"] == "clopper-pearson")  # fmt: skip
            detail["min_score_test"]["items_needed"] = needed
            more = f"; about {needed} items would show it" if needed is not None else ""
            reasons.append(f"{shown} cannot show the minimum {min_score:g} on {overall['n']} items{more}")
    detail["decision"] = verdict.value
    mcnemar = overall.get("mcnemar")
    if mcnemar is not None:
        reasons.append(
            f"McNemar exact p = {mcnemar['p_value']:.3g} (right only for the baseline on {mcnemar['baseline_only']} "
            f"items, only for the candidate on {mcnemar['candidate_only']}, of {overall['n']})"
        )
    elif overall.get("wilcoxon_p_value") is not None:
        reasons.append(f"Wilcoxon signed-rank p = {overall['wilcoxon_p_value']:.3g} on {overall['n']} items")
    lead = {Verdict.PASS: "candidate passed", Verdict.FAIL: "candidate failed", Verdict.UNDECIDED: "undecided"}[verdict]
    return GateDecision(verdict.value, f"{lead}: " + "; ".join(reasons), detail)
