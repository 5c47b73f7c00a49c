"""The bake after promotion proved by simulation (`tests/rollouts/policy_sim.py`: whole rollouts on sticky,
heavy-tailed traffic with the real TPOT guardrail check and the policy's rules, without the database).

The bake (`rollouts.analysis.policy._decide_bake`): the candidate serves all but the plan's holdout (5 % of
sessions, the ones the earlier steps kept on the baseline) for `bake_s` (600 s here, the default), compared
with the holdout on the same checks, its stratum pooled with the steps' (one sequence per check for the
whole rollout), and each guardrail also on the bake's stratum alone ("<guardrail> (bake alone)",
`rollouts.analysis.checks.bake_alone_checks`), a check with half of its guardrail's breach side
(`rollouts.plans.alpha`: the demo canary's 3 checks keep 0.0167 each; the TPOT guardrail's lower bound runs
at 0.0083 in its pooled check and 0.0083 in its check on the bake alone). A breach of either rolls back; the
end of the bake promotes.

- At the margin: a candidate exactly at its TPOT margin through the steps and the bake, brought to the bake
  as a person or `on_inconclusive: advance` would bring it (its steps cannot show it safe), is rolled back
  over the whole rollout, bake included, at most alpha of the time; so is one as good as the baseline in its
  steps and exactly at its margin in the bake alone (the bake-alone check's own false breaches).
- A regression that appears only after promotion (under the full load): the pooled check sees it only in
  proportion to the bake's share of the evidence (the holdout is small: about 1 request/s here, 600
  candidate-weighted requests over the bake against the steps' 500 or so), so with the pooled check alone a
  bake-only TPOT x2.25 (twice the margin on the log scale) was rolled back in 0 of 40 rollouts, x3 in 26
  of 40, x4 in 40 of 40 (at the second test's seed, 1712; the pooled check at 0.0167 before the bake-alone
  check). The bake-alone check sees it undiluted: x2.25 is rolled back in 40 of 40 at seed 1712 (38 of 40
  at seeds 1715 and 1716), x3 and x4 in 40 of 40, each by the bake-alone check. Milder ones, at seed 1714:
  x1.75 in 13 of 40, x2 in 36 of 40. (With a share of its own, 0.01 of 5 checks, the same but 39 of 40 at
  seed 1715.)
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


def test_a_candidate_at_the_margin_in_the_bake_alone_is_rolled_back_at_most_alpha_of_the_time() -> None:
    plan = _plan()
    ended = simulate(plan, effect=Effect(), bake_effect=Effect(tpot_factor=1.5), seed=1714, sims=80, looks=LOOKS,
                     look_s=20.0, metrics=("tpot_gmean_ms",))  # fmt: skip
    assert ended.rolled_back.mean() <= plan.alpha, ended.rolled_back.mean()  # 1/80, by the bake-alone check
    assert ended.promoted.mean() >= 0.9, ended.promoted.mean()  # 79/80


def test_a_regression_of_twice_the_margin_that_appears_in_the_bake_is_rolled_back_by_the_bake_alone_check() -> None:
    ended = simulate(_plan(), effect=Effect(), bake_effect=Effect(tpot_factor=2.25), seed=1712, sims=40, looks=LOOKS,
                     look_s=20.0, metrics=("tpot_gmean_ms",))  # fmt: skip
    # 40/40 (the pooled check alone: 0/40); 38/40 at seeds 1715 and 1716.
    assert ended.rolled_back_in_bake.mean() >= 0.9, ended.rolled_back_in_bake.mean()
    assert ended.rolled_back_by_bake_alone.mean() >= 0.9, ended.rolled_back_by_bake_alone.mean()


def test_a_regression_of_three_times_that_appears_in_the_bake_is_rolled_back() -> None:
    ended = simulate(_plan(), effect=Effect(), bake_effect=Effect(tpot_factor=3.0), seed=1712, sims=40, looks=LOOKS,
                     look_s=20.0, metrics=("tpot_gmean_ms",))  # fmt: skip
    assert ended.rolled_back_in_bake.mean() >= 0.95, ended.rolled_back_in_bake.mean()  # 40/40 (pooled alone: 26/40)
    assert not ended.promoted.any()


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
