"""The step policy proved by simulation at the margin: a canary of the slow demo's shape (`rollouts.demo`:
25 % -> 50 % -> 100 %, its minimums with their floors) whose candidate is exactly at its TPOT guardrail's
margin (10 % slower per token, on the geometric mean) is promoted at most alpha of the time; a clear
regression (50 % slower) is rolled back before the candidate has half of the traffic; and, so that the
first is not true for want of ever promoting, a candidate as fast as the baseline is promoted within the
horizon in most rollouts.

What is real: the traffic (`experiments.stats.simulation`: users arriving and leaving, sticky to an arm as
the gateway's hash makes them, so a user on the candidate at 25 % stays there at 50 %; lognormal requests
per user; a per-user latency factor; a heavy tail); the check (`ratio_guardrail_check` with the plan's
alpha share and the N* the analysis gives the guardrail, over one stratum per step as
`rollouts.analysis.checks.measure` pools them); the plan's steps as normalised (minimums with their floors,
and the policy's 60 s floor on durations); and the rule of the step policy (`rollouts.analysis.policy`): a
breach rolls back at any look; a step ends when its minimums are met and no check holds it
(`holding_checks`: at 100 % there is no baseline left to compare with). Looks every 10 s at 20 requests/s.
All of it is `tests/rollouts/policy_sim.py`'s whole-rollout simulator, run here without planned samples
and without the bake. Only the TPOT guardrail is computed: the plan's other checks can only hold a step
longer. Nothing pauses here: a step at its planned sample would pause, which can only make a false
promotion rarer, so running every rollout to the horizon instead is the harder test. The whole rollout
through the database is `benchmarks/decision_policy.py`.

Sizes: 120 rollouts per case, 30 simulated minutes each (Monte Carlo error of a rate near 5 %: 2 points;
the TPOT check's share of alpha is alpha / 3, so false promotions sit well below alpha).
"""

from __future__ import annotations

from experiments.stats.simulation import Effect
from rollouts.demo import DEMO_PLANS
from rollouts.plans import Plan, plan_normalise
from tests.rollouts.policy_sim import Ended, simulate

SIMS = 120
HORIZON = 180  # looks: 30 minutes, a look every 10 s


def _plan() -> Plan:
    # No bake: its own margin is test_bake_margin.py's.
    return plan_normalise({**DEMO_PLANS["adder-slow-demo"], "bake_s": 0})


def _run(effect: Effect, seed: int, sims: int = SIMS) -> Ended:
    plan = _plan()  # and no planned samples: nothing pauses
    return simulate(plan, effect=effect, seed=seed, sims=sims, looks=HORIZON, look_s=10.0, metrics=("tpot_gmean_ms",),
                    planned=[None] * len(plan.steps))  # fmt: skip


def test_a_candidate_exactly_at_the_tpot_margin_is_promoted_at_most_alpha_of_the_time() -> None:
    plan = _plan()
    ended = _run(Effect(tpot_factor=1.0 + 0.10), seed=171)
    assert ended.promoted.mean() <= plan.alpha, ended.promoted.mean()
    # Calling it a breach is as wrong as calling it safe: at the margin either is a false decision.
    assert ended.rolled_back.mean() <= plan.alpha, ended.rolled_back.mean()


def test_a_candidate_as_fast_as_the_baseline_is_promoted_within_the_horizon() -> None:
    ended = _run(Effect(), seed=173, sims=60)
    assert ended.promoted.mean() >= 0.5, ended.promoted.mean()  # 72 % at this seed: the rest still in a step
    assert ended.rolled_back.mean() <= 0.05


def test_a_clear_tpot_regression_is_rolled_back_before_half_of_the_traffic() -> None:
    ended = _run(Effect(tpot_factor=1.5), seed=172)
    assert ended.rolled_back_before_half.mean() >= 0.95, ended.rolled_back_before_half.mean()
    assert not ended.promoted.any()
