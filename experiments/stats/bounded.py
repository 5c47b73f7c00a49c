"""Always-valid bounds for the mean of values in [0, 1], in the order they arrived.

The predictable plug-in empirical-Bernstein confidence sequence of Waudby-Smith and Ramdas ("Estimating
means of bounded random variables by betting", JRSS B 86:1-27, 2024, Theorem 2 and eqs. 13-15), one side
at a time. With X_i in [0, 1] arriving in order and one common mean mu:

    mu_hat_t    = (1/2 + sum_{i<=t} X_i) / (t + 1)
    sigma2_hat_t = (1/4 + sum_{i<=t} (X_i - mu_hat_i)^2) / (t + 1)
    lambda_t    = min(sqrt(2 log(1/alpha) / (sigma2_hat_{t-1} t log(1 + t))), c)       (c = 1/2)
    v_t         = 4 (X_t - mu_hat_{t-1})^2,  psi_E(l) = (-log(1 - l) - l) / 4
    lower_t     = (sum lambda_i X_i - log(1/alpha) - sum v_i psi_E(lambda_i)) / sum lambda_i

and the upper bound mirrors it (1 - X). Each holds at every t at once with probability 1 - alpha, so
the running maximum of the lower bounds (minimum of the upper) is valid too, and a look may come at any
time. Nothing here needs a variance to be positive: ten equal scores give a bound about 0.5 wide, never a
zero-width interval. This is what the shadow-quality check reads (scores of the candidate's shadow
answers, each in [0, 1]); it suits any bounded per-unit value.

It needs the values to be independent, and shadow scores are not: the pairs of one sticky session share
its prompts and its users' habits, and a few sessions send most of the requests. ``session_mean_bounds``
takes the sessions as the units instead (the mean score per request as a ratio over sessions, with the
delta-method variance), which is what the shadow-quality check reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._checks import check_alpha
from .clustered import RatioStats
from .decisions import growth_to_decide
from .sequential import one_sided_multiplier

LAMBDA_CAP = 0.5
MAX_PROJECTION = 10**7


@dataclass(frozen=True, slots=True)
class BoundedMeanBounds:
    """One-sided always-valid bounds of a [0, 1] mean, each wrong at some time with chance at most alpha."""

    n: int
    mean: float
    lower: float
    upper: float
    alpha: float

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.n < 0:
            raise ValueError(f"n must be at least 0, got {self.n}")
        if not 0.0 <= self.lower <= self.upper <= 1.0:
            raise ValueError(f"bounds must satisfy 0 <= lower <= upper <= 1, got {self.lower}, {self.upper}")


def _lower_path(x: np.ndarray, log_term: float) -> np.ndarray:
    """The lower bound after each observation (before the running maximum)."""
    t = np.arange(1, x.size + 1, dtype=float)
    mu_hat = (0.5 + np.cumsum(x)) / (t + 1.0)
    sq = (0.25 + np.cumsum((x - mu_hat) ** 2)) / (t + 1.0)
    # Predictable: the t-th lambda and v use estimates from the first t - 1 values only.
    mu_prev = np.r_[0.5, mu_hat[:-1]]
    sq_prev = np.r_[0.25, sq[:-1]]
    lam = np.minimum(np.sqrt(2.0 * log_term / (sq_prev * t * np.log1p(t))), LAMBDA_CAP)
    v = 4.0 * (x - mu_prev) ** 2
    psi = (-np.log1p(-lam) - lam) / 4.0
    weight = np.cumsum(lam)
    return np.asarray((np.cumsum(lam * x) - log_term - np.cumsum(v * psi)) / weight)


def bounded_mean_bounds(values: Sequence[float] | np.ndarray, *, alpha: float) -> BoundedMeanBounds:
    """Always-valid one-sided bounds (each at alpha) of the mean of `values`, given in arrival order."""
    alpha = check_alpha(alpha)
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError("values must be a flat sequence")
    if x.size == 0:
        return BoundedMeanBounds(0, math.nan, 0.0, 1.0, alpha)
    if not np.all(np.isfinite(x)) or np.any(x < 0.0) or np.any(x > 1.0):
        raise ValueError("values must be finite numbers in [0, 1]")
    log_term = math.log(1.0 / alpha)
    lower = float(np.max(_lower_path(x, log_term)))
    upper = 1.0 - float(np.max(_lower_path(1.0 - x, log_term)))
    mean = float(x.mean())
    return BoundedMeanBounds(int(x.size), mean, max(0.0, min(lower, mean)), min(1.0, max(upper, mean)), alpha)


def bounded_mean_n_needed(*, mean: float, sd: float, gap: float, alpha: float) -> int | None:
    """About how many values the sequence needs before its bound on one side is within `gap` of the mean,
    if the values to come keep this mean and standard deviation: the bound's width, computed along the way
    with the plug-in estimates held at their current values. None if it never gets there within 10^7."""
    alpha = check_alpha(alpha)
    if gap <= 0:
        return None
    log_term = math.log(1.0 / alpha)
    variance = max(float(sd) ** 2, 1e-6)
    n = 64
    while n <= MAX_PROJECTION:
        t = np.arange(1, n + 1, dtype=float)
        lam = np.minimum(np.sqrt(2.0 * log_term / (variance * t * np.log1p(t))), LAMBDA_CAP)
        # E[v psi_E(lambda)] with v = 4 (X - mu)^2: 4 variance psi_E(lambda).
        width = (log_term + np.cumsum(variance * (-np.log1p(-lam) - lam))) / np.cumsum(lam)
        reached = np.nonzero(width <= gap)[0]
        if reached.size:
            return int(reached[0]) + 1
        n *= 4
    return None


# --- scores over sessions ----------------------------------------------------------------------------------

# Below this many units the normal approximation behind the asymptotic confidence sequence is not trusted
# (ratio_checks.DEFAULT_MIN_UNITS): the bounds are then the whole of [0, 1].
SESSION_MIN_UNITS = 30
# N* of the sequence (in scores): where its bounds are narrowest. Any value keeps it valid.
SESSION_TUNING_N = 1000.0
# One pseudo-unit of the largest variance a [0, 1] value can have (1/4, as the plug-in above starts from):
# thirty equal scores give a bound some 0.1 wide, never one of zero width, and it fades as units come in.
_PRIOR_VARIANCE = 0.25


@dataclass(frozen=True, slots=True)
class SessionMeanBounds:
    """One-sided always-valid bounds (each at alpha) of the mean score per request, the sessions as units.
    ``sd`` is the spread per request the bounds used, clustering included (the sessions' linearised
    variance): sqrt(sd^2 / n) is the estimate's standard error."""

    n: int
    units: int
    mean: float
    lower: float
    upper: float
    alpha: float
    sd: float


def session_mean_bounds(
    stats: RatioStats, *, alpha: float, tuning_n: float = SESSION_TUNING_N, min_units: int = SESSION_MIN_UNITS
) -> SessionMeanBounds:
    """Bounds of R = sum(scores) / sum(counts) over K sessions (``stats.num``: a session's sum of scores in
    [0, 1], a_i; ``stats.den``: its count, b_i; D = sum b_i), on the one-sided normal-mixture sequence of
    ``sequential`` whose "time" is the number of scores, as ``ratio_checks.ratio_limit_check``.

    Each bound is the mean theta that the score test of the sessions' sums just accepts: the variance of
    sum_i (a_i - theta b_i) is taken at theta, S(theta) = sum_i (a_i - theta b_i)^2 (the cluster-robust
    variance of the delta method, measured at the null rather than at the estimate), with one pseudo-session
    of the largest variance a score can have (1/4 per score of a session of mean size). So

        D^2 (R - theta)^2 <= k^2 K / (K + 1) (S(theta) + (D / K)^2 / 4),

    a quadratic in theta, as Wilson's interval is for one share. Measured at the estimate instead, the
    variance is smallest just when the estimate is too good (a few heavy sessions with poor scores not yet
    seen), and a candidate at the floor passes more often than alpha; the pseudo-session keeps equal
    scores from giving a zero-width bound. Under ``min_units`` sessions the bounds are all of [0, 1]."""
    alpha = check_alpha(alpha)
    if not isinstance(stats, RatioStats):
        raise ValueError(f"stats must be a RatioStats, got {type(stats).__name__}")
    n, k = round(stats.den), stats.units
    if stats.den <= 0:
        return SessionMeanBounds(0, k, math.nan, 0.0, 1.0, alpha, math.nan)
    d = stats.den
    mean = stats.num / d
    if not -1e-9 <= mean <= 1.0 + 1e-9:
        raise ValueError(f"scores must be in [0, 1], got a mean of {mean!r}")
    mean = min(1.0, max(0.0, mean))
    shrink = k / (k + 1.0)
    prior = _PRIOR_VARIANCE * (d / k) ** 2
    at_mean = stats.num_sq - 2.0 * mean * stats.num_den + mean * mean * stats.den_sq
    sd = math.sqrt(max(shrink * (at_mean + prior), 0.0) / d)
    if k < min_units:
        return SessionMeanBounds(n, k, mean, 0.0, 1.0, alpha, sd)
    z2 = one_sided_multiplier(n_total=d, alpha=alpha, tuning_n=tuning_n) ** 2 * shrink
    a = d * d - z2 * stats.den_sq
    b = d * stats.num - z2 * stats.num_den
    c = stats.num**2 - z2 * (stats.num_sq + prior)
    disc = b * b - a * c
    if a <= 0 or disc < 0:
        return SessionMeanBounds(n, k, mean, 0.0, 1.0, alpha, sd)
    root = math.sqrt(disc)
    lower, upper = (b - root) / a, (b + root) / a
    return SessionMeanBounds(n, k, mean, max(0.0, min(lower, mean)), min(1.0, max(upper, mean)), alpha, sd)


def session_mean_n_needed(
    *, n: int, units: int, sd: float, gap: float, alpha: float, tuning_n: float = SESSION_TUNING_N,
    min_units: int = SESSION_MIN_UNITS,
) -> int | None:
    """About how many scores ``session_mean_bounds`` needs in all before its bound on one side is within
    `gap` of the mean, if the sessions to come keep this mean, spread and size: at least enough for
    `min_units` units. None if the gap is 0 or a million times the sample would not do."""
    if n <= 0 or units <= 0:
        return None
    growth = growth_to_decide(gap=gap, variance=max(float(sd), 0.0) ** 2 / n, n_total=n, alpha=alpha,
                              tuning_n=tuning_n)  # fmt: skip
    if growth is None:
        return None
    return max(math.ceil(n * growth), math.ceil(n * min_units / units))
