"""Whole-distribution comparisons on raw samples, for reports.

Decisions use the sequential tests on sufficient statistics; these need the raw
latencies and are fixed-horizon, so they describe a finished window rather than
drive a rollout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special
from scipy import stats as _scipy_stats

from ._checks import check_alpha, check_choice

ALTERNATIVES = ("two-sided", "less", "greater")

# Up to this many pairwise differences the Hodges-Lehmann estimate is taken
# directly; above it by selection, in O((m + n) log(m + n)) memory instead of O(m n).
_DIRECT_PAIRS_LIMIT = 2_000_000


@dataclass(frozen=True, slots=True)
class MannWhitneyResult:
    """Mann-Whitney U of candidate against baseline, with the Hodges-Lehmann shift.

    ``u_statistic`` counts the pairs where the candidate value is larger (ties
    count half); ``shift`` is the median of all candidate - baseline
    differences, with Lehmann's distribution-free interval [shift_ci_low, shift_ci_high].
    """

    u_statistic: float
    p_value: float
    shift: float
    shift_ci_low: float
    shift_ci_high: float
    alternative: str
    alpha: float
    baseline_n: int
    candidate_n: int


@dataclass(frozen=True, slots=True)
class PercentileDifference:
    """candidate - baseline at one percentile, with a bootstrap percentile interval."""

    percentile: float
    baseline: float
    candidate: float
    difference: float
    ci_low: float
    ci_high: float


def _sample(name: str, values: ArrayLike, minimum: int = 1) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size < minimum:
        raise ValueError(f"{name} must have at least {minimum} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must contain only finite values")
    return array


def _count_at_most(baseline_sorted: NDArray[np.float64], candidate: NDArray[np.float64], t: float) -> int:
    """Number of pairs with candidate_j - baseline_i <= t."""
    # candidate_j - baseline_i <= t  <=>  baseline_i >= candidate_j - t
    positions = np.searchsorted(baseline_sorted, candidate - t, side="left")
    return int(baseline_sorted.size * candidate.size - positions.sum())


def _kth_pairwise_difference(
    baseline_sorted: NDArray[np.float64], candidate: NDArray[np.float64], k: int
) -> float:
    """The k-th smallest (1-based) of all candidate_j - baseline_i, without forming them."""
    lo = float(candidate.min() - baseline_sorted[-1])  # the smallest difference
    hi = float(candidate.max() - baseline_sorted[0])  # the largest difference
    if _count_at_most(baseline_sorted, candidate, lo) >= k:
        return lo
    # Invariant: count(<= lo) < k <= count(<= hi).
    for _ in range(200):
        mid = lo + (hi - lo) / 2.0
        if mid <= lo or mid >= hi:
            break
        if _count_at_most(baseline_sorted, candidate, mid) >= k:
            hi = mid
        else:
            lo = mid
    while True:
        # The smallest actual difference above lo: for each candidate value, the
        # largest baseline value below candidate_j - lo.
        idx = np.searchsorted(baseline_sorted, candidate - lo, side="left") - 1
        valid = idx >= 0
        smallest_above = float(np.min(candidate[valid] - baseline_sorted[idx[valid]]))
        if _count_at_most(baseline_sorted, candidate, smallest_above) >= k:
            return smallest_above
        lo = smallest_above


def _pairwise_order_statistics(
    baseline: NDArray[np.float64],
    candidate: NDArray[np.float64],
    ranks: Sequence[int],
    *,
    direct: bool | None,
) -> list[float]:
    pairs = baseline.size * candidate.size
    if direct is None:
        direct = pairs <= _DIRECT_PAIRS_LIMIT
    if direct:
        diffs = np.subtract.outer(candidate, baseline).ravel()
        diffs.sort()
        return [float(diffs[r - 1]) for r in ranks]
    baseline_sorted = np.sort(baseline)
    return [_kth_pairwise_difference(baseline_sorted, candidate, r) for r in ranks]


def hodges_lehmann_shift(baseline: ArrayLike, candidate: ArrayLike, *, direct: bool | None = None) -> float:
    """Median of all pairwise differences candidate_j - baseline_i."""
    a = _sample("baseline", baseline)
    b = _sample("candidate", candidate)
    pairs = a.size * b.size
    if pairs % 2:
        return _pairwise_order_statistics(a, b, [(pairs + 1) // 2], direct=direct)[0]
    low, high = _pairwise_order_statistics(a, b, [pairs // 2, pairs // 2 + 1], direct=direct)
    return (low + high) / 2.0


def mann_whitney(
    baseline: ArrayLike,
    candidate: ArrayLike,
    *,
    alpha: float = 0.05,
    alternative: str = "two-sided",
    direct: bool | None = None,
) -> MannWhitneyResult:
    """Mann-Whitney U test (scipy, tie-corrected) and the Hodges-Lehmann shift.

    ``alternative="greater"`` asks whether the candidate tends to be larger.
    The shift interval uses the normal approximation to U's null distribution
    (Lehmann 1975, ch. 2): the order statistics of the pairwise differences at
    ranks k and m n + 1 - k, k = floor(m n / 2 - z m n (m + n + 1) / 12 ^ 0.5).
    """
    alpha = check_alpha(alpha)
    check_choice("alternative", alternative, ALTERNATIVES)
    a = _sample("baseline", baseline)
    b = _sample("candidate", candidate)
    result = _scipy_stats.mannwhitneyu(b, a, alternative=alternative, method="auto")
    pairs = a.size * b.size
    z = -float(special.ndtri(alpha / 2.0))
    k = math.floor(pairs / 2.0 - z * math.sqrt(pairs * (a.size + b.size + 1) / 12.0))
    shift = hodges_lehmann_shift(a, b, direct=direct)
    if k >= 1:
        ci_low, ci_high = _pairwise_order_statistics(a, b, [k, pairs + 1 - k], direct=direct)
    else:
        ci_low, ci_high = -math.inf, math.inf
    return MannWhitneyResult(
        u_statistic=float(result.statistic),
        p_value=float(result.pvalue),
        shift=shift,
        shift_ci_low=ci_low,
        shift_ci_high=ci_high,
        alternative=alternative,
        alpha=alpha,
        baseline_n=int(a.size),
        candidate_n=int(b.size),
    )


def nearest_rank_percentile(
    values: ArrayLike, percentile: float | Sequence[float], *, axis: int = -1
) -> NDArray[np.float64]:
    """The value at rank ceil(p / 100 * n): an observed value, never an interpolation."""
    return np.asarray(
        np.percentile(np.asarray(values, dtype=float), percentile, axis=axis, method="inverted_cdf"),
        dtype=float,
    )


def bootstrap_percentile_differences(
    baseline: ArrayLike,
    candidate: ArrayLike,
    *,
    percentiles: Sequence[float] = (50.0, 95.0, 99.0),
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[PercentileDifference, ...]:
    """Percentile-bootstrap intervals for candidate - baseline at each percentile.

    Each arm is resampled independently (the arms are independent samples);
    the same seed gives the same intervals. Tail percentiles need enough
    samples: with fewer than about 100 / (100 - p) values per arm the p-th
    percentile is simply the maximum and its interval says little.
    """
    alpha = check_alpha(alpha)
    a = _sample("baseline", baseline, minimum=2)
    b = _sample("candidate", candidate, minimum=2)
    qs = [float(q) for q in percentiles]
    if not qs:
        raise ValueError("percentiles must not be empty")
    for q in qs:
        if not (0.0 < q < 100.0):
            raise ValueError(f"percentiles must be in (0, 100), got {q!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an integer of at least 100, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    diffs = np.empty((n_resamples, len(qs)))
    # Resample in chunks so memory stays near 8 MB whatever the sample size.
    chunk = max(1, 1_000_000 // max(a.size, b.size))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        rows = stop - start
        resampled_a = a[rng.integers(0, a.size, size=(rows, a.size))]
        resampled_b = b[rng.integers(0, b.size, size=(rows, b.size))]
        diffs[start:stop] = (
            nearest_rank_percentile(resampled_b, qs, axis=1)
            - nearest_rank_percentile(resampled_a, qs, axis=1)
        ).T
    results = []
    for j, q in enumerate(qs):
        base_q = float(nearest_rank_percentile(a, q))
        cand_q = float(nearest_rank_percentile(b, q))
        low, high = np.quantile(diffs[:, j], [alpha / 2.0, 1.0 - alpha / 2.0])
        results.append(PercentileDifference(q, base_q, cand_q, cand_q - base_q, float(low), float(high)))
    return tuple(results)
