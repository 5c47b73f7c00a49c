"""A guardrail's two one-sided bounds at their own levels: the lower bound, which calls a breach, at
`breach_alpha`, the upper one, which calls the candidate safe, at `alpha` (a rollout that bakes alone gives
half of each guardrail's breach side to its check on the bake alone, `rollouts.plans.alpha`). Each test
compares with the checks run at one alpha for both bounds, so it fails if the two levels were swapped."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.stats import Decision, RatioStats
from experiments.stats.decisions import effect_check, estimate_limit_check
from experiments.stats.quantiles import SortedSample, quantile_guardrail_check
from experiments.stats.ratio_checks import ratio_guardrail_check

WIDE, NARROW = 0.002, 0.05  # the breach side's alpha, and the pass side's


def test_effect_check_puts_the_breach_bound_at_breach_alpha_and_the_pass_bound_at_alpha() -> None:
    at = {"margin": 0.1, "n_total": 4000.0, "tuning_n": 2000.0}
    mixed = effect_check(0.05, 0.001, alpha=NARROW, breach_alpha=WIDE, **at)
    wide = effect_check(0.05, 0.001, alpha=WIDE, **at)
    narrow = effect_check(0.05, 0.001, alpha=NARROW, **at)
    assert mixed.lower_bound == wide.lower_bound < narrow.lower_bound
    assert mixed.bound == narrow.bound < wide.bound
    # The p-value is the breach side's: below breach_alpha exactly when the lower bound clears the margin.
    assert mixed.p_value == wide.p_value
    assert effect_check(0.05, 0.001, alpha=NARROW, **at).alpha == NARROW  # by default both at alpha


def test_a_harm_the_pass_sides_alpha_would_call_a_breach_is_undecided_at_a_smaller_breach_alpha() -> None:
    at = {"margin": 0.1, "n_total": 4000.0, "tuning_n": 2000.0, "alpha": NARROW}
    se = 0.03
    narrow_k = (0.2 - effect_check(0.2, se * se, **at).lower_bound) / se
    wide_k = (0.2 - effect_check(0.2, se * se, **{**at, "alpha": WIDE}).lower_bound) / se
    harm = 0.1 + se * (narrow_k + wide_k) / 2.0  # past the margin by more than k(alpha) but less than k(breach_alpha)
    assert effect_check(harm, se * se, **at).decision is Decision.BREACH
    assert effect_check(harm, se * se, **at, breach_alpha=WIDE).decision is Decision.UNDECIDED
    # And the pass side is untouched: a candidate shown safe at alpha stays safe.
    good = 0.1 - se * (narrow_k + wide_k) / 2.0
    assert effect_check(good, se * se, **at, breach_alpha=WIDE).decision is Decision.SAFE
    assert effect_check(good, se * se, **{**at, "alpha": WIDE}).decision is Decision.UNDECIDED


def _log_arm(rng: np.random.Generator, n: int, shift: float) -> RatioStats:
    # One request per session, its log latency: the log scale's ratio is the mean log latency.
    return RatioStats.from_units(rng.normal(3.0 + shift, 0.5, n), np.ones(n))


@pytest.mark.parametrize("scale", ["log", "proportion"])
def test_ratio_guardrail_check_puts_the_breach_bound_at_breach_alpha(scale: str) -> None:
    rng = np.random.default_rng(5)
    if scale == "log":
        base, cand = _log_arm(rng, 2000, 0.0), _log_arm(rng, 2000, 0.05)
        options = {"scale": "log", "margin": 0.1, "relative": True}
    else:
        base = RatioStats.from_units((rng.random(3000) < 0.02).astype(float), np.ones(3000))
        cand = RatioStats.from_units((rng.random(3000) < 0.03).astype(float), np.ones(3000))
        options = {"scale": "proportion", "margin": 0.01, "relative": False}
    options |= {"tuning_n": 4000.0, "breach_tuning_n": 1000.0}
    mixed = ratio_guardrail_check(base, cand, alpha=NARROW, breach_alpha=WIDE, **options)
    wide = ratio_guardrail_check(base, cand, alpha=WIDE, **options)
    narrow = ratio_guardrail_check(base, cand, alpha=NARROW, **options)
    assert mixed.harm_low == pytest.approx(wide.harm_low) and mixed.harm_low < narrow.harm_low
    assert mixed.harm_high == pytest.approx(narrow.harm_high) and mixed.harm_high < wide.harm_high
    assert mixed.p_value == pytest.approx(wide.p_value)


def test_quantile_guardrail_check_puts_the_breach_bounds_at_breach_alpha() -> None:
    rng = np.random.default_rng(6)
    base = SortedSample.of(rng.lognormal(3.0, 0.5, 3000))
    cand = SortedSample.of(rng.lognormal(3.1, 0.5, 3000))
    options = {"quantile": 0.9, "margin": 0.1, "tuning_n": 3000.0, "project": False}
    mixed = quantile_guardrail_check(base, cand, alpha=NARROW, breach_alpha=WIDE, **options)
    wide = quantile_guardrail_check(base, cand, alpha=WIDE, **options)
    narrow = quantile_guardrail_check(base, cand, alpha=NARROW, **options)
    assert mixed.harm_low == wide.harm_low < narrow.harm_low
    assert mixed.harm_high == narrow.harm_high < wide.harm_high
    # Its own N* for the breach side: the breach bounds move with it, the pass bounds do not.
    own = quantile_guardrail_check(base, cand, alpha=NARROW, breach_alpha=WIDE, breach_tuning_n=300.0, **options)
    assert own.harm_high == mixed.harm_high and own.harm_low != mixed.harm_low


@pytest.mark.parametrize("direction", ["lower_is_better", "higher_is_better"])
def test_a_limit_checks_breach_side_at_breach_alpha(direction: str) -> None:
    at = {"threshold": 1.0, "n_total": 500.0, "tuning_n": 500.0, "direction": direction}
    mixed = estimate_limit_check(1.0, 0.01, alpha=NARROW, breach_alpha=WIDE, **at)
    wide = estimate_limit_check(1.0, 0.01, alpha=WIDE, **at)
    narrow = estimate_limit_check(1.0, 0.01, alpha=NARROW, **at)
    if direction == "lower_is_better":  # the lower bound calls a breach
        assert (mixed.lower_bound, mixed.upper_bound) == (wide.lower_bound, narrow.upper_bound)
    else:
        assert (mixed.lower_bound, mixed.upper_bound) == (narrow.lower_bound, wide.upper_bound)
    assert wide.upper_bound - wide.lower_bound > mixed.upper_bound - mixed.lower_bound > narrow.upper_bound - narrow.lower_bound
