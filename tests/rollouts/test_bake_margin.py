"""The bake after promotion proved by simulation (`tests/rollouts/policy_sim.py`: whole rollouts on sticky,
heavy-tailed traffic with the real TPOT guardrail check and the policy's rules, without the database).

The bake (`rollouts.analysis.policy._decide_bake`): the candidate serves all but the plan's holdout (5 % of
sessions, the ones the earlier steps kept on the baseline) for `bake_s` (600 s here, the default), compared
with the holdout on the same checks, its stratum pooled with the steps' (one sequence per check for the
whole rollout: the bake spends no alpha of its own). A breach rolls back; the end of the bake promotes.

- At the margin: a candidate exactly at its TPOT margin through the steps and the bake, brought to the bake
  as a person or `on_inconclusive: advance` would bring it (its steps cannot show it safe), is rolled back
  over the whole rollout, bake included, at most alpha of the time: the bake adds looks to the same
  always-valid sequence, not a new test.
- A regression that appears only after promotion (under the full load) is seen through the pooled evidence,
  so only in proportion to the bake's share of it: the holdout is small (about 1 request/s here, 600
  candidate-weighted requests over the bake against the steps' 500 or so). Measured on this plan (the
  demo canary, 25 % -> 50 % -> 100 %, TPOT margin 50 %; 40 rollouts each at the second test's seed): a
  bake-only TPOT x2.25 (twice the margin on the log scale) was rolled back in 0 of 40, x3 in 26 of 40, x4
  in 40 of 40. What the bake promises is the last: a gross regression under full load (here x4, 3.4 margins on the
  log scale) is rolled back before the bake ends. A milder one needs a longer bake, a larger holdout, or
  its own check (not built: it would need alpha of its own).
- A/A through the bake: never rolled back more than alpha, promoted by the bake's end.

Only the TPOT guardrail is computed (the plan's error-rate checks can only hold a step longer or breach on
errors, which are the same in both arms here). Looks every 20 s.
"""

from __future__ import annotations

from experiments.stats.simulation import Effect
from rollouts.demo import DEMO_PLANS
from rollouts.plans import Plan, plan_normalise
from tests.rollouts.policy_sim import simulate

LOOKS = 90  # 30 minutes: the steps, to their planned samples at the margin, and the 10-minute bake


def _plan() -> Plan:
    return plan_normalise({**DEMO_PLANS["adder"], "on_inconclusive": "advance", "bake_s": 600})


def test_a_candidate_at_the_margin_through_the_bake_is_rolled_back_at_most_alpha_of_the_time() -> None:
    plan = _plan()
    ended = simulate(plan, effect=Effect(tpot_factor=1.5), seed=1711, sims=40, looks=LOOKS, look_s=20.0,
                     metrics=("tpot_gmean_ms",))  # fmt: skip
    assert ended.rolled_back.mean() <= plan.alpha, ended.rolled_back.mean()  # 0/40 at this seed
    assert ended.promoted.mean() >= 0.9, ended.promoted.mean()  # 40/40: it did reach and pass the bake


def test_a_gross_regression_that_appears_in_the_bake_is_rolled_back_before_it_ends() -> None:
    ended = simulate(_plan(), effect=Effect(), bake_effect=Effect(tpot_factor=4.0), seed=1712, sims=40, looks=LOOKS,
                     look_s=20.0, metrics=("tpot_gmean_ms",))  # fmt: skip
    assert ended.rolled_back_in_bake.mean() >= 0.95, ended.rolled_back_in_bake.mean()  # 40/40
    assert not ended.promoted.any()


def test_an_aa_candidate_passes_its_bake() -> None:
    plan = _plan()
    ended = simulate(plan, effect=Effect(), seed=1713, sims=40, looks=LOOKS, look_s=20.0, metrics=("tpot_gmean_ms",))
    assert ended.rolled_back.mean() <= plan.alpha, ended.rolled_back.mean()
    assert ended.promoted.mean() >= 0.95, ended.promoted.mean()  # 40/40
