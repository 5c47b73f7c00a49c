"""Tail guardrails: a confidence sequence for a quantile of each arm, and the candidate's quantile against
(1 + margin) times the baseline's.

**One arm** (Howard and Ramdas, "Sequential estimation of quantiles with applications to A/B-testing and
best-arm identification", Bernoulli 28(3), 2022, Theorem 1 with the beta-binomial boundary of Howard,
Ramdas, McAuliffe and Sekhon, Ann. Statist. 2021). For i.i.d. observations with a continuous distribution
and Q its q-quantile, the count S_n = #{i <= n : X_i <= Q} is Binomial(n, q), and with s = S_n - n q and
v = n q (1 - q) (g = q, h = 1 - q in the paper's notation) the beta-binomial mixture

    M_n = B(W q + S_n, W (1 - q) + n - S_n) / B(W q, W (1 - q)) / (q^S_n (1 - q)^(n - S_n)),

W = rho / (q (1 - q)) - 1, rho = v* / (2 ln(1/alpha) + ln(1 + 2 ln(1/alpha))) (the two-sided normal
mixture's, tightest near v* = N* q (1 - q)), is a nonnegative martingale with mean 1 (``proportions.log_mixture``;
W is ``proportions.mixture_weight``). By Ville's inequality the counts s with ln M_n(s) < ln(1/alpha), an
interval [s_lo, s_hi] around n q, hold S_n at every n at once with probability 1 - alpha, so

    X_(s_lo) <= Q < X_(s_hi + 1)      at every n simultaneously

(X_(0) = 0 for a latency, X_(n + 1) = +inf: no bound yet). A look needs them at its own n:
``proportions.quantile_cs_ranks`` (a bisection over the counts, a fraction of a millisecond at any n).
``quantile_rank_table`` gives them for every n up to a size at once, for simulations that check the
sequence after every observation.

**Two arms** (the A/B question of the paper's Section 4, asked with a margin): "the candidate's p90 is at
most (1 + margin) times the baseline's". Each arm gets the one-arm sequence at alpha / 2; all four bounds
then hold together, at every look, with probability 1 - alpha (a union bound; the arms need not be
independent of each other), so

    harm in [L_c / U_b - 1, U_c / L_b - 1]      with harm = Q_c / Q_b - 1,

and the check is safe once U_c / L_b - 1 < margin, breached once L_c / U_b - 1 > margin. For a given truth
only one of the two can be wrong, so either error is at most alpha over every look of the rollout. The
paper's own two-sample test (a p-value for equal quantiles from the infimum over x of the two arms'
mixtures) answers "equal?", not "within a margin?"; the union of the two sequences answers the latter, at
the price of alpha / 2 per arm. The two sides may have different levels (``breach_alpha``): L_c and U_b
then come from the arms' sequences at breach_alpha / 2 each, U_c and L_b from theirs at alpha / 2, and the
same union bound makes a false breach at most breach_alpha and a false pass at most alpha.

**The unit.** The sequences assume independent observations. Requests of one sticky user are not: a
user's long prompts or slow tenant make all their requests slow together, and heavy users would count many
times. So each arm's sample is **one request per session: the session's first request with the latency
measured** (ok, not a failover attempt) in the compared windows, in order of arrival (``first_per_unit``
is the reference; `experiments.analysis.tails` does it in SQL). Sessions are independent and the gateway
assigns them to arms, so these first requests are i.i.d. draws from the distribution of "a session's first
request", whose quantiles the check compares. That is not the per-request p90 (which weighs heavy users
more and includes later, warmer requests) but the same functional in both arms, which is what a guardrail
needs; the one-per-session sample is the price of validity without a model of the within-session
correlation. A session's first request is fixed once seen (a later request never replaces it), so the
sample only grows, as the martingale argument needs. Requests without a session are their own units.

**Bins.** The look reads each arm's first-request latencies as DDSketch-style bin counts, bin k holding
(gamma^(k - 1), gamma^k], gamma = (1 + a) / (1 - a) for a relative accuracy a (`experiments.rollups`
keys). The counts at the bin edges are exact, so the rank r-th value lies in its bin: the lower bound takes
the lower edge of the bin holding rank s_lo, the upper bound the upper edge of the bin holding rank
s_hi + 1. The bins therefore only widen the interval (by at most a factor gamma, about 2 %, on each side)
and cannot make it anti-conservative; the floor bin (latencies at or under ``floor``, clamped there) has a
lower edge of 0. The estimate shown is the nearest-rank value's bin at its representative value
2 gamma^k / (1 + gamma), within a of the true one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from ._checks import breach_level, check_alpha, check_finite, check_non_negative, check_positive
from .decisions import Decision
from .proportions import log_mixture, min_trials, mixture_weight, quantile_cs_ranks
from .sequential import half_width

RELATIVE_ACCURACY = 0.01  # the rollups' sketches (experiments.rollups.RELATIVE_ACCURACY)
FLOOR = 1e-3  # latencies at or under this are clamped to it before binning (experiments.rollups.SKETCH_FLOOR_MS)


def _check_quantile(quantile: float) -> float:
    quantile = check_finite("quantile", quantile)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    return quantile


@lru_cache(maxsize=16)
def _table(n_max: int, quantile: float, alpha: float, tuning_n: float) -> tuple[np.ndarray, np.ndarray]:
    w = mixture_weight(alpha=alpha, tuning_n=tuning_n)
    target = -math.log(alpha)
    n = np.arange(n_max + 1, dtype=float)
    middle = np.clip(np.round(n * quantile), 0, n)

    def accepted(s: np.ndarray) -> np.ndarray:
        # proportions.log_mixture, elementwise over arrays of counts.
        return np.asarray(log_mixture(s, n, quantile, w) < target)  # type: ignore[arg-type]

    # ln M is convex in s with its minimum (below 0) near n q: the accepted counts are an interval around
    # the middle. The first accepted count: bisection between -1 (taken as rejected) and the middle.
    lo, hi = np.full(n_max + 1, -1.0), middle.copy()
    while np.any(hi - lo > 1):
        mid = np.floor((lo + hi) / 2.0)
        ok = accepted(np.maximum(mid, 0.0))
        step = hi - lo > 1
        hi = np.where(step & ok, mid, hi)
        lo = np.where(step & ~ok, mid, lo)
    s_lo = hi
    # The last accepted count: between the middle and n + 1 (taken as rejected).
    lo, hi = middle.copy(), n + 1.0
    while np.any(hi - lo > 1):
        mid = np.floor((lo + hi) / 2.0)
        ok = accepted(np.minimum(mid, n))
        step = hi - lo > 1
        lo = np.where(step & ok, mid, lo)
        hi = np.where(step & ~ok, mid, hi)
    s_hi = lo
    lower, upper = s_lo.astype(np.int64), (s_hi + 1).astype(np.int64)
    lower.flags.writeable = upper.flags.writeable = False
    return lower, upper


def quantile_rank_table(n_max: int, quantile: float, *, alpha: float, tuning_n: float) -> tuple[np.ndarray, np.ndarray]:
    """For every n = 0..n_max, the 1-based ranks (lo[n], hi[n]) with X_(lo) <= Q(quantile) < X_(hi) at every
    n simultaneously with probability 1 - alpha; lo = 0: no lower bound yet, hi = n + 1: no upper bound.
    For simulations that check the sequence after every observation (tests/experiments/stats/
    test_stats_quantiles.py); a look takes its one n's ranks from ``quantile_ranks``."""
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 0:
        raise ValueError(f"n_max must be a non-negative integer, got {n_max!r}")
    return _table(n_max, _check_quantile(quantile), check_alpha(alpha), check_positive("tuning_n", tuning_n))


def quantile_ranks(n: int, quantile: float, *, alpha: float, tuning_n: float) -> tuple[int, int]:
    """The ranks of ``quantile_rank_table`` at one n (``proportions.quantile_cs_ranks``: a table up to n
    cost a look 1.7 s of CPU and 32 MB of cache at a million sessions, this a fifth of a millisecond)."""
    return quantile_cs_ranks(n, quantile, alpha=alpha, tuning_n=tuning_n)


def quantile_tuning_n(*, quantile: float, alpha: float, margin: float | None = None, log_sd: float = 0.5) -> float:
    """N* of a quantile's sequence, in sessions: with a ``margin``, where a fixed test at 80 % power would
    show a candidate as good as the baseline within it, for lognormal latencies of spread ``log_sd`` (the
    log quantile moves by log_sd / phi(z_q) per unit of probability); without one, where a tail whose share
    over the quantile moved by half of 1 - quantile would show (``planning.limit_tuning_n``)."""
    from .planning import MIN_TUNING_N, limit_tuning_n

    quantile, alpha = _check_quantile(quantile), check_alpha(alpha)
    if margin is None or margin <= 0:
        return limit_tuning_n(limit=1.0 - quantile, alpha=alpha)
    z = special.ndtri(quantile)
    density = math.exp(-z * z / 2.0) / math.sqrt(2.0 * math.pi)
    power = float(special.ndtri(1.0 - alpha / 2.0) + special.ndtri(0.8))
    per_arm = quantile * (1.0 - quantile) * (check_positive("log_sd", log_sd) * power / (density * math.log1p(margin))) ** 2
    return max(float(MIN_TUNING_N), 2.0 * per_arm)


# -- samples: raw values or bins ------------------------------------------------------------------------


@dataclass(frozen=True)
class SortedSample:
    """An arm's observations (one per session), as values: the order statistics are exact. A look reads
    bins (``BinnedSample``); this is the simulations' sample and the reference the bins are checked against
    (tests/experiments/stats/test_stats_quantiles.py)."""

    values: np.ndarray

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> SortedSample:
        array = np.sort(np.asarray(values, dtype=float))
        if array.size and not np.all(np.isfinite(array)):
            raise ValueError("values must be finite")
        return cls(array)

    @property
    def n(self) -> int:
        return int(self.values.size)

    def below(self, rank: int) -> float:
        """A value at or under the rank-th order statistic (1-based; rank 0: 0, nothing bounds it)."""
        return 0.0 if rank <= 0 else float(self.values[rank - 1])

    def above(self, rank: int) -> float:
        """A value at or over the rank-th order statistic (rank n + 1: +inf)."""
        return math.inf if rank > self.n else float(self.values[rank - 1])

    def nearest_rank(self, quantile: float) -> float | None:
        if not self.n:
            return None
        return float(self.values[max(1, math.ceil(quantile * self.n)) - 1])


@dataclass(frozen=True)
class BinnedSample:
    """An arm's observations as bin counts {k: count}, bin k holding (gamma^(k - 1), gamma^k] (the rollups'
    LogarithmicMapping keys); latencies at or under ``floor`` were clamped to it. Order statistics are known
    to their bin: ``below`` and ``above`` give its edges (module docstring)."""

    keys: np.ndarray
    cumulative: np.ndarray
    relative_accuracy: float = RELATIVE_ACCURACY
    floor: float = FLOOR

    @classmethod
    def of(cls, counts: Mapping[int, int], *, relative_accuracy: float = RELATIVE_ACCURACY,
           floor: float = FLOOR) -> BinnedSample:  # fmt: skip
        accuracy = check_positive("relative_accuracy", relative_accuracy)
        if accuracy >= 1:
            raise ValueError(f"relative_accuracy must be below 1, got {relative_accuracy!r}")
        if any(int(c) < 0 for c in counts.values()):
            raise ValueError("counts must be non-negative")
        items = sorted((int(k), int(c)) for k, c in counts.items() if int(c) > 0)
        keys = np.array([k for k, _ in items], dtype=np.int64)
        cumulative = np.cumsum(np.array([c for _, c in items], dtype=np.int64))
        return cls(keys, cumulative, accuracy, check_positive("floor", floor))

    @property
    def gamma(self) -> float:
        return (1.0 + self.relative_accuracy) / (1.0 - self.relative_accuracy)

    @property
    def n(self) -> int:
        return int(self.cumulative[-1]) if self.cumulative.size else 0

    def _key_of_rank(self, rank: int) -> int:
        return int(self.keys[int(np.searchsorted(self.cumulative, rank, side="left"))])

    def _floor_key(self) -> int:
        return math.ceil(math.log(self.floor) / math.log(self.gamma))

    def below(self, rank: int) -> float:
        if rank <= 0:
            return 0.0
        key = self._key_of_rank(rank)
        if key <= self._floor_key():
            return 0.0
        # The bin's lower edge, nudged down by a relative 1e-12 for the rounding of ln(x) at an exact edge.
        return float(self.gamma ** (key - 1)) * (1.0 - 1e-12)

    def above(self, rank: int) -> float:
        if rank > self.n:
            return math.inf
        return float(self.gamma ** self._key_of_rank(rank)) * (1.0 + 1e-12)

    def nearest_rank(self, quantile: float) -> float | None:
        if not self.n:
            return None
        key = self._key_of_rank(max(1, math.ceil(quantile * self.n)))
        return float(2.0 * self.gamma**key / (1.0 + self.gamma))


Sample = SortedSample | BinnedSample


@dataclass(frozen=True, slots=True)
class QuantileBounds:
    """One arm's q-quantile at this look: the nearest-rank estimate and the confidence sequence's bounds
    (0 and +inf while a side is not bounded yet)."""

    quantile: float
    n: int
    estimate: float | None
    lower: float
    upper: float
    alpha: float


def quantile_bounds(sample: Sample, quantile: float, *, alpha: float, tuning_n: float) -> QuantileBounds:
    """The (1 - alpha) confidence sequence for an arm's ``quantile`` at this look (Theorem 1)."""
    quantile = _check_quantile(quantile)
    lo, hi = quantile_ranks(sample.n, quantile, alpha=alpha, tuning_n=tuning_n)
    return QuantileBounds(quantile, sample.n, sample.nearest_rank(quantile), sample.below(lo), sample.above(hi), alpha)


def first_per_unit(units: np.ndarray, order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The reference of what the look does in SQL (`experiments.analysis.tails`), for the simulations in
    tests: per unit, the value of its first observation by ``order``, the units in the order of their first
    observation."""
    units, order, values = np.asarray(units), np.asarray(order), np.asarray(values, dtype=float)
    by_time = np.lexsort((np.arange(order.size), order))
    _, first = np.unique(units[by_time], return_index=True)
    return values[by_time][np.sort(first)]


# -- the guardrail ---------------------------------------------------------------------------------------


def tail_min_n(*, quantile: float, alpha: float, tuning_n: float) -> int:
    """The fewest candidate sessions at which the candidate's quantile has an upper bound at all (with every
    observation under it): the least a tail guardrail needs before it can be shown safe, from the quantile,
    alpha (the arm's alpha / 2) and N* alone."""
    quantile = _check_quantile(quantile)
    return min_trials(limit=1.0 - quantile, alpha=check_alpha(alpha) / 2.0, tuning_n=tuning_n, all_successes=False)


@dataclass(frozen=True, slots=True)
class QuantileGuardrailResult:
    """A tail guardrail: ``harm`` = candidate's quantile / baseline's - 1 (positive = worse), with
    [harm_low, harm_high] the interval from the arms' bounds (each arm's at alpha / 2)."""

    decision: Decision
    quantile: float
    harm: float | None
    harm_low: float
    harm_high: float
    margin: float
    alpha: float
    baseline: QuantileBounds
    candidate: QuantileBounds
    min_n: int
    more_n: int | None
    reason: str


def _ratio(top: float, bottom: float) -> float:
    if bottom <= 0:
        return math.inf if top > 0 else math.nan
    return top / bottom


def quantile_guardrail_check(
    baseline: Sample,
    candidate: Sample,
    *,
    quantile: float,
    margin: float,
    alpha: float = 0.05,
    tuning_n: float | None = None,
    project: bool = True,
    breach_alpha: float | None = None,
    breach_tuning_n: float | None = None,
) -> QuantileGuardrailResult:
    """"The candidate's ``quantile`` is at most (1 + margin) times the baseline's" (lower is better: a
    latency), decided on the two arms' confidence sequences at alpha / 2 each (module docstring): safe when
    U_c / L_b - 1 < margin, breach when L_c / U_b - 1 > margin, else undecided. ``project``: estimate, while
    undecided, how many more candidate sessions a decision needs if the estimates hold (a search).

    ``breach_alpha`` and ``breach_tuning_n`` (by default ``alpha`` and ``tuning_n``): the breach side, L_c
    and U_b, from the arms' sequences at breach_alpha / 2 each, so a false breach has chance at most
    breach_alpha and a false pass (U_c and L_b, at alpha / 2 each) at most alpha. The bounds shown per arm
    (``baseline``, ``candidate``) are the pass side's sequences."""
    quantile = _check_quantile(quantile)
    margin = check_non_negative("margin", margin)
    alpha = check_alpha(alpha)
    tuning = check_positive("tuning_n", tuning_n) if tuning_n is not None else quantile_tuning_n(quantile=quantile, alpha=alpha)
    breach_a = breach_level(alpha, breach_alpha)
    breach_n = check_positive("breach_tuning_n", breach_tuning_n) if breach_tuning_n is not None else tuning
    half = alpha / 2.0
    base = quantile_bounds(baseline, quantile, alpha=half, tuning_n=tuning)
    cand = quantile_bounds(candidate, quantile, alpha=half, tuning_n=tuning)
    base_breach, cand_breach = base, cand
    if (breach_a, breach_n) != (alpha, tuning):
        base_breach = quantile_bounds(baseline, quantile, alpha=breach_a / 2.0, tuning_n=breach_n)
        cand_breach = quantile_bounds(candidate, quantile, alpha=breach_a / 2.0, tuning_n=breach_n)
    min_n = tail_min_n(quantile=quantile, alpha=alpha, tuning_n=tuning)
    high = _ratio(cand.upper, base.lower) - 1.0
    low = _ratio(cand_breach.lower, base_breach.upper) - 1.0 if math.isfinite(base_breach.upper) else -1.0
    low = -1.0 if math.isnan(low) else low
    high = math.inf if math.isnan(high) else high
    harm = None
    if base.estimate and cand.estimate is not None:
        harm = cand.estimate / base.estimate - 1.0
    label = f"p{quantile * 100:g}"
    if low > margin:
        decision = Decision.BREACH
        reason = f"the candidate's {label} is worse than the margin: at least {low:+.1%} > {margin:.1%}"
    elif high < margin:
        decision = Decision.SAFE
        reason = f"the candidate's {label} is within the margin: at most {high:+.1%} < {margin:.1%}"
    elif candidate.n < min_n:
        decision = Decision.UNDECIDED
        reason = f"{candidate.n} of at least {min_n} candidate sessions before its {label} has an upper bound"
    else:
        decision = Decision.UNDECIDED
        shown = f"[{low:+.1%}, {'+inf' if math.isinf(high) else f'{high:+.1%}'}]"
        reason = f"the interval {shown} contains the margin {margin:.1%}"
    more = None
    if decision is Decision.UNDECIDED and project:
        more = _more_sessions(base, cand, quantile, margin, alpha, tuning, harm)
    return QuantileGuardrailResult(decision, quantile, harm, low, high, margin, alpha, base, cand, min_n, more, reason)


def _rank_half_width(n: float, quantile: float, alpha: float, tuning: float) -> float:
    """The sequence's half-width in probability at n (at least 1), by the two-sided normal mixture the
    beta-binomial one tends to (``sequential.half_width`` of a share's variance q (1 - q) / n, rho set by the
    same N*): a projection's yardstick, not a bound."""
    return half_width(variance=quantile * (1.0 - quantile) / n, n_total=n, alpha=alpha, tuning_n=tuning)


def _more_sessions(base_now: QuantileBounds, cand_now: QuantileBounds, quantile: float, margin: float, alpha: float,
                   tuning: float, harm: float | None) -> int | None:  # fmt: skip
    """Candidate sessions to add before the bounds clear the margin, if both arms grow in proportion, the
    estimate holds and the arms' order statistics keep their spacing around the quantile: the interval of
    harm (on the log scale) narrows as the ranks' interval does. A rough projection, as the other checks'
    (None if the estimate sits on the margin or a side is not bounded yet). ``base_now`` and ``cand_now``
    are the arms' bounds at this look, each at alpha / 2."""
    if harm is None or cand_now.n == 0 or base_now.n == 0 or abs(harm - margin) < 1e-9 or harm <= -1.0:
        return None
    half = alpha / 2.0
    if not (base_now.lower > 0 and cand_now.lower > 0 and math.isfinite(cand_now.upper) and math.isfinite(base_now.upper)):
        return None
    spread = math.log(cand_now.upper / cand_now.lower) + math.log(base_now.upper / base_now.lower)
    ratio = base_now.n / cand_now.n

    def width(n: float) -> float:
        return _rank_half_width(n, quantile, half, tuning) + _rank_half_width(n * ratio, quantile, half, tuning)

    per_width = spread / width(cand_now.n)
    gap = abs(math.log1p(harm) - math.log1p(margin))
    n = float(cand_now.n)
    while n < 1e9:
        n *= 1.25
        # The interval spans twice the gap from the estimate's side to the far bound: half of it must fit.
        if per_width * width(n) / 2.0 <= gap:
            return max(1, math.ceil(n - cand_now.n))
    return None


def tail_sample_size(
    *, quantile: float, margin: float, alpha: float, tuning_n: float, candidate_share: float, log_sd: float = 0.5,
    power: float = 0.8,
) -> int | None:  # fmt: skip
    """Candidate sessions at which a candidate as good as the baseline is shown within ``margin`` with about
    ``power``, for lognormal latencies of spread ``log_sd`` (the planning figure; the check itself assumes
    no distribution): the arms' rank intervals (each at alpha / 2, the baseline's sessions in proportion to
    its share) mapped through the lognormal quantile function, plus the power term of the two arms' log
    quantiles' sampling spread. None when no sample up to 10^9 is enough."""
    from ._checks import smallest_enough

    quantile, alpha = _check_quantile(quantile), check_alpha(alpha)
    margin = check_positive("margin", margin)
    share = check_finite("candidate_share", candidate_share)
    if not 0.0 < share < 1.0:
        raise ValueError(f"candidate_share must be in (0, 1), got {candidate_share!r}")
    sd = check_positive("log_sd", log_sd)
    z_q = float(special.ndtri(quantile))
    density = math.exp(-z_q * z_q / 2.0) / math.sqrt(2.0 * math.pi)
    z_power = float(special.ndtri(power))
    tuning = check_positive("tuning_n", tuning_n)
    gap = math.log1p(margin)

    def enough(n_c: int) -> bool:
        n_b = max(1, round(n_c * (1.0 - share) / share))
        width_c = _rank_half_width(n_c, quantile, alpha / 2.0, tuning)
        width_b = _rank_half_width(n_b, quantile, alpha / 2.0, tuning)
        if quantile + width_c >= 1.0 or quantile - width_b <= 0.0:
            return False
        spread = sd * (float(special.ndtri(quantile + width_c)) - float(special.ndtri(quantile - width_b)))
        noise = z_power * sd * math.sqrt(quantile * (1.0 - quantile) * (1.0 / n_c + 1.0 / n_b)) / density
        return spread + noise <= gap

    return smallest_enough(enough, start=1, limit=10**9)
