"""The shadow checks on sticky users: sessions, not pairs, are the units.

Simulated shadow traffic as real clients send it: users who stay on their session and send a heavy-tailed
number of requests each (lognormal, median 10, log-spread 1, so a few users send most of the pairs), each
user active over half of the step and arriving at any time, with an effect of their own (a kind of prompt
the candidate handles slower, or worse, than the baseline). The true effect is exactly at the margin, and
the check is looked at 20 times over the step. A decision either way must come in at most alpha of the
rollouts; a clear regression must still be caught. The same traffic read pair by pair (each pair its own
unit, as the checks did before) is printed beside it: its false breaches run several times alpha.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from experiments.analysis import PairedLatency, PairedSums
from experiments.metrics import METRICS
from experiments.stats import RatioStats
from experiments.stats.bounded import session_mean_bounds
from rollouts.analysis.shadow import shadow_latency_guardrail

ALPHA = 0.05
LOOKS = np.linspace(0.05, 1.0, 20)


def _sticky_users(rng: np.random.Generator, users: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, time in [0, 1)) of every mirrored request, in time order."""
    counts = np.maximum(1, np.round(rng.lognormal(math.log(10.0), 1.0, size=users))).astype(int)
    user = np.repeat(np.arange(users), counts)
    start = rng.uniform(-0.25, 1.0, size=users)
    at = start[user] + 0.5 * rng.random(user.size)
    keep = (at >= 0.0) & (at < 1.0)
    order = np.argsort(at[keep], kind="stable")
    return user[keep][order], at[keep][order]


def _latency_decision(
    user: np.ndarray, at: np.ndarray, log_ratio: np.ndarray, users: int, *, per_pair: bool
) -> str:
    """The first decision of a "tpot_gmean_ms within 10 %" shadow guardrail over the 20 looks."""
    guardrail, metric = SimpleNamespace(margin=0.10, relative=True), METRICS["tpot_gmean_ms"]
    for t in LOOKS:
        seen = int(np.searchsorted(at, t, side="right"))
        if per_pair:
            ones = np.ones(seen)
            sums = PairedSums.from_units(ones, 0 * ones, 0 * ones, log_ratio[:seen])
        else:
            n = np.bincount(user[:seen], minlength=users).astype(float)
            lr = np.bincount(user[:seen], weights=log_ratio[:seen], minlength=users)
            sums = PairedSums.from_units(n, 0 * n, 0 * n, lr)
        check = shadow_latency_guardrail(guardrail, metric, PairedLatency(fields={"tpot_ms": sums}), alpha=ALPHA,
                                         tuning_n=500)  # fmt: skip
        if check["decision"] != "undecided":
            return str(check["decision"])
    return "undecided"


def _latency_rollouts(seed: int, reps: int, ratio: float, *, users: int = 150) -> dict[str, dict[str, float]]:
    """Shares of `reps` shadow steps that end in each decision, sessions as units and pair by pair. Each pair's
    log ratio ln(candidate / baseline): ln(ratio), the user's own effect (sd 0.25), each side's noise (sd 0.3)
    and a 6x stall on 2 % of each side's requests."""
    rng = np.random.default_rng(seed)
    found: dict[str, dict[str, float]] = {"sessions": {}, "pairs": {}}
    for _ in range(reps):
        user, at = _sticky_users(rng, users)
        effect = rng.normal(0.0, 0.25, size=users)

        sides = rng.normal(0.0, 0.3, size=(2, user.size)) + np.where(rng.random((2, user.size)) < 0.02, math.log(6.0), 0.0)
        log_ratio = math.log(ratio) + effect[user] + sides[1] - sides[0]
        for name, per_pair in (("sessions", False), ("pairs", True)):
            decision = _latency_decision(user, at, log_ratio, users, per_pair=per_pair)
            found[name][decision] = found[name].get(decision, 0.0) + 1.0 / reps
    return found


def _quality_decision(user: np.ndarray, at: np.ndarray, scores: np.ndarray, users: int, floor: float, *,
                      per_pair: bool) -> str:  # fmt: skip
    """The first decision of the shadow-quality check (breach when the upper bound is under the floor, safe
    when the lower bound is at or over it) over the 20 looks."""
    for t in LOOKS:
        seen = int(np.searchsorted(at, t, side="right"))
        if per_pair:
            # As the check read the scores before sessions were its units: each pair its own unit.
            total, n = scores[:seen], np.ones(seen)
        else:
            n = np.bincount(user[:seen], minlength=users).astype(float)
            total = np.bincount(user[:seen], weights=scores[:seen], minlength=users)
        found = session_mean_bounds(RatioStats.from_units(total[n > 0], n[n > 0]), alpha=ALPHA)
        if found.upper < floor:
            return "breach"
        if found.lower >= floor:
            return "safe"
    return "undecided"


def _quality_rollouts(seed: int, reps: int, mean: float, floor: float, *, users: int = 150) -> dict[str, dict[str, float]]:
    """Shares of `reps` shadow steps that end in each decision. Each user's answers match the baseline's with
    a chance of their own, drawn from a Beta of mean `mean` and concentration 5 (uneven users: some prompts
    the candidate gets wrong far more often); each pair scores 0 or 1."""
    rng = np.random.default_rng(seed)
    found: dict[str, dict[str, float]] = {"sessions": {}, "pairs": {}}
    for _ in range(reps):
        user, at = _sticky_users(rng, users)
        chance = rng.beta(5.0 * mean, 5.0 * (1.0 - mean), size=users)
        scores = (rng.random(user.size) < chance[user]).astype(float)
        for name, per_pair in (("sessions", False), ("pairs", True)):
            decision = _quality_decision(user, at, scores, users, floor, per_pair=per_pair)
            found[name][decision] = found[name].get(decision, 0.0) + 1.0 / reps
    return found


def test_shadow_latency_at_its_margin_with_sticky_users_is_wrong_at_most_alpha_of_the_time() -> None:
    """400 shadow steps, candidate's geometric mean exactly 10 % slower (Monte Carlo s.e. 1.1 % at 5 %)."""
    found = _latency_rollouts(71, 400, 1.10)
    print(f"latency at the margin: sessions {found['sessions']}, pair by pair {found['pairs']}")
    assert found["sessions"].get("breach", 0.0) <= ALPHA and found["sessions"].get("safe", 0.0) <= ALPHA
    assert found["pairs"].get("breach", 0.0) > 2 * ALPHA  # what the per-pair reading did on this traffic


def test_a_shadow_candidate_50_percent_slower_is_caught_with_sticky_users() -> None:
    found = _latency_rollouts(72, 200, 1.50)
    print(f"latency +50 %: sessions {found['sessions']}")
    assert found["sessions"].get("breach", 0.0) >= 0.95 and not found["sessions"].get("safe")


def test_shadow_quality_at_its_margin_with_sticky_users_is_wrong_at_most_alpha_of_the_time() -> None:
    """400 shadow steps, the candidate matching the baseline on exactly 95 % of requests against a floor of
    0.95 (max_drop 0.05 below an exact-match reference of 1)."""
    found = _quality_rollouts(73, 400, 0.95, 0.95)
    print(f"quality at the margin: sessions {found['sessions']}, pair by pair {found['pairs']}")
    assert found["sessions"].get("breach", 0.0) <= ALPHA and found["sessions"].get("safe", 0.0) <= ALPHA
    assert found["pairs"].get("safe", 0.0) > 2 * ALPHA  # what the per-pair reading did on this traffic


def test_a_shadow_candidate_far_below_the_quality_floor_is_caught_with_sticky_users() -> None:
    found = _quality_rollouts(74, 200, 0.80, 0.95)
    print(f"quality 0.80 against 0.95: sessions {found['sessions']}")
    assert found["sessions"].get("breach", 0.0) >= 0.95 and not found["sessions"].get("safe")
