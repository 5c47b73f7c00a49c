"""Always-valid bounds for the mean of scores in [0, 1] per request, the sessions as the units.

Shadow scores are not independent: the pairs of one sticky session share its prompts and its users'
habits, and a few sessions send most of the requests. ``session_mean_bounds`` takes the sessions as the
units (the mean score per request as a ratio over sessions, with the delta-method variance) on the
one-sided normal-mixture sequence of ``sequential``, so a look may come at any time. This is what the
shadow-quality check reads; it suits any bounded per-request value summed per session.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._checks import check_alpha
from .clustered import RatioStats
from .decisions import growth_to_decide
from .sequential import one_sided_multiplier

# Below this many units the normal approximation behind the asymptotic confidence sequence is not trusted
# (ratio_checks.DEFAULT_MIN_UNITS): the bounds are then the whole of [0, 1].
SESSION_MIN_UNITS = 30
# N* of the sequence (in scores): where its bounds are narrowest. Any value keeps it valid.
SESSION_TUNING_N = 1000.0
# One pseudo-unit of the largest variance a [0, 1] value can have (1/4): thirty equal scores give a bound
# some 0.1 wide, never one of zero width, and it fades as units come in.
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
