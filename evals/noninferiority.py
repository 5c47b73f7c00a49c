"""Non-inferiority of a candidate against a baseline on the same items (pure: numpy and scipy, no Django).

The question an eval gate asks is one-sided: "is the candidate at most `margin` worse than the baseline?"
H0: delta <= -margin against H1: delta > -margin, delta = mean(candidate) - mean(baseline). Passing means
rejecting H0 at `alpha`; a candidate exactly `margin` worse must pass at most `alpha` of the time, however
few items the two sides disagree on.

Pass/fail items. Tango's score statistic for the paired difference of proportions (T. Tango, "Equivalence
test and confidence interval for the difference in proportions for the paired-sample design", Statistics in
Medicine 17:891-908, 1998): with c items right only for the candidate, b only for the baseline, n items,

    Z(d0) = (c - b - n d0) / sqrt(n (2 q + d0 (1 - d0)))

where q is the maximum-likelihood estimate of P(right only for the baseline) restricted to delta = d0,
the positive root of 2n q^2 + B q + C = 0 with B = -c - b + (2n - c + b) d0 and C = -b d0 (1 - d0). The
variance comes from the restricted fit, not from the observed discordant count, so a suite with no
disagreement at all still gets an interval of honest width (the old interval, conditional on the number
of discordant items, was [0, 0] there, and passed a candidate worse by the margin 65 % of the time on
200 items where it only ever lost items). Its bounds are the d0 where Z(d0) = +-z_alpha.

The asymptotic score test runs slightly over alpha in places (0.051 at 50 items with 5 % / 3 % of
items going each way, computed exactly over every outcome), so a pass also needs the exact unconditional
test with Z as its ordering (as in Chan, Tang, Tang, Tang and Chan, Biometrical Journal 45:684-698,
2003): the p-value is the largest probability, over the nuisance P(right only for the candidate) on the
boundary delta = -margin, of a Z at least as large as the one observed. Its size is at most alpha by
construction; at 1,000 items it costs almost no power.

Graded scores in [0, 1]. The studentised (bootstrap-t) interval of the mean paired difference, items
resampled with their two scores together (Efron and Tibshirani, An Introduction to the Bootstrap, 1993,
chapter 12.5): skewed and lumpy differences (most items the same, a few much worse) get a longer lower
side than a percentile interval would give them; neither side is ever shorter than Student's t. A
sample whose differences are all equal has no spread to resample; then the bound is the exact one for
differences in [-1, 1] (below). This is second-order accurate, not exact: at the margin, on judge-rubric
scores, it passed 5.7 %, 5.6 % and 4.6 % of 1,000 simulated suites of 50, 200 and 1,000 items (Monte
Carlo s.e. 0.7 %; tests/evals/test_noninferiority.py), where Student's t alone passes 5.3 % and 5.1 %
of 50- and 200-item suites (400,000 simulated).

Every bound here is one-sided at alpha: (low, high) together form a (1 - 2 alpha) interval, and only one
of "pass" (low above -margin) and "fail" (high below -margin) can be wrong for a given truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import optimize, stats

DEFAULT_POWER = 0.8
# The nuisance is searched on a grid, then around its best point; the tail is smooth in it.
NUISANCE_GRID = 100
NUISANCE_REFINE = 21
BOOTSTRAP_CHUNK = 256
MAX_ITEMS_NEEDED = 10**9


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    UNDECIDED = "undecided"


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be a one-sided level between 0 and 0.5, got {alpha!r}")
    return float(alpha)


def check_margin(margin: float) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be at least 0 and below 1, got {margin!r}")
    return float(margin)


@dataclass(frozen=True)
class DiscordantCounts:
    """A paired pass/fail table reduced to what the difference depends on."""

    n: int
    candidate_only: int
    baseline_only: int

    def __post_init__(self) -> None:
        for name in ("n", "candidate_only", "baseline_only"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.n == 0:
            raise ValueError("n must be at least 1")
        if self.candidate_only + self.baseline_only > self.n:
            raise ValueError("candidate_only + baseline_only cannot exceed n")

    @property
    def difference(self) -> float:
        return (self.candidate_only - self.baseline_only) / self.n

    @property
    def discordance(self) -> float:
        return (self.candidate_only + self.baseline_only) / self.n


def tango_z(candidate_only: Any, baseline_only: Any, n: int, delta0: float) -> np.ndarray:
    """Tango's score statistic for H0: delta = delta0, elementwise over arrays of counts."""
    c = np.asarray(candidate_only, dtype=float)
    b = np.asarray(baseline_only, dtype=float)
    big_b = -c - b + (2.0 * n - c + b) * delta0
    big_c = -b * delta0 * (1.0 - delta0)
    q = (np.sqrt(np.maximum(big_b * big_b - 8.0 * n * big_c, 0.0)) - big_b) / (4.0 * n)
    variance = n * (2.0 * q + delta0 * (1.0 - delta0))
    numerator = c - b - n * delta0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = numerator / np.sqrt(np.maximum(variance, 0.0))
    # At the estimate itself the numerator is 0 (and, with no discordant item, so is the variance).
    return np.where(numerator == 0, 0.0, z)


def tango_bounds(counts: DiscordantCounts, *, alpha: float) -> tuple[float, float]:
    """(low, high): one-sided (1 - alpha) bounds of delta, each where Z(d0) = +-z_alpha."""
    alpha = check_alpha(alpha)
    z = float(stats.norm.isf(alpha))
    n, c, b = counts.n, counts.candidate_only, counts.baseline_only
    estimate = counts.difference
    eps = 1e-12

    def z_at(d0: float) -> float:
        return float(tango_z(c, b, n, d0))

    # Z falls as d0 rises; the bounds lie on either side of the estimate.
    low = (
        -1.0
        if estimate <= -1.0 + eps or z_at(-1.0 + eps) < z
        else float(optimize.brentq(lambda d0: z_at(d0) - z, -1.0 + eps, estimate, xtol=1e-10))
    )
    high = (
        1.0
        if estimate >= 1.0 - eps or z_at(1.0 - eps) > -z
        else float(optimize.brentq(lambda d0: z_at(d0) + z, estimate, 1.0 - eps, xtol=1e-10))
    )
    return low, high


def _rejection_thresholds(n: int, margin: float, z_obs: float) -> np.ndarray:
    """Per number of discordant items d = 0..n: the fewest candidate-only items with Z(-margin) >= z_obs
    (d + 1 where none does). Z rises with the candidate-only count at fixed d, so each row's rejection
    region is an upper tail; this is checked in the tests, not assumed silently."""
    d = np.arange(n + 1)
    lo = np.zeros(n + 1, dtype=np.int64)
    hi = d + 1
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        k = np.minimum(mid, d)
        ok = (mid <= d) & (tango_z(k, d - k, n, -margin) >= z_obs)
        hi = np.where((lo < hi) & ok, mid, hi)
        lo = np.where((lo < hi) & ~ok, mid + 1, lo)
    return hi


def _boundary_tails(n: int, margin: float, thresholds: np.ndarray, p_candidate: np.ndarray) -> np.ndarray:
    """P(Z >= z_obs) on the boundary delta = -margin, for each nuisance P(right only for the candidate).

    Sums over the number of discordant items d only where Binomial(n, psi) puts any mass (psi -+ 12 sd):
    the rest adds less than 1e-30 and would make a 10,000-item suite cost seconds per look."""
    p_c = np.asarray(p_candidate, dtype=float)
    psi = np.minimum(2.0 * p_c + margin, 1.0)
    spread = 12.0 * np.sqrt(n * psi * (1.0 - psi)) + 12.0
    first = np.clip(np.floor(n * psi - spread), 0, n).astype(np.int64)
    width = int(np.max(np.clip(np.ceil(n * psi + spread), 0, n) - first)) + 1
    d = first[:, None] + np.arange(width)[None, :]
    inside = d <= n
    d = np.minimum(d, n)
    share = np.divide(p_c, psi, out=np.zeros_like(p_c), where=psi > 0)[:, None]
    weights = np.where(inside, stats.binom.pmf(d, n, psi[:, None]), 0.0)
    upper = stats.binom.sf(thresholds[d] - 1, d, share)
    return np.asarray(np.sum(weights * upper, axis=1))


def exact_noninferiority_p_value(counts: DiscordantCounts, *, margin: float) -> float:
    """The exact unconditional p-value of H0: delta <= -margin, ordered by Tango's Z (supremum over the
    nuisance on the boundary)."""
    margin = check_margin(margin)
    z_obs = float(tango_z(counts.candidate_only, counts.baseline_only, counts.n, -margin))
    return _exact_p(counts.n, margin, z_obs)


def _exact_p(n: int, margin: float, z_obs: float) -> float:
    thresholds = _rejection_thresholds(n, margin, z_obs)
    top = (1.0 - margin) / 2.0
    grid = np.linspace(0.0, top, NUISANCE_GRID)
    tails = _boundary_tails(n, margin, thresholds, grid)
    best = int(np.argmax(tails))
    fine = np.linspace(grid[max(best - 1, 0)], grid[min(best + 1, NUISANCE_GRID - 1)], NUISANCE_REFINE)
    return float(min(1.0, max(tails[best], float(np.max(_boundary_tails(n, margin, thresholds, fine))))))


@lru_cache(maxsize=256)
def exact_critical_z(n: int, margin: float, alpha: float) -> float:
    """The smallest Z(-margin) whose exact unconditional p-value is at most alpha (the p-value falls as Z
    rises, so this is a bisection). Cached: a simulation asks for the same n many times."""
    lo, hi = 0.0, 12.0
    if _exact_p(n, margin, hi) > alpha:
        return math.inf
    while hi - lo > 1e-4:
        mid = 0.5 * (lo + hi)
        if _exact_p(n, margin, mid) <= alpha:
            hi = mid
        else:
            lo = mid
    return hi


def binary_items_needed(
    *, discordance: float, margin: float, alpha: float, power: float = DEFAULT_POWER
) -> int:
    """Items a suite needs to show non-inferiority at `margin` with probability `power` when the candidate
    is as good as the baseline and the two disagree on a share `discordance` of items (Tango's score test,
    normal approximation: n = ((z_alpha s0 + z_beta s1) / margin)^2 with s1^2 = discordance and s0^2 the
    restricted variance under delta = -margin). With no disagreement at all this is z^2 (1 - m) / m."""
    alpha = check_alpha(alpha)
    margin = check_margin(margin)
    if margin == 0.0:
        return MAX_ITEMS_NEEDED
    psi = min(max(float(discordance), 0.0), 1.0)
    half = psi / 2.0
    d0 = -margin
    big_b = -psi + 2.0 * d0
    big_c = -half * d0 * (1.0 - d0)
    q = (math.sqrt(max(big_b * big_b - 8.0 * big_c, 0.0)) - big_b) / 4.0
    s0 = math.sqrt(max(2.0 * q + d0 * (1.0 - d0), 0.0))
    s1 = math.sqrt(psi)
    z_a = float(stats.norm.isf(alpha))
    z_b = float(stats.norm.ppf(power))
    return min(MAX_ITEMS_NEEDED, math.ceil(((z_a * s0 + z_b * s1) / margin) ** 2))


def graded_items_needed(*, sd: float, margin: float, alpha: float, power: float = DEFAULT_POWER) -> int:
    """Items needed for a mean paired difference with standard deviation `sd`, if the candidate is as good
    as the baseline: ((z_alpha + z_beta) sd / margin)^2, and never fewer than a sample with no difference at
    all needs (ln alpha / ln(1 - margin), see `equal_differences_bounds`)."""
    alpha = check_alpha(alpha)
    margin = check_margin(margin)
    if margin == 0.0:
        return MAX_ITEMS_NEEDED
    z_sum = float(stats.norm.isf(alpha)) + float(stats.norm.ppf(power))
    by_spread = math.ceil((z_sum * max(float(sd), 0.0) / margin) ** 2)
    floor = math.floor(math.log(alpha) / math.log1p(-margin)) + 1
    return min(MAX_ITEMS_NEEDED, max(by_spread, floor))


def equal_differences_bounds(value: float, n: int, *, alpha: float) -> tuple[float, float]:
    """Exact one-sided bounds of a mean difference in [-1, 1] when all n observed differences equal `value`.

    The distribution with mean mu < value that makes n equal draws most likely puts its mass on value and
    -1: P(all equal) = (1 - (value - mu) / (value + 1))^n, which is at most alpha once
    value - mu >= (value + 1)(1 - alpha^(1/n)). The upper side mirrors it against +1."""
    shrink = 1.0 - alpha ** (1.0 / n)
    return value - (value + 1.0) * shrink, value + (1.0 - value) * shrink


def bootstrap_t_bounds(
    differences: Sequence[float] | np.ndarray, *, alpha: float, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """One-sided (1 - alpha) bootstrap-t bounds of the mean of paired differences in [-1, 1].

    Resampling n items with replacement is a multinomial draw over the distinct differences, so that is
    what is drawn: the same distribution, at a cost that grows with the distinct values, not with n
    (rubric and pass/fail scores have a handful). Samples whose were all equal: those get the exact bounds of `equal_differences_bounds` (no spread to
    resample, and never a zero-width interval)."""
    alpha = check_alpha(alpha)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an integer of at least 100, got {resamples!r}")
    diffs = np.asarray(differences, dtype=float)
    if diffs.ndim != 1 or diffs.size == 0 or not np.all(np.isfinite(diffs)):
        raise ValueError("differences must be a non-empty sequence of finite numbers")
    if np.any(np.abs(diffs) > 1.0 + 1e-9):
        raise ValueError("differences of scores in [0, 1] must lie in [-1, 1]")
    n = diffs.size
    mean = float(diffs.mean())
    sd = float(diffs.std(ddof=1)) if n > 1 else 0.0
    if n < 2 or sd == 0.0:
        low, high = equal_differences_bounds(mean, n, alpha=alpha)
        return max(-1.0, low), min(1.0, high)
    values, counts = np.unique(diffs, return_counts=True)
    rng = np.random.default_rng(seed)
    t = np.empty(resamples)
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        stop = min(resamples, start + BOOTSTRAP_CHUNK)
        draws = rng.multinomial(n, counts / n, size=stop - start).astype(float)
        means = draws @ values / n
        squares = draws @ (values * values) / n
        sds = np.sqrt(np.maximum(squares - means * means, 0.0) * n / (n - 1))
        gap = means - mean
        with np.errstate(divide="ignore", invalid="ignore"):
            # A resample of one repeated value has no spread: its t is +-inf (or 0 if it sits on the mean).
            t[start:stop] = np.where(sds > 0, gap / (sds / math.sqrt(n)), np.sign(gap) * np.inf)
    se = sd / math.sqrt(n)
    # No interpolation: neighbouring order statistics may be infinite. Never shorter than Student's t: the
    # bootstrap lengthens the side a skew makes harmful, but on scores with a few grades its own lumpiness
    # can also shorten a side, which ran at 5.5 % instead of 5 % on 50-item rubric suites.
    student = float(stats.t.isf(alpha, n - 1))
    t_high = max(float(np.quantile(t, 1.0 - alpha, method="higher")), student)
    t_low = min(float(np.quantile(t, alpha, method="lower")), -student)
    low = mean - t_high * se if math.isfinite(t_high) else -1.0
    high = mean - t_low * se if math.isfinite(t_low) else 1.0
    return max(-1.0, low), min(1.0, high)


@dataclass(frozen=True)
class NonInferiority:
    """The decision of one non-inferiority check, with everything needed to show why.

    `low`/`high` are one-sided (1 - alpha) bounds of candidate - baseline; `items_needed` (undecided only)
    is how many items the check would need to show non-inferiority of a candidate as good as the baseline,
    with the spread or disagreement seen here, at 80 % power."""

    verdict: Verdict
    method: str
    n: int
    margin: float
    alpha: float
    estimate: float
    low: float
    high: float
    reason: str
    items_needed: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        check_margin(self.margin)
        if not isinstance(self.verdict, Verdict):
            raise ValueError(f"verdict must be a Verdict, got {self.verdict!r}")
        if not self.low <= self.estimate <= self.high:
            raise ValueError(
                f"bounds must bracket the estimate: {self.low} <= {self.estimate} <= {self.high}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.verdict.value, "method": self.method, "n": self.n, "margin": self.margin,
            "alpha": self.alpha, "estimate": self.estimate, "low": self.low, "high": self.high,
            "reason": self.reason, "items_needed": self.items_needed, **self.detail,
        }  # fmt: skip


def _verdict(low: float, high: float, margin: float) -> Verdict:
    if low > -margin:
        return Verdict.PASS
    if high < -margin:
        return Verdict.FAIL
    return Verdict.UNDECIDED


def _reason(verdict: Verdict, *, n: int, margin: float, alpha: float, low: float, high: float,
            needed: int | None) -> str:  # fmt: skip
    bounds = f"one-sided {1 - alpha:.4g} bounds of candidate - baseline: {low:+.4f} to {high:+.4f}"
    if verdict is Verdict.PASS:
        return f"not worse than the baseline by {margin:g} or more ({bounds}, {n} items)"
    if verdict is Verdict.FAIL:
        return f"worse than the baseline by more than {margin:g} ({bounds}, {n} items)"
    more = (
        f"; about {needed:,} items would show it if the candidate is as good as the baseline"
        if needed
        else ""
    )
    return f"{n} items cannot show the candidate is within {margin:g} of the baseline ({bounds}){more}"


def binary_noninferiority(counts: DiscordantCounts, *, margin: float, alpha: float) -> NonInferiority:
    """Pass when Tango's bound clears the margin and the exact unconditional test agrees (both at alpha)."""
    alpha = check_alpha(alpha)
    margin = check_margin(margin)
    low, high = tango_bounds(counts, alpha=alpha)
    z_obs = float(tango_z(counts.candidate_only, counts.baseline_only, counts.n, -margin))
    detail: dict[str, Any] = {
        "z": z_obs,
        "z_alpha": float(stats.norm.isf(alpha)),
        "candidate_only": counts.candidate_only,
        "baseline_only": counts.baseline_only,
    }
    verdict = _verdict(low, high, margin)
    if verdict is Verdict.PASS:
        detail["exact_p_value"] = _exact_p(counts.n, margin, z_obs)
        if detail["exact_p_value"] > alpha:
            verdict = Verdict.UNDECIDED
    needed = None
    if verdict is Verdict.UNDECIDED:
        needed = max(
            counts.n + 1, binary_items_needed(discordance=counts.discordance, margin=margin, alpha=alpha)
        )
    reason = _reason(verdict, n=counts.n, margin=margin, alpha=alpha, low=low, high=high, needed=needed)
    if verdict is Verdict.UNDECIDED and "exact_p_value" in detail:
        reason += f" (the score bound clears the margin, the exact test does not: p = {detail['exact_p_value']:.3g})"
    return NonInferiority(
        verdict, "tango-score+exact-unconditional", counts.n, margin, alpha, counts.difference, min(low, counts.difference),
        max(high, counts.difference), reason, needed, detail,
    )  # fmt: skip


def graded_noninferiority(
    differences: Sequence[float] | np.ndarray,
    *,
    margin: float,
    alpha: float,
    resamples: int = 2000,
    seed: int = 0,
) -> NonInferiority:
    """Pass when the bootstrap-t lower bound of the mean difference clears -margin."""
    alpha = check_alpha(alpha)
    margin = check_margin(margin)
    diffs = np.asarray(differences, dtype=float)
    low, high = bootstrap_t_bounds(diffs, alpha=alpha, resamples=resamples, seed=seed)
    mean = float(diffs.mean())
    verdict = _verdict(low, high, margin)
    sd = float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0
    needed = None
    if verdict is Verdict.UNDECIDED:
        needed = max(diffs.size + 1, graded_items_needed(sd=sd, margin=margin, alpha=alpha))
    reason = _reason(verdict, n=diffs.size, margin=margin, alpha=alpha, low=low, high=high, needed=needed)
    return NonInferiority(
        verdict, "bootstrap-t", int(diffs.size), margin, alpha, mean, min(low, mean), max(high, mean), reason, needed,
        {"sd": sd, "resamples": resamples, "seed": seed},
    )  # fmt: skip


# -- the minimum score (an eval gate's `min_score`) --------------------------------------------------------


@dataclass(frozen=True)
class ScoreBounds:
    """One-sided (1 - alpha) bounds of the candidate's mean score on the suite: Clopper-Pearson for pass/fail
    items (exact: a pass at a true accuracy exactly at the minimum happens at most alpha of the time), the
    bootstrap-t of the mean for graded scores (second-order accurate, as the paired gate's)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    alpha: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "low": self.low, "high": self.high,
                "alpha": self.alpha, "method": self.method}  # fmt: skip


def clopper_pearson_bounds(successes: int, n: int, *, alpha: float) -> tuple[float, float]:
    """One-sided (1 - alpha) exact bounds of a proportion (Clopper and Pearson 1934), each end at alpha."""
    alpha = check_alpha(alpha)
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes!r} of {n!r}")
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha, successes, n - successes + 1))
    high = 1.0 if successes == n else float(stats.beta.ppf(1.0 - alpha, successes + 1, n - successes))
    return low, high


def score_bounds(scores: Sequence[float] | np.ndarray, *, binary: bool, alpha: float, resamples: int = 2000,
                 seed: int = 0) -> ScoreBounds:  # fmt: skip
    """The candidate's mean score with its one-sided bounds at alpha (``ScoreBounds``)."""
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("scores must be a non-empty sequence of finite numbers")
    if np.any(values < -1e-9) or np.any(values > 1.0 + 1e-9):
        raise ValueError("scores must lie in [0, 1]")
    n, mean = int(values.size), float(values.mean())
    sd = float(values.std(ddof=1)) if n > 1 else 0.0
    if binary:
        low, high = clopper_pearson_bounds(int(np.rint(values.sum())), n, alpha=alpha)
        return ScoreBounds(n, mean, sd, low, high, alpha, "clopper-pearson")
    low, high = bootstrap_t_bounds(values, alpha=alpha, resamples=resamples, seed=seed)
    return ScoreBounds(n, mean, sd, max(0.0, low), min(1.0, high), alpha, "bootstrap-t")


def min_score_items_needed(*, mean: float, sd: float, minimum: float, alpha: float, binary: bool,
                           power: float = DEFAULT_POWER) -> int | None:  # fmt: skip
    """Items at which a candidate scoring ``mean`` shows it is at least ``minimum`` with about ``power``
    (None when its mean is not above the minimum): for pass/fail items the smallest n whose Clopper-Pearson
    lower bound clears the minimum at the expected count less the power term; for graded scores the normal
    approximation."""
    if mean <= minimum:
        return None
    if not binary:
        z = float(stats.norm.ppf(1.0 - check_alpha(alpha)) + stats.norm.ppf(power))
        return max(2, math.ceil((z * max(sd, 1e-9) / (mean - minimum)) ** 2))
    n = 1
    while n < 10**7:
        shortfall = float(stats.norm.ppf(power)) * math.sqrt(n * mean * (1.0 - mean))
        successes = min(n, max(0, math.floor(n * mean - shortfall)))
        if clopper_pearson_bounds(successes, n, alpha=alpha)[0] >= minimum:
            return n
        n = max(n + 1, math.ceil(n * 1.1))
    return None
