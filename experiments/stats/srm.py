"""Sample-ratio mismatch: do the arms' request counts fit the configured split?

A mismatch means assignment or logging is broken (sticky routing lost, one
arm's records dropped), and then every comparison between the arms is biased,
so the rollout should stop trusting its metrics rather than act on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

from ._checks import check_alpha

# Convention (Fabijan et al., "Diagnosing Sample Ratio Mismatch", KDD 2019):
# a test run on every look of every experiment needs a strict threshold to
# keep false alarms rare.
SRM_P_THRESHOLD = 0.001

# Configured weights come from percentages typed by people and stored as floats.
_WEIGHT_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class SrmResult:
    p_value: float
    statistic: float
    expected: tuple[float, ...]
    mismatch: bool


def _check(counts: Sequence[float], weights: Sequence[float]) -> tuple[list[float], list[float]]:
    counts = list(counts)
    weights = list(weights)
    if len(counts) < 2:
        raise ValueError(f"counts must have at least 2 arms, got {len(counts)}")
    if len(weights) != len(counts):
        raise ValueError(f"weights must have one entry per arm ({len(counts)}), got {len(weights)}")
    checked_counts = []
    for i, count in enumerate(counts):
        value = float(count)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"counts[{i}] must be a non-negative number, got {count!r}")
        checked_counts.append(value)
    checked_weights = []
    for i, weight in enumerate(weights):
        value = float(weight)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"weights[{i}] must be positive, got {weight!r} (leave an arm with weight 0 out)"
            )
        checked_weights.append(value)
    total = math.fsum(checked_weights)
    if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"weights must sum to 1, got {total!r}")
    return checked_counts, [w / total for w in checked_weights]


def srm_check(
    counts: Sequence[float], weights: Sequence[float], *, threshold: float = SRM_P_THRESHOLD
) -> SrmResult:
    """Pearson chi-squared goodness of fit of counts against weights."""
    threshold = check_alpha(threshold, "threshold")
    observed, shares = _check(counts, weights)
    total = math.fsum(observed)
    if total == 0:
        # Nothing routed yet: no evidence either way.
        return SrmResult(1.0, 0.0, tuple(0.0 for _ in shares), False)
    expected = [total * w for w in shares]
    statistic = math.fsum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    p_value = float(_scipy_stats.chi2.sf(statistic, len(observed) - 1))
    return SrmResult(p_value, statistic, tuple(expected), p_value < threshold)


def srm_test(counts: Sequence[float], weights: Sequence[float]) -> float:
    """The p-value of the sample-ratio-mismatch test; flag the split when it is < 0.001."""
    return srm_check(counts, weights).p_value


def srm_sequential(
    counts: Sequence[float], weights: Sequence[float], *, threshold: float = SRM_P_THRESHOLD, tuning_n: float = 5000
) -> SrmResult:
    """The sample-ratio check made valid however often it is looked at: the Dirichlet-multinomial mixture
    (Lindon and Malek, "Anytime-valid inference for multinomial count data", NeurIPS 2022).

    Under the configured weights w, each new unit (a session at its first exposure) falls in arm k with
    probability w_k independently of the others, and the Bayes factor of a Dirichlet(A w) mixture of
    alternatives against w,

        BF = Gamma(A) / Gamma(A + n) * prod_k Gamma(A w_k + n_k) / Gamma(A w_k) / prod_k w_k^n_k,

    is a nonnegative martingale with mean 1: it ever reaches 1 / threshold with probability at most
    ``threshold``, so p = min(1, 1 / BF) may be recomputed at every look. A is set from N* like the beta-
    binomial's weight (``proportions.mixture_weight``). ``statistic`` holds ln BF."""
    from .proportions import mixture_weight  # proportions imports decisions, which must not import srm

    threshold = check_alpha(threshold, "threshold")
    observed, shares = _check(counts, weights)
    total = math.fsum(observed)
    expected = tuple(total * w for w in shares)
    if total == 0:
        return SrmResult(1.0, 0.0, expected, False)
    concentration = mixture_weight(alpha=threshold, tuning_n=tuning_n) + 1.0
    log_bf = math.lgamma(concentration) - math.lgamma(concentration + total)
    for n_k, w_k in zip(observed, shares, strict=True):
        prior = concentration * w_k
        log_bf += math.lgamma(prior + n_k) - math.lgamma(prior) - n_k * math.log(w_k)
    p_value = 1.0 if log_bf <= 0 else math.exp(-log_bf)
    return SrmResult(p_value, log_bf, expected, p_value < threshold)
