"""The tail SLO's rule proved at its margin by simulation, without the database: the look's own decision
(`rollouts.analysis.checks._tail_slo`, at the plan's alpha share and N*) on the candidate sessions' first
requests (`experiments.stats.quantiles.first_per_unit`, the reference of what `experiments.analysis.tails`
counts in SQL), watched at 30 looks as sessions arrive.

Traffic: sticky users with a per-user slowness, a heavy (Student t, 3 degrees of freedom) per-request tail on
the log scale, and uneven requests per user, slow users sending more of them (a lognormal count whose median
rises with the user's slowness). Every request is generated; each look takes the first request of each
session seen so far.

- At the limit: the threshold is the exact 99th percentile of a session's first request (by quadrature over
  the user's slowness), so exactly 1 % of sessions' first requests are over it. The share of runs ever
  called met, and ever called breached, each stay within alpha over all the looks.
- A clear breach (3 % of first requests over the threshold) is called breached in nearly every run and
  never met.
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
from scipy import integrate, optimize, stats

from experiments.metrics import METRICS
from experiments.stats.quantiles import first_per_unit
from rollouts.analysis.checks import _tail_slo, check_alpha_share, slo_tuning_n
from rollouts.plans import plan_normalise
from tests.rollouts.helpers import canary_plan

USER_SD, REQUEST_SCALE, REQUEST_DF = 0.5, 0.6, 3  # log scale: the user's slowness, the request's heavy tail
USERS, LOOKS = 4000, 30


def _over_share(x: float) -> float:
    """P(a session's first request is over e^x times the median): its log is the user's N(0, USER_SD)
    slowness plus a t(3) draw scaled by REQUEST_SCALE (how many requests the user sends does not matter)."""
    tail = lambda u: stats.norm.pdf(u, scale=USER_SD) * stats.t.sf((x - u) / REQUEST_SCALE, REQUEST_DF)  # noqa: E731
    return float(integrate.quad(tail, -10 * USER_SD, 10 * USER_SD, epsabs=1e-13, limit=200)[0])


def _first_over(rng: np.random.Generator, threshold: float) -> tuple[np.ndarray, float]:
    """One run's candidate sessions, in order of their first request: whether it was over the threshold
    (log scale), and the share of all requests over it."""
    slowness = rng.normal(0.0, USER_SD, USERS)
    requests = np.maximum(1, np.round(rng.lognormal(math.log(5.0) + 1.5 * slowness, 1.0))).astype(int)
    unit = np.repeat(np.arange(USERS), requests)
    start = rng.random(USERS)
    times = start[unit] + rng.exponential(0.002, unit.size)
    latency = slowness[unit] + REQUEST_SCALE * rng.standard_t(REQUEST_DF, unit.size)
    over = latency > threshold
    return first_per_unit(unit, times, over).astype(bool), float(over.mean())


@lru_cache(maxsize=1)
def _rule(alpha: float, tuning_n: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The look's rule at each look's session count n: met while at most met_max[n] of n first requests
    are over, breached from breach_min[n] over (the bounds move monotonically in the count)."""
    slo = SimpleNamespace(metric="ttft_p99_ms", threshold=800.0, label="ttft_p99_ms <= 800")
    metric = METRICS[slo.metric]
    sizes = np.array([USERS * k // LOOKS for k in range(1, LOOKS + 1)])

    def decision(over: int, n: int) -> str:
        return str(_tail_slo(slo, metric, {("ttft_ms", 800.0): (over, n)}, alpha, tuning_n)["decision"])

    def first(n: int, found: str) -> int:
        # The smallest count from which on `decision` is `found` (breach), or past which it is not (safe).
        lo, hi = -1, n + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if (decision(mid, n) == found) == (found == "breach"):
                hi = mid
            else:
                lo = mid
        return hi

    met_max = np.array([first(int(n), "safe") - 1 for n in sizes])
    breach_min = np.array([first(int(n), "breach") for n in sizes])
    for n, m, b in zip(sizes, met_max, breach_min, strict=True):  # spot-check the monotone cut-offs
        assert m < 0 or decision(int(m), int(n)) == "safe"
        assert decision(int(m) + 1, int(n)) != "safe" and decision(int(b), int(n)) == "breach"
        assert decision(int(b) - 1, int(n)) != "breach"
    return sizes, met_max, breach_min


def _ever(share: float, seed: int, runs: int) -> tuple[float, float, float]:
    """Share of runs ever called met, ever called breached, and the mean share of all requests over."""
    plan = plan_normalise(canary_plan(guardrails=[{"metric": "error_rate", "margin": 0.01}], slos=["ttft_p99_ms <= 800"]))
    (slo,) = plan.slos
    alpha = check_alpha_share(plan)
    sizes, met_max, breach_min = _rule(alpha, slo_tuning_n(plan, slo))
    threshold = optimize.brentq(lambda x: _over_share(x) - share, 0.0, 10.0, xtol=1e-12)
    rng = np.random.default_rng(seed)
    met = breach = 0
    per_request = 0.0
    for _ in range(runs):
        first, every = _first_over(rng, threshold)
        over = np.cumsum(first)[sizes - 1]
        met += bool(np.any(over <= met_max))
        breach += bool(np.any(over >= breach_min))
        per_request += every / runs
    return met / runs, breach / runs, per_request


def test_a_tail_slo_exactly_at_its_limit_is_rarely_called_either_way() -> None:
    plan = plan_normalise(canary_plan(guardrails=[{"metric": "error_rate", "margin": 0.01}], slos=["ttft_p99_ms <= 800"]))
    alpha = check_alpha_share(plan)
    met, breach, per_request = _ever(0.01, seed=61, runs=400)
    assert met <= alpha and breach <= alpha, (met, breach, alpha)
    # The slow users send more requests: per request the share is well over 1 %, which a rule counting
    # every request would call breached though the sessions' first requests sit at the limit.
    assert per_request > 0.0125


def test_a_clear_tail_slo_breach_is_caught() -> None:
    met, breach, _ = _ever(0.03, seed=62, runs=100)
    assert met == 0.0 and breach >= 0.95, (met, breach)
