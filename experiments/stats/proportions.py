"""Always-valid bounds made for proportions: the beta-binomial mixture martingale.

For 0/1 observations with P(1) = p0, the likelihood ratio of any other p against p0, mixed over a
Beta(r p0, r (1 - p0)) prior on p, is a nonnegative martingale under p0 starting at 1 (Robbins 1970;
Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences",
Ann. Statist. 2021, the beta-binomial boundary). After t observations with s ones, in closed form,

    M_t(p0) = B(r p0 + s, r (1 - p0) + t - s) / B(r p0, r (1 - p0)) / (p0^s (1 - p0)^(t - s)).

By Ville's inequality M ever reaches 1 / alpha with probability at most alpha, so
{p0 : M_t(p0) < 1 / alpha} is a confidence sequence for p: valid at every t, from the first observation,
with no normal approximation. That is what rare events need: an SLO "error_rate <= 0.01" decides safe only
once enough requests passed without errors, and a few errors in a handful of requests cannot call a breach
that the exact binomial would not.

The same martingale gives the fixed-quantile confidence sequence of Howard and Ramdas ("Sequential
estimation of quantiles with applications to A/B testing and best-arm identification", Bernoulli 2022,
Theorem 1 with the beta-binomial boundary): the count of observations at or below the true q-quantile is
Binomial(t, q), so the set of counts s with M_t(q) < 1 / alpha, [s_lo, s_hi], brackets it at every t, and
the order statistics X_(s_lo) <= Q(q) < X_(s_hi + 1) bound the quantile (``quantile_cs_ranks``). A tail
SLO "ttft_p99_ms <= 800" is the same test at the threshold: the share of observations over 800 ms is at
most 1 % exactly when the 99th percentile is at most 800 ms (the look's observations are one request per
session, `experiments.analysis.tails`; two arms' quantiles are compared in `quantiles`).

The prior's weight r is set, like the normal mixture's rho (``sequential``), from the sample size N* at
which the bound should be tightest: r + 1 = N* / (-2 ln alpha + ln(1 - 2 ln alpha)) (the beta prior's
spread in p matches the normal mixture's on the natural parameter).

Sessions: requests of one session are not independent (a user's long prompts, a tenant's traffic), so
the counts are first deflated by the design effect, the cluster-robust variance of the share over the
binomial one (Kish 1965; at least 1): s / deff ones in t / deff observations carry the information the
clustered counts do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from scipy import special

from ._checks import boundary, check_alpha, check_finite, check_positive, smallest_enough
from .decisions import Decision, SloResult

_DIRECTIONS = ("lower_is_better", "higher_is_better")


def mixture_weight(*, alpha: float, tuning_n: float) -> float:
    """r, the beta prior's weight, so that the bound is tightest near N* = tuning_n observations."""
    alpha = check_alpha(alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    log_alpha = math.log(alpha)
    return max(1.0, tuning_n / (-2.0 * log_alpha + math.log(1.0 - 2.0 * log_alpha)) - 1.0)


def log_mixture(successes: float, trials: float, p0: float, r: float) -> float:
    """ln M_t(p0) of the module docstring (successes and trials may be fractional: deflated counts)."""
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1), got {p0!r}")
    a, b = r * p0, r * (1.0 - p0)
    failures = trials - successes
    return (
        special.betaln(a + successes, b + failures)
        - special.betaln(a, b)
        - successes * math.log(p0)
        - failures * math.log1p(-p0)
    )


def _check_counts(successes: float, trials: float) -> tuple[float, float]:
    successes = check_finite("successes", successes)
    trials = check_finite("trials", trials)
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got successes={successes!r}, trials={trials!r}")
    return successes, trials


def proportion_bounds(
    successes: float, trials: float, *, alpha: float, tuning_n: float, design_effect: float = 1.0
) -> tuple[float, float]:
    """The (1 - alpha) confidence sequence for p at this look: (lower, upper)."""
    successes, trials = _check_counts(successes, trials)
    alpha = check_alpha(alpha)
    deff = max(1.0, check_finite("design_effect", design_effect))
    s, t = successes / deff, trials / deff
    if t <= 0:
        return 0.0, 1.0
    r = mixture_weight(alpha=alpha, tuning_n=tuning_n)
    target = -math.log(alpha)
    share = s / t

    def rejected(p0: float) -> bool:
        return log_mixture(s, t, p0, r) >= target

    # M(p0) grows as p0 moves away from the share on either side: the bound is the last p0 not rejected.
    def edge(inside: float, outside: float) -> float:
        if not rejected(outside):
            return outside
        return boundary(rejected, before=inside, past=outside)[0]

    centre = min(max(share, 1e-12), 1.0 - 1e-12)
    lower = 0.0 if share <= 1e-12 else edge(centre, 1e-12)
    upper = 1.0 if share >= 1.0 - 1e-12 else edge(centre, 1.0 - 1e-12)
    return max(lower, 0.0), min(upper, 1.0)


@lru_cache(maxsize=512)
def min_trials(*, limit: float, alpha: float, tuning_n: float, all_successes: bool) -> int:
    """The fewest observations at which the test of ``limit`` can reject at all: with none of them a success
    (the least to show a share below the limit) or, ``all_successes``, every one of them (the least to show
    one above it). Follows from alpha, the limit and N* alone."""
    r = mixture_weight(alpha=alpha, tuning_n=tuning_n)
    target = -math.log(alpha)

    def decides(t: int) -> bool:
        return log_mixture(float(t) if all_successes else 0.0, float(t), limit, r) >= target

    found = smallest_enough(decides, limit=10**9)
    if found is None:
        raise ValueError(f"no sample up to 10^9 decides a limit of {limit!r} at alpha {alpha!r}")
    return found


@dataclass(frozen=True, slots=True)
class ProportionLimitResult:
    """A share against a limit ("error_rate <= 0.01"), with the beta-binomial confidence sequence.

    ``min_n`` is the fewest observations at which it could be shown within the limit (none of them a
    success); ``min_n_breach`` the fewest at which it could be shown beyond (all of them). While undecided,
    ``more_n`` estimates the further observations needed at the present share (None if it sits on the limit).
    """

    decision: Decision
    estimate: float
    lower_bound: float
    upper_bound: float
    limit: float
    direction: str
    alpha: float
    n: int
    design_effect: float
    min_n: int
    min_n_breach: int
    more_n: int | None
    reason: str

    def as_slo_result(self) -> SloResult:
        return SloResult(
            self.decision, self.estimate, self.lower_bound, self.upper_bound, self.limit, math.nan,
            self.direction, self.alpha, self.n, self.reason,
        )  # fmt: skip


def _more_needed(share: float, trials: float, limit: float, direction: str, alpha: float, tuning_n: float,
                 deff: float) -> int | None:  # fmt: skip
    """Observations to add, at the present share, before the bound clears the limit (None if never)."""
    if share == limit:
        return None
    base = max(trials, 1.0)

    def decided(total: float) -> bool:
        low, high = proportion_bounds(share * total, total, alpha=alpha, tuning_n=tuning_n, design_effect=deff)
        return low > limit or high < limit if direction == "lower_is_better" else high < limit or low > limit

    high = base
    while not decided(high):
        high *= 2
        if high > 1e9:
            return None
    low = high / 2 if high > base else base
    high = boundary(decided, before=low, past=high, steps=40)[1]
    return max(1, math.ceil(high - trials))


def proportion_limit_check(
    successes: float,
    trials: float,
    *,
    limit: float,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    design_effect: float = 1.0,
    project: bool = True,
) -> ProportionLimitResult:
    """One arm's share of 0/1 events against ``limit``: breach when the whole confidence sequence lies on
    the wrong side of it, safe when it lies on the right side (``direction``: "lower_is_better" for
    "share <= limit", "higher_is_better" for "share >= limit"). Only one of the two can be wrong for a given
    truth, so the decision is valid at alpha at every look. ``project=False`` skips the estimate of
    ``more_n`` (the costly part, for simulations)."""
    successes, trials = _check_counts(successes, trials)
    limit = check_finite("limit", limit)
    if not 0.0 < limit < 1.0:
        raise ValueError(f"limit must be in (0, 1), got {limit!r}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    alpha = check_alpha(alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    deff = max(1.0, check_finite("design_effect", design_effect))
    # "share >= limit" is "share of the other outcome <= 1 - limit": one code path, mapped back at the end.
    lower_is_better = direction == "lower_is_better"
    bad, bad_limit = (successes, limit) if lower_is_better else (trials - successes, 1.0 - limit)
    min_safe = min_trials(limit=bad_limit, alpha=alpha, tuning_n=tuning_n, all_successes=False)
    min_breach = min_trials(limit=bad_limit, alpha=alpha, tuning_n=tuning_n, all_successes=True)
    low, high = proportion_bounds(bad, trials, alpha=alpha, tuning_n=tuning_n, design_effect=deff)
    share = bad / trials if trials else math.nan
    if trials and low > bad_limit:
        decision, reason = Decision.BREACH, f"beyond the limit: at least {low:.4g} > {bad_limit:.4g}"
    elif trials and high < bad_limit:
        decision, reason = Decision.SAFE, f"within the limit: at most {high:.4g} < {bad_limit:.4g}"
    elif trials * 1.0 / deff < min_safe:
        decision, reason = Decision.UNDECIDED, f"{trials:.0f} of at least {min_safe * deff:.0f} observations"
    else:
        decision, reason = Decision.UNDECIDED, f"the interval [{low:.4g}, {high:.4g}] contains the limit {bad_limit:.4g}"
    more = None
    if decision is Decision.UNDECIDED and project:
        at = share if trials else 0.0
        more = _more_needed(at, trials, bad_limit, "lower_is_better", alpha, tuning_n, deff)
    if not lower_is_better:
        share, low, high = 1.0 - share, 1.0 - high, 1.0 - low
    return ProportionLimitResult(
        decision, share, low, high, limit, direction, alpha, round(trials), deff, min_safe, min_breach, more,
        reason,
    )  # fmt: skip


def quantile_cs_ranks(n: int, quantile: float, *, alpha: float, tuning_n: float) -> tuple[int, int]:
    """Order-statistic ranks (1-based) bracketing the ``quantile`` of n i.i.d. observations at this look:
    X_(lo) <= Q(quantile) < X_(hi), at every n simultaneously with probability 1 - alpha. lo = 0 means no
    lower bound yet (X_(0) = -inf), hi = n + 1 no upper bound (X_(n + 1) = +inf)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    quantile = check_finite("quantile", quantile)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    alpha = check_alpha(alpha)
    r = mixture_weight(alpha=alpha, tuning_n=tuning_n)
    target = -math.log(alpha)
    centre = quantile * n

    def accepted(s: int) -> bool:
        return log_mixture(float(s), float(n), quantile, r) < target

    # The accepted counts form an interval around n q (ln M is convex in s): search outward from it.
    def first_accepted(lo: int, hi: int, rising: bool) -> int:
        # The boundary between rejected and accepted counts in [lo, hi]; `rising`: rejected below it.
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if accepted(mid) == rising:
                hi = mid
            else:
                lo = mid
        return hi if rising else lo

    middle = min(max(round(centre), 0), n)
    if not accepted(middle):
        # Cannot happen for a proper mixture (M at the mean count is below 1); kept for safety.
        return 0, n + 1
    s_lo = 0 if accepted(0) else first_accepted(0, middle, rising=True)
    s_hi = n if accepted(n) else first_accepted(middle, n, rising=False)
    return s_lo, s_hi + 1


# -- the difference of two shares (a guardrail "errors at most 1 point worse") ---------------------------


@dataclass(frozen=True, slots=True)
class ShareStratum:
    """One stratum (a step) of a two-share comparison: events and trials per arm, each arm's design effect
    (the sessions' clustering), and the stratum's weight in the pooled difference."""

    events_b: float
    trials_b: float
    events_c: float
    trials_c: float
    deff_b: float = 1.0
    deff_c: float = 1.0
    weight: float = 1.0


def restricted_rates(stratum: ShareStratum, delta: float) -> tuple[float, float]:
    """The maximum-likelihood shares (p_b, p_c) under p_c - p_b = delta: the restricted estimate of the score
    test, in Farrington and Manning's closed form (Statistics in Medicine 1990, the cubic's trigonometric
    root), with a bisection on the concave log-likelihood where that form is numerically degenerate."""
    xb, nb, xc, nc = stratum.events_b, stratum.trials_b, stratum.events_c, stratum.trials_c
    p1, p2, theta = xc / nc, xb / nb, nb / nc
    a = 1.0 + theta
    b = -(1.0 + theta + p1 + theta * p2 + delta * (theta + 2.0))
    c = delta * delta + delta * (2.0 * p1 + theta + 1.0) + p1 + theta * p2
    d = -p1 * delta * (1.0 + delta)
    v = b**3 / (27.0 * a**3) - b * c / (6.0 * a * a) + d / (2.0 * a)
    root = b * b / (9.0 * a * a) - c / (3.0 * a)
    if root > 1e-14:
        u = math.copysign(math.sqrt(root), v) if v else math.sqrt(root)
        ratio = v / u**3
        if -1.0 <= ratio <= 1.0:
            w = (math.pi + math.acos(ratio)) / 3.0
            pc = 2.0 * u * math.cos(w) - b / (3.0 * a)
            pb = pc - delta
            if -1e-9 <= pb <= 1 + 1e-9 and -1e-9 <= pc <= 1 + 1e-9:
                return min(max(pb, 0.0), 1.0), min(max(pc, 0.0), 1.0)
    return _restricted_by_bisection(xb, nb, xc, nc, delta)


def _restricted_by_bisection(xb: float, nb: float, xc: float, nc: float, delta: float) -> tuple[float, float]:
    lo, hi = max(0.0, -delta), min(1.0, 1.0 - delta)
    eps = 1e-12

    def slope(p: float) -> float:
        q = p + delta
        return xb / p - (nb - xb) / (1.0 - p) + xc / q - (nc - xc) / (1.0 - q)

    if hi - lo <= 2 * eps:
        return lo, min(max(lo + delta, 0.0), 1.0)
    if slope(lo + eps) <= 0:
        p = lo
    elif slope(hi - eps) >= 0:
        p = hi
    else:
        a, b = lo + eps, hi - eps
        for _ in range(80):
            mid = (a + b) / 2.0
            if slope(mid) > 0:
                a = mid
            else:
                b = mid
        p = (a + b) / 2.0
    return p, min(max(p + delta, 0.0), 1.0)


def difference_score(strata: list[ShareStratum], delta: float) -> float:
    """The score statistic of H0: p_c - p_b = delta, the strata's differences weighted, each arm's variance
    taken at the restricted estimate and inflated by its design effect."""
    total = sum(s.weight for s in strata)
    numerator = variance = 0.0
    for s in strata:
        pb, pc = restricted_rates(s, delta)
        w = s.weight / total
        numerator += w * (s.events_c / s.trials_c - s.events_b / s.trials_b - delta)
        variance += w * w * (pc * (1 - pc) * s.deff_c / s.trials_c + pb * (1 - pb) * s.deff_b / s.trials_b)
    if variance <= 0:
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def difference_bounds(
    strata: list[ShareStratum], *, multiplier: float, upper_multiplier: float | None = None
) -> tuple[float, float, float]:
    """(estimate, lower, upper) of p_c - p_b: the differences delta the score test does not reject, with
    z < ``multiplier`` below and z > -``upper_multiplier`` above (by default the same): Miettinen and
    Nurminen's inversion, here of always-valid multipliers. Made for shares: with no events yet the
    variance is taken where the hypothesis puts the shares, not at 0."""
    upper_k = multiplier if upper_multiplier is None else upper_multiplier
    total = sum(s.weight for s in strata)
    estimate = sum(s.weight * (s.events_c / s.trials_c - s.events_b / s.trials_b) for s in strata) / total

    def edge(target: float, inside: float, outside: float) -> float:
        # z falls as delta rises; where it crosses `target` between inside and outside (to 1e-12).
        crossed = boundary(lambda delta: (difference_score(strata, delta) > target) == (target > 0),
                           before=inside, past=outside, steps=40)  # fmt: skip
        return (crossed[0] + crossed[1]) / 2.0

    lower = edge(multiplier, estimate, -1.0 + 1e-9) if difference_score(strata, -1.0 + 1e-9) > multiplier else -1.0
    upper = edge(-upper_k, estimate, 1.0 - 1e-9) if difference_score(strata, 1.0 - 1e-9) < -upper_k else 1.0
    return estimate, lower, upper
