"""Paired comparison of two eval runs on the same items (pure: numpy and scipy, no Django).

Pass/fail scores: exact McNemar (a two-sided binomial test on the discordant items) for "different at
all", and an exact interval for the difference in accuracy, conditional on the number of discordant items
d: with c items right only for the candidate, c ~ Binomial(d, pi) and the difference is d (2 pi - 1) / n,
so the Clopper-Pearson interval of pi maps onto an interval of the difference. Graded scores: a seeded
paired bootstrap (resampling items, keeping each item's two scores together) for the mean difference, and
Wilcoxon's signed-rank test for "different at all". Everything is reported overall and per tag.

Every difference is candidate - baseline: positive means the candidate scores higher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

FORMAT = "ramp.eval-comparison/1"
BOOTSTRAP_CHUNK = 256


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


def accuracy_difference_interval(counts: McNemar, *, alpha: float) -> tuple[float, float, float]:
    """(difference, low, high) of candidate - baseline accuracy at confidence 1 - alpha, exact given d."""
    alpha = _check_alpha(alpha)
    n = counts.both_pass + counts.both_fail + counts.discordant
    if n == 0:
        raise ValueError("no paired items")
    d = counts.discordant
    difference = (counts.candidate_only - counts.baseline_only) / n
    if d == 0:
        return difference, 0.0, 0.0
    pi = stats.binomtest(counts.candidate_only, d, 0.5).proportion_ci(confidence_level=1.0 - alpha, method="exact")
    return difference, d * (2.0 * pi.low - 1.0) / n, d * (2.0 * pi.high - 1.0) / n


def paired_bootstrap_interval(
    baseline: Sequence[float], candidate: Sequence[float], *, alpha: float, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean difference, low, high): percentile interval of candidate - baseline over item resamples."""
    alpha = _check_alpha(alpha)
    if resamples < 100:
        raise ValueError("resamples must be at least 100")
    diffs = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    if diffs.ndim != 1 or diffs.size == 0:
        raise ValueError("baseline and candidate must be equally long, non-empty sequences")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # In chunks: resamples x n indices at once is too much memory for a 10 000-item suite.
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        stop = min(resamples, start + BOOTSTRAP_CHUNK)
        idx = rng.integers(0, diffs.size, size=(stop - start, diffs.size))
        means[start:stop] = diffs[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(diffs.mean()), float(low), float(high)


def wilcoxon_p_value(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    diffs = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    if not np.any(diffs != 0):
        return 1.0
    p = float(stats.wilcoxon(diffs, zero_method="wilcox").pvalue)
    return p if math.isfinite(p) else 1.0


def _row(items: Sequence[PairedItem], *, binary: bool, alpha: float, resamples: int, seed: int) -> dict[str, Any]:
    scored = [i for i in items if i.baseline is not None and i.candidate is not None]
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
        b_pass = [bool(i.baseline_passed) if i.baseline_passed is not None else i.baseline == 1.0 for i in scored]
        c_pass = [bool(i.candidate_passed) if i.candidate_passed is not None else i.candidate == 1.0 for i in scored]
        counts = mcnemar_counts(b_pass, c_pass)
        row["mcnemar"] = counts.as_dict()
    if binary and counts is not None:
        difference, low, high = accuracy_difference_interval(counts, alpha=alpha)
        row["interval_method"] = "exact-conditional"
    else:
        difference, low, high = paired_bootstrap_interval(b, c, alpha=alpha, resamples=resamples, seed=seed)
        row["interval_method"] = "paired-bootstrap"
        row["bootstrap"] = {"resamples": resamples, "seed": seed}
        row["wilcoxon_p_value"] = wilcoxon_p_value(b, c)
    row.update(difference=difference, ci_low=low, ci_high=high)
    return row


def compare_paired(
    items: Iterable[PairedItem], *, binary: bool, alpha: float = 0.05, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The comparison as a JSON-serialisable dict: {"format", "kind", "alpha", "confidence", "overall", "per_tag"}.

    A row is {"n", "missing", "baseline_mean", "candidate_mean", "difference", "ci_low", "ci_high",
    "interval_method", "mcnemar"?: {both_pass, baseline_only, candidate_only, both_fail, discordant,
    p_value, method}, "bootstrap"?: {resamples, seed}, "wilcoxon_p_value"?}; per_tag is a list of rows
    with a "tag", sorted by tag."""
    alpha = _check_alpha(alpha)
    items = list(items)
    options = {"binary": binary, "alpha": alpha, "resamples": resamples, "seed": seed}
    tags = sorted({tag for item in items for tag in item.tags})
    per_tag = []
    for tag in tags:
        row = _row([i for i in items if tag in i.tags], **options)  # type: ignore[arg-type]
        per_tag.append({"tag": tag, **row})
    return {
        "format": FORMAT,
        "kind": "pass_fail" if binary else "graded",
        "alpha": alpha,
        "confidence": 1.0 - alpha,
        "overall": _row(items, **options),  # type: ignore[arg-type]
        "per_tag": per_tag,
    }


@dataclass(frozen=True)
class GateDecision:
    passed: bool | None  # None: nothing to decide on (no paired item)
    reason: str
    detail: dict[str, Any]


def gate_decide(overall: dict[str, Any], *, max_drop: float | None, min_score: float | None,
                alpha: float) -> GateDecision:
    """Non-inferiority with a margin, and/or an absolute minimum, from a comparison's overall row.

    Pass the margin only when non-inferiority is shown: the upper end of the (1 - alpha) interval of
    baseline - candidate is at most max_drop (the lower end of candidate - baseline at least -max_drop).
    A fixed suite gives no more data to wait for, so "not shown" is a failure, not a wait. The minimum is
    on the candidate's mean score."""
    confidence = f"{100 * (1 - alpha):g}%"
    detail: dict[str, Any] = {
        "max_drop": max_drop, "min_score": min_score,
        "rule": "pass when the upper end of the two-sided (1 - alpha) interval of baseline - candidate is "
                "at most max_drop, and the candidate's mean is at least min_score",
    }
    if not overall.get("n"):
        return GateDecision(None, "no item was scored on both runs", detail)
    drop = -float(overall["difference"])
    drop_upper = -float(overall["ci_low"])
    drop_lower = -float(overall["ci_high"])
    candidate_score = float(overall["candidate_mean"])
    detail.update(drop=drop, drop_low=drop_lower, drop_upper_bound=drop_upper, candidate_score=candidate_score,
                  baseline_score=float(overall["baseline_mean"]))
    reasons = []
    passed = True
    mcnemar = overall.get("mcnemar")
    if max_drop is not None:
        interval = f"{confidence} interval of baseline - candidate: {drop_lower:.3f} to {drop_upper:.3f}"
        if drop_upper <= max_drop:
            reasons.append(f"not worse than the baseline by more than {max_drop:g} ({interval})")
        else:
            passed = False
            reasons.append(f"may be worse than the baseline by more than {max_drop:g} ({interval})")
    if min_score is not None:
        if candidate_score >= min_score:
            reasons.append(f"mean score {candidate_score:.3f} reaches the minimum {min_score:g}")
        else:
            passed = False
            reasons.append(f"mean score {candidate_score:.3f} is below the minimum {min_score:g}")
    if mcnemar is not None:
        reasons.append(
            f"McNemar exact p = {mcnemar['p_value']:.3g} (right only for the baseline on {mcnemar['baseline_only']} "
            f"items, only for the candidate on {mcnemar['candidate_only']}, of {overall['n']})"
        )
    elif overall.get("wilcoxon_p_value") is not None:
        reasons.append(f"Wilcoxon signed-rank p = {overall['wilcoxon_p_value']:.3g} on {overall['n']} items")
    verdict = "candidate passed" if passed else "candidate failed"
    return GateDecision(passed, f"{verdict}: " + "; ".join(reasons), detail)
