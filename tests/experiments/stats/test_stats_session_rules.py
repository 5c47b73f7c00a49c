"""The decision rules on traffic that looks real (`experiments.stats.simulation`): users sticky to an arm,
lognormal requests per user (median 10), a per-user latency factor, a heavy Pareto tail on 2 % of requests,
error rates that differ by user. Each rule is looked at after every interval, as the rollout does, with the
truth exactly at its margin (false breaches and false passes must stay within alpha) and with a clear
regression (it must be caught).

Sizes: 200 simulated rollouts per case, 15 looks each, 800 users. With alpha = 0.05 the Monte Carlo
standard error of a rate near alpha is about 1.5 points; the rules sit well under alpha (they are
conservative at the margin), so each case asserts "at most alpha" with that margin to spare. Fixed seeds."""

from __future__ import annotations

import numpy as np

from experiments.stats import (
    Decision,
    RatioStats,
    cuped_ratio_estimates,
    design_effect,
    proportion_limit_check,
    ratio_guardrail_check,
    step_tuning_n,
)
from experiments.stats.simulation import Effect, SimLook, Traffic, simulate

ALPHA = 0.05
SIMS, LOOKS = 200, 15
TRAFFIC = Traffic(users=800)


def _tuning_n(weight: float) -> float:
    return step_tuning_n(candidate_share=weight, min_candidate_requests=50)


def _run_guardrail(
    looks: list[SimLook], *, metric: str, scale: str, margin: float, relative: bool, weight: float
) -> dict[str, np.ndarray]:
    """Per simulated rollout: ever breached, ever safe, candidate requests at the first breach."""
    breach = np.zeros(SIMS, dtype=bool)
    safe = np.zeros(SIMS, dtype=bool)
    at = np.full(SIMS, np.inf)
    reductions = []
    for index, look in enumerate(looks):
        base, cand = look.arms["baseline"], look.arms["candidate"]
        for s in np.flatnonzero(~breach):
            result = ratio_guardrail_check(
                base.ratio(metric, s), cand.ratio(metric, s), scale=scale, margin=margin, relative=relative,
                alpha=ALPHA, tuning_n=_tuning_n(weight),
            )  # fmt: skip
            if result.decision is Decision.BREACH:
                breach[s], at[s] = True, cand.requests[s]
            elif result.decision is Decision.SAFE:
                safe[s] = True
            if index == len(looks) - 1:
                reductions.append(result.variance_reduction)
    return {"breach": breach, "safe": safe, "at": at, "reduction": np.array(reductions)}


def test_a_tpot_guardrail_at_its_margin_is_wrong_at_most_alpha_of_the_time() -> None:
    # The candidate's TPOT is exactly 10 % slower (the margin): calling it a breach or calling it safe is
    # wrong either way. Prompt length explains part of TPOT, so the regression adjustment has work to do.
    traffic = TRAFFIC.with_(chars_slope=0.6)
    for weight, seed in ((0.1, 11), (0.5, 12)):
        looks = list(simulate(traffic, Effect(tpot_factor=1.10), sims=SIMS, looks=LOOKS, weight=weight, seed=seed))
        found = _run_guardrail(looks, metric="tpot_log", scale="log", margin=0.10, relative=True, weight=weight)
        assert found["breach"].mean() <= ALPHA, weight
        assert found["safe"].mean() <= ALPHA, weight
        assert np.median(found["reduction"]) > 0.03  # the adjustment removed variance (shown on the page)


def test_at_its_margin_with_the_sessions_history_it_is_still_wrong_at_most_alpha() -> None:
    # As above, and the users used the alias before the rollout (the part of their visit before it started,
    # and for 60 % an earlier visit), with the same per-user slowness: the second covariate removes most of
    # the users' own speed, theta pooled across arms, so the bounds tighten; at the margin they must stay
    # valid over every look, whichever arm the sticky, heavy-tailed users landed on.
    traffic = TRAFFIC.with_(history=True)
    for weight, seed in ((0.1, 15), (0.5, 16)):
        looks = list(simulate(traffic, Effect(tpot_factor=1.10), sims=SIMS, looks=LOOKS, weight=weight, seed=seed))
        found = _run_guardrail(looks, metric="tpot_log", scale="log", margin=0.10, relative=True, weight=weight)
        assert found["breach"].mean() <= ALPHA, weight
        assert found["safe"].mean() <= ALPHA, weight
        assert np.median(found["reduction"]) > 0.3  # the history explains much of the users' spread
        last = looks[-1]
        assert "pre" in cuped_ratio_estimates(last.arms["baseline"].ratio("tpot_log", 0),
                                              last.arms["candidate"].ratio("tpot_log", 0)).covariates  # fmt: skip


def test_a_clear_tpot_regression_is_caught_within_the_first_step() -> None:
    looks = list(simulate(TRAFFIC.with_(users=2000), Effect(tpot_factor=1.5), sims=SIMS, looks=LOOKS, weight=0.1, seed=13))
    found = _run_guardrail(looks, metric="tpot_log", scale="log", margin=0.10, relative=True, weight=0.1)
    assert found["breach"].mean() >= 0.95
    assert np.median(found["at"]) < 200  # candidate requests: 50 % slower is plain on the log scale


def test_a_clear_tpot_regression_is_caught_with_the_sessions_history_too() -> None:
    # The history covariate must tighten the bounds, not hide a regression it cannot explain (theta is pooled
    # across arms, and the history is the baseline's for both).
    traffic = TRAFFIC.with_(users=2000, history=True)
    looks = list(simulate(traffic, Effect(tpot_factor=1.5), sims=SIMS, looks=LOOKS, weight=0.1, seed=17))
    found = _run_guardrail(looks, metric="tpot_log", scale="log", margin=0.10, relative=True, weight=0.1)
    assert found["breach"].mean() >= 0.95
    assert np.median(found["at"]) < 200


def test_a_tpot_mean_guardrail_at_its_margin_is_wrong_at_most_alpha_with_and_without_history() -> None:
    # `tpot_mean_ms`: the arithmetic mean, where the 2 % Pareto tail (infinite variance) weighs in full. The
    # candidate is exactly 10 % slower on the mean; with the prompt-length covariate alone, and with the
    # sessions' history (their mean TPOT before the rollout) as a second one.
    cases = ((TRAFFIC.with_(chars_slope=0.6), 0.1, 21), (TRAFFIC.with_(chars_slope=0.6), 0.5, 22),
             (TRAFFIC.with_(history=True), 0.1, 25), (TRAFFIC.with_(history=True), 0.5, 26))  # fmt: skip
    for traffic, weight, seed in cases:
        looks = list(simulate(traffic, Effect(tpot_factor=1.10), sims=SIMS, looks=LOOKS, weight=weight, seed=seed))
        found = _run_guardrail(looks, metric="tpot", scale="mean", margin=0.10, relative=True, weight=weight)
        assert found["breach"].mean() <= ALPHA, (traffic.history, weight)
        assert found["safe"].mean() <= ALPHA, (traffic.history, weight)
        if traffic.history:
            assert np.median(found["reduction"]) > 0.2  # the users' own speed, explained by their history


def test_a_clear_regression_on_the_tpot_mean_is_caught_with_and_without_history() -> None:
    for history, seed in ((False, 23), (True, 27)):
        traffic = TRAFFIC.with_(users=2000, history=history)
        looks = list(simulate(traffic, Effect(tpot_factor=1.5), sims=SIMS, looks=LOOKS, weight=0.1, seed=seed))
        found = _run_guardrail(looks, metric="tpot", scale="mean", margin=0.10, relative=True, weight=0.1)
        assert found["breach"].mean() >= 0.95, history
        assert np.median(found["at"]) < 250, history


def test_an_error_guardrail_at_its_margin_with_rare_errors_is_wrong_at_most_alpha() -> None:
    # 0.5 % errors on the baseline, 1.5 % on the candidate: exactly the 1 point margin.
    looks = list(simulate(TRAFFIC, Effect(error_add=0.01), sims=SIMS, looks=LOOKS, weight=0.1, seed=14))
    found = _run_guardrail(looks, metric="errors", scale="proportion", margin=0.01, relative=False, weight=0.1)
    assert found["breach"].mean() <= ALPHA and found["safe"].mean() <= ALPHA


def test_an_error_slo_at_its_limit_with_users_who_err_unevenly() -> None:
    """1 % errors on the candidate against "error_rate <= 0.01", errors concentrated on some users (a Beta
    of concentration 2 across users): the design effect keeps false breaches under alpha; counting requests
    as independent does not."""
    traffic = TRAFFIC.with_(error_rate=0.01, error_concentration=2.0)
    looks = list(simulate(traffic, Effect(), sims=SIMS, looks=LOOKS, weight=0.5, seed=15))
    breach = {"sessions": np.zeros(SIMS, dtype=bool), "requests": np.zeros(SIMS, dtype=bool)}
    for look in looks:
        cand = look.arms["candidate"]
        for s in range(SIMS):
            errors: RatioStats = cand.ratio("errors", s)
            for name, deff in (("sessions", design_effect(errors)), ("requests", 1.0)):
                result = proportion_limit_check(errors.num, errors.den, limit=0.01, alpha=ALPHA, tuning_n=1000,
                                                design_effect=deff, project=False)  # fmt: skip
                breach[name][s] |= result.decision is Decision.BREACH
    assert breach["sessions"].mean() <= ALPHA
    assert breach["requests"].mean() > 2 * ALPHA


def test_evidence_pooled_across_steps_is_not_fooled_by_a_changing_split() -> None:
    """An A/A rollout in two steps, 10 % then 50 %, where everything is 60 % slower during the second step
    (the machine got busy). Merging the steps' requests compares a candidate seen mostly in the slow step
    with a baseline seen mostly in the fast one; comparing within each step and pooling the differences
    does not. The same candidate, the same margin (10 %)."""
    first = list(simulate(TRAFFIC, Effect(), sims=SIMS, looks=LOOKS, weight=0.1, seed=16))[-1]
    busy = TRAFFIC.with_(tpot_median_ms=TRAFFIC.tpot_median_ms * 1.6)
    second = list(simulate(busy, Effect(), sims=SIMS, looks=LOOKS, weight=0.5, seed=17))
    breach = {"strata": np.zeros(SIMS, dtype=bool), "merged": np.zeros(SIMS, dtype=bool)}
    for look in second:
        for s in range(SIMS):
            bases = [first.arms["baseline"].ratio("tpot_log", s), look.arms["baseline"].ratio("tpot_log", s)]
            cands = [first.arms["candidate"].ratio("tpot_log", s), look.arms["candidate"].ratio("tpot_log", s)]
            options = {"scale": "log", "margin": 0.10, "relative": True, "alpha": ALPHA, "tuning_n": _tuning_n(0.1)}
            strata = ratio_guardrail_check(bases, cands, **options)  # type: ignore[arg-type]
            merged = ratio_guardrail_check(bases[0] + bases[1], cands[0] + cands[1], **options)  # type: ignore[arg-type]
            breach["strata"][s] |= strata.decision is Decision.BREACH
            breach["merged"][s] |= merged.decision is Decision.BREACH
    assert breach["strata"].mean() <= ALPHA
    assert breach["merged"].mean() > 0.5
