"""The quantile confidence sequence (Howard and Ramdas 2022) and the tail guardrail built on it
(experiments.stats.quantiles): the boundary against the paper's formula, the bins' conservative edges, and
simulations with sticky users (a per-user latency effect, lognormal latencies, uneven requests per user)
watched at many looks: false breaches at no effect and false passes at the margin stay under alpha, a
doubled p99 with the median unchanged is caught, and the per-request stream (the wrong unit) is shown to
miss far more often than alpha."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special

from experiments.stats import Decision
from experiments.stats.quantiles import (
    BinnedSample,
    SortedSample,
    first_per_unit,
    quantile_bounds,
    quantile_guardrail_check,
    quantile_rank_table,
    quantile_ranks,
    quantile_tuning_n,
    tail_min_n,
)


def paper_log_supermartingale(s: float, v: float, v_opt: float, g: float, h: float, alpha_opt: float) -> float:
    """The beta-binomial mixture of Howard, Ramdas, McAuliffe and Sekhon (2021), in the (s, v, g, h) form
    Howard and Ramdas (2022) use for a quantile (Theorem 1: g = q, h = 1 - q, s = S_n - n q, v = n q (1 - q)),
    two-sided (the incomplete beta at x = 1), with r = rho - g h and rho the two-sided normal mixture's
    best rho for v_opt and alpha_opt. Written out from the paper, not from the module under test."""
    log_inv = math.log(1.0 / alpha_opt)
    rho = v_opt / (2.0 * log_inv + math.log(1.0 + 2.0 * log_inv))
    r = max(rho - g * h, 1e-3 * g * h)

    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    normaliser = log_beta(r / (g * (g + h)), r / (h * (g + h)))
    return (
        v / (g * h) * math.log(g + h)
        - (v + h * s) / (h * (g + h)) * math.log(g)
        - (v - g * s) / (g * (g + h)) * math.log(h)
        + log_beta((r + v - g * s) / (g * (g + h)), (r + v + h * s) / (h * (g + h)))
        - normaliser
    )


@pytest.mark.parametrize(
    ("n", "q", "alpha", "tuning_n"),
    [(1, 0.5, 0.05, 500.0), (60, 0.5, 0.05, 500.0), (300, 0.9, 0.025, 500.0), (2000, 0.9, 0.00625, 1800.0),
     (5000, 0.99, 0.00625, 8500.0), (20000, 0.99, 0.05, 2000.0)],
)  # fmt: skip
def test_the_ranks_follow_the_papers_boundary(n: int, q: float, alpha: float, tuning_n: float) -> None:
    """The counts the paper's mixture accepts (ln M < ln 1/alpha), by brute force over every count, give
    exactly the table's ranks: X_(lo) <= Q < X_(hi) with lo the first accepted count, hi the last plus one."""
    v_opt, v = tuning_n * q * (1 - q), n * q * (1 - q)
    accepted = [c for c in range(n + 1) if paper_log_supermartingale(c - n * q, v, v_opt, q, 1 - q, alpha) < math.log(1 / alpha)]
    assert accepted == list(range(accepted[0], accepted[-1] + 1))  # an interval of counts
    lo, hi = quantile_rank_table(n, q, alpha=alpha, tuning_n=tuning_n)
    assert (int(lo[n]), int(hi[n])) == (accepted[0], accepted[-1] + 1)
    assert quantile_ranks(n, q, alpha=alpha, tuning_n=tuning_n) == (accepted[0], accepted[-1] + 1)


def test_the_closed_form_is_the_mixture_integral() -> None:
    """M_n(q) is the binomial likelihood ratio of p against q mixed over the beta prior: checked by
    quadrature at a few counts (the closed form the boundary is computed from)."""
    q, n, alpha, tuning_n = 0.9, 400, 0.025, 800.0
    log_inv = math.log(1 / alpha)
    w = tuning_n / (2 * log_inv + math.log(1 + 2 * log_inv)) - 1  # the prior's weight, rho / (q (1 - q)) - 1
    for count in (330, 360, 385):
        integrand = lambda p, c=count: math.exp(  # noqa: E731
            c * math.log(p / q) + (n - c) * math.log((1 - p) / (1 - q))
            + (w * q - 1) * math.log(p) + (w * (1 - q) - 1) * math.log(1 - p) - special.betaln(w * q, w * (1 - q))
        )  # fmt: skip
        numeric, _ = integrate.quad(integrand, 0, 1, points=[count / n], limit=200)
        closed = paper_log_supermartingale(count - n * q, n * q * (1 - q), tuning_n * q * (1 - q), q, 1 - q, alpha)
        assert math.isclose(math.log(numeric), closed, rel_tol=1e-6, abs_tol=1e-6)


def _binned(values: np.ndarray, accuracy: float = 0.01) -> BinnedSample:
    """Bin as the rollups do: key ceil(ln x / ln gamma), latencies clamped at 1 microsecond."""
    gamma = (1 + accuracy) / (1 - accuracy)
    keys = np.ceil(np.log(np.maximum(values, 1e-3)) / math.log(gamma)).astype(int)
    found, counts = np.unique(keys, return_counts=True)
    return BinnedSample.of(dict(zip(found.tolist(), counts.tolist(), strict=True)), relative_accuracy=accuracy)


def test_bins_only_widen_the_bounds() -> None:
    """From bin counts the bounds are the edges of the bins holding the ranks: never inside the exact
    bounds, at most a factor gamma outside them."""
    rng = np.random.default_rng(3)
    gamma = 1.01 / 0.99
    for n in (50, 400, 3000):
        values = rng.lognormal(4.0, 0.9, n)
        for q in (0.5, 0.9, 0.99):
            exact = quantile_bounds(SortedSample.of(values), q, alpha=0.01, tuning_n=1000)
            binned = quantile_bounds(_binned(values), q, alpha=0.01, tuning_n=1000)
            assert binned.lower <= exact.lower and binned.upper >= exact.upper
            if exact.lower > 0:
                assert binned.lower >= exact.lower / gamma * (1 - 1e-9)
            if math.isfinite(exact.upper):
                assert binned.upper <= exact.upper * gamma * (1 + 1e-9)
            assert binned.estimate is not None and exact.estimate is not None
            assert abs(binned.estimate / exact.estimate - 1) <= 0.01 + 1e-9
    # A latency at the clamp floor has no lower edge above 0.
    floor = quantile_bounds(_binned(np.full(400, 1e-4)), 0.5, alpha=0.01, tuning_n=400)
    assert floor.lower == 0.0


def test_first_per_unit_takes_each_units_earliest() -> None:
    units = np.array(["a", "b", "a", "c", "b", "c"])
    order = np.array([5.0, 1.0, 2.0, 9.0, 0.5, 3.0])
    values = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    # b first at 0.5 (50), a at 2 (30), c at 3 (60): in the order the units appeared.
    assert first_per_unit(units, order, values).tolist() == [50.0, 30.0, 60.0]


# -- sticky users ---------------------------------------------------------------------------------------

MU, USER_SD, REQUEST_SD = math.log(300.0), 0.5, 0.7  # ms; a per-user effect and a heavy per-request tail
TOTAL_SD = math.hypot(USER_SD, REQUEST_SD)


def _sessions(rng: np.random.Generator, users: int, scale: float = 1.0) -> np.ndarray:
    """One arm's sticky users, each with a latency effect and a lognormal number of requests (median 10,
    heavy-tailed), arriving at random times and sending requests over a while: every request is generated,
    the sample is each session's first (``first_per_unit``), in arrival order. ``scale`` multiplies every
    latency of the arm (a candidate exactly ``scale`` times slower at every quantile)."""
    effect = rng.normal(0.0, USER_SD, users)
    requests = np.maximum(1, np.round(rng.lognormal(math.log(10), 1.0, users))).astype(int)
    unit = np.repeat(np.arange(users), requests)
    start = rng.random(users)
    times = start[unit] + rng.exponential(0.01, unit.size).cumsum() % 0.05
    latency = np.exp(MU + effect[unit] + rng.normal(0.0, REQUEST_SD, unit.size)) * scale
    return first_per_unit(unit, times, latency)


def _ever(rng: np.random.Generator, *, runs: int, baseline_users: int, candidate_users: int, scale: float,
          quantile: float, margin: float, alpha: float, looks: int) -> tuple[float, float]:  # fmt: skip
    """Share of runs ever called breach, and ever called safe, over `looks` looks at growing samples."""
    breach = safe = 0
    tuning = quantile_tuning_n(quantile=quantile, alpha=alpha, margin=margin)
    for _ in range(runs):
        base, cand = _sessions(rng, baseline_users), _sessions(rng, candidate_users, scale)
        ever_breach = ever_safe = False
        for k in range(1, looks + 1):
            b = SortedSample.of(base[: round(base.size * k / looks)])
            c = SortedSample.of(cand[: round(cand.size * k / looks)])
            result = quantile_guardrail_check(b, c, quantile=quantile, margin=margin, alpha=alpha, tuning_n=tuning, project=False)
            ever_breach |= result.decision is Decision.BREACH
            ever_safe |= result.decision is Decision.SAFE
        breach += ever_breach
        safe += ever_safe
    return breach / runs, safe / runs


def test_no_effect_is_rarely_called_a_breach_and_an_effect_at_the_margin_rarely_safe() -> None:
    """Sticky users, lognormal latencies with a per-user effect, uneven requests per user and an uneven
    split (2,400 baseline sessions, 1,200 candidate), 40 looks each. With the candidate exactly as the
    baseline, the share of runs ever called a breach; with every latency (so its p90) exactly 1 + margin
    times the baseline's, the share ever called safe: both at most alpha."""
    rng = np.random.default_rng(16)
    alpha, margin, runs = 0.05, 0.15, 150
    breach, _ = _ever(rng, runs=runs, baseline_users=2400, candidate_users=1200, scale=1.0, quantile=0.9,
                      margin=margin, alpha=alpha, looks=40)  # fmt: skip
    assert breach <= alpha
    _, safe = _ever(rng, runs=runs, baseline_users=2400, candidate_users=1200, scale=1.0 + margin, quantile=0.9,
                    margin=margin, alpha=alpha, looks=40)  # fmt: skip
    assert safe <= alpha


def test_a_candidate_as_good_as_the_baseline_is_shown_safe() -> None:
    rng = np.random.default_rng(5)
    _, safe = _ever(rng, runs=20, baseline_users=6000, candidate_users=6000, scale=1.0, quantile=0.9, margin=0.2,
                    alpha=0.0125, looks=10)  # fmt: skip
    assert safe >= 0.8


def test_a_doubled_p99_with_the_median_unchanged_is_caught() -> None:
    """The candidate's slowest 3 % take twice as long (p99 x 2, median unchanged): its p99 guardrail at 10 %
    breaches in every run, within 6,000 candidate sessions."""
    rng = np.random.default_rng(99)
    alpha, caught = 0.0125, 0
    cut = math.exp(MU + TOTAL_SD * special.ndtri(0.97))
    for _ in range(30):
        base = _sessions(rng, 6000)
        cand = _sessions(rng, 6000)
        cand = np.where(cand > cut, 2.0 * cand, cand)
        assert abs(np.median(cand) / np.median(base) - 1) < 0.1
        result = quantile_guardrail_check(_binned(base), _binned(cand), quantile=0.99, margin=0.1, alpha=alpha)
        caught += result.decision is Decision.BREACH
    assert caught == 30


def test_the_request_is_the_wrong_unit_and_the_session_the_right_one() -> None:
    """The one-arm sequence for the p90, checked after every observation: on each session's first request
    its misses stay under alpha; on every request of the same sticky users (correlated within a user) they
    run far over it, which is why the tail guardrail takes one request per session."""
    rng = np.random.default_rng(7)
    alpha, q, runs, users = 0.05, 0.9, 200, 1500
    true_q = math.exp(MU + TOTAL_SD * special.ndtri(q))  # requests per user do not depend on the effect
    miss_first = miss_all = 0
    lo, hi = quantile_rank_table(200_000, q, alpha=alpha, tuning_n=1000)
    for _ in range(runs):
        effect = rng.normal(0.0, USER_SD, users)
        requests = np.maximum(1, np.round(rng.lognormal(math.log(10), 1.0, users))).astype(int)
        unit = np.repeat(np.arange(users), requests)
        # Users arrive one after another and send their requests over overlapping stretches.
        times = (rng.random(users) * 0.02 + np.arange(users) / users)[unit] + rng.random(unit.size) * 0.05
        latency = np.exp(MU + effect[unit] + rng.normal(0.0, REQUEST_SD, unit.size))
        by_time = np.argsort(times, kind="stable")
        for stream, counter in ((first_per_unit(unit, times, latency), "first"), (latency[by_time], "all")):
            below = np.cumsum(stream <= true_q)
            missed = bool(np.any((below < lo[1 : stream.size + 1]) | (below >= hi[1 : stream.size + 1])))
            if counter == "first":
                miss_first += missed
            else:
                miss_all += missed
    assert miss_first / runs <= alpha
    assert miss_all / runs >= 3 * alpha


def test_the_floor_and_the_arguments() -> None:
    tuning = quantile_tuning_n(quantile=0.99, alpha=0.0125, margin=0.1)
    floor = tail_min_n(quantile=0.99, alpha=0.0125, tuning_n=tuning)
    base = SortedSample.of(np.linspace(1, 2, 5000))
    just = quantile_guardrail_check(base, SortedSample.of(np.full(floor, 1.0)), quantile=0.99, margin=0.1, alpha=0.0125,
                                    tuning_n=tuning)  # fmt: skip
    before = quantile_guardrail_check(base, SortedSample.of(np.full(floor - 1, 1.0)), quantile=0.99, margin=0.1,
                                      alpha=0.0125, tuning_n=tuning)  # fmt: skip
    assert math.isfinite(just.candidate.upper) and math.isinf(before.candidate.upper)
    assert before.decision is Decision.UNDECIDED and "candidate sessions" in before.reason
    with pytest.raises(ValueError, match="quantile"):
        quantile_guardrail_check(base, base, quantile=1.0, margin=0.1)
    with pytest.raises(ValueError, match="margin"):
        quantile_guardrail_check(base, base, quantile=0.9, margin=-0.1)
    empty = quantile_guardrail_check(SortedSample.of([]), SortedSample.of([]), quantile=0.9, margin=0.1)
    assert empty.decision is Decision.UNDECIDED and empty.harm is None


def test_a_tail_slo_at_its_limit_on_first_requests_is_rarely_called_either_way() -> None:
    """A tail SLO "p99 <= x" where exactly 1 % of requests are over x, sticky users with a per-user effect
    (so some users are mostly over), watched at 20 looks: on each session's first request (what the look
    counts) the share ever called met and the share ever called breached each stay under alpha."""
    from experiments.stats import proportion_limit_check

    rng = np.random.default_rng(17)
    alpha, limit, runs, users, looks = 0.0125, 0.01, 200, 3000, 20
    threshold = TOTAL_SD * special.ndtri(1 - limit)
    safe = breach = 0
    for _ in range(runs):
        effect = rng.normal(0.0, USER_SD, users)
        over = rng.random(users) < special.ndtr((effect - threshold) / REQUEST_SD)
        decisions = set()
        for k in range(1, looks + 1):
            m = users * k // looks
            decisions.add(proportion_limit_check(float(over[:m].sum()), float(m), limit=limit, alpha=alpha, tuning_n=2000,
                                                 project=False).decision)  # fmt: skip
        safe += Decision.SAFE in decisions
        breach += Decision.BREACH in decisions
    assert safe / runs <= alpha and breach / runs <= alpha
