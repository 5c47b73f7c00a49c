"""Guardrail / non-inferiority and SLO decisions from always-valid bounds."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import optimize, stats

from experiments.stats import (
    ArmStats,
    Decision,
    compare,
    guardrail_check,
    half_width_multiplier,
    holm,
    mean_slo_check,
    tail_slo_check,
)


def _one_sided_k_by_hand(n: float, alpha: float, tuning_n: float) -> float:
    """The z where the half-normal mixture 2 / sqrt(x + 1) e^(z^2 x / (2 (x + 1))) Phi(z sqrt(x / (x + 1)))
    reaches 1 / alpha, x = n rho^2, solved with scipy."""
    x = n * (-2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))) / tuning_n

    def mixture_minus_target(z: float) -> float:
        return (2 / math.sqrt(x + 1) * math.exp(z * z * x / (2 * (x + 1)))
                * stats.norm.cdf(z * math.sqrt(x / (x + 1))) - 1 / alpha)

    return float(optimize.brentq(mixture_minus_target, 0.0, 15.0, xtol=1e-14, rtol=1e-14))


def _lognormal_arm(rng: np.random.Generator, n: int, scale: float = 1.0) -> ArmStats:
    return ArmStats.from_values(scale * 0.03 * rng.lognormal(0.0, 0.4, size=n))


def test_a_clear_regression_is_a_breach() -> None:
    rng = np.random.default_rng(31)
    result = guardrail_check(
        _lognormal_arm(rng, 5000), _lognormal_arm(rng, 2000, 1.25), margin=0.10, relative=True
    )
    assert result.decision is Decision.BREACH
    assert result.lower_bound > 0.10
    assert result.effect == pytest.approx(0.25, abs=0.03)
    assert result.p_value <= 0.05
    assert result.decision == "breach"  # a StrEnum compares equal to its stored value


def test_an_equal_candidate_is_safe_once_the_data_suffice() -> None:
    rng = np.random.default_rng(32)
    result = guardrail_check(
        _lognormal_arm(rng, 20000), _lognormal_arm(rng, 20000), margin=0.05, relative=True
    )
    assert result.decision is Decision.SAFE
    assert result.bound <= 0.05
    assert result.p_value == 1.0


def test_little_data_is_undecided() -> None:
    rng = np.random.default_rng(33)
    result = guardrail_check(
        _lognormal_arm(rng, 200), _lognormal_arm(rng, 40, 1.05), margin=0.10, relative=True
    )
    assert result.decision is Decision.UNDECIDED
    assert result.lower_bound < 0.10 < result.bound


def test_fewer_than_min_n_is_undecided_even_with_zero_variance() -> None:
    constant = ArmStats.from_values([0.03] * 10)
    result = guardrail_check(constant, constant, margin=0.1, relative=True)
    assert result.decision is Decision.UNDECIDED
    assert "min_n" in result.reason


def test_bounds_are_the_one_sided_sequence_on_the_harm_scale() -> None:
    rng = np.random.default_rng(34)
    base, cand = _lognormal_arm(rng, 3000), _lognormal_arm(rng, 1000, 1.1)
    result = guardrail_check(base, cand, margin=0.05, relative=True, tuning_n=4000)
    reference = compare(base, cand, difference="relative", method="sequential", tuning_n=4000)
    se = (reference.ci_high - reference.effect) / half_width_multiplier(n_total=4000, alpha=0.05, tuning_n=4000)
    k = _one_sided_k_by_hand(4000, 0.05, 4000)
    assert result.effect == pytest.approx(reference.effect, rel=1e-12)
    assert result.lower_bound == pytest.approx(reference.effect - k * se, rel=1e-9)
    assert result.bound == pytest.approx(reference.effect + k * se, rel=1e-9)
    # Narrower than one side of the two-sided sequence, which an earlier version read.
    assert result.bound < reference.ci_high


def test_higher_is_better_flips_the_harm() -> None:
    base = ArmStats.from_counts(9000, 10000)  # 90 % pass rate
    cand = ArmStats.from_counts(8500, 10000)  # 85 %
    result = guardrail_check(base, cand, kind="proportion", margin=0.01, direction="higher_is_better")
    assert result.decision is Decision.BREACH
    assert result.effect == pytest.approx(0.05, rel=1e-9)


def test_error_rate_guardrail_in_points() -> None:
    # "error rate not more than 0.5 points worse": 1 % vs 3 % is a breach.
    result = guardrail_check(
        ArmStats.from_counts(100, 10000), ArmStats.from_counts(90, 3000), kind="proportion", margin=0.005
    )
    assert result.decision is Decision.BREACH


def test_no_errors_yet_is_not_safe_on_a_handful_of_requests() -> None:
    zero = ArmStats.from_counts(0, 40)
    result = guardrail_check(zero, zero, kind="proportion", margin=0.005)
    assert result.decision is Decision.UNDECIDED
    many = ArmStats.from_counts(0, 200_000)
    assert guardrail_check(many, many, kind="proportion", margin=0.005).decision is Decision.SAFE


def test_a_lucky_run_without_errors_is_not_called_safe() -> None:
    # A canary at a true 2 % error rate shows no error in 225 requests about 1 % of
    # the time; the plug-in variance (0 for the canary) would then call it within
    # 0.5 points of a 1.1 % baseline.
    result = guardrail_check(
        ArmStats.from_counts(46, 4275),
        ArmStats.from_counts(0, 225),
        kind="proportion",
        margin=0.005,
        alpha=0.025,
    )
    assert result.decision is Decision.UNDECIDED
    assert result.bound > 0.01


@pytest.mark.parametrize(("n", "alpha", "tuning_n"), [(4000, 0.05, 5000), (200, 0.025, 1000), (10**6, 0.01, 5000)])
def test_the_bound_is_k_standard_errors_with_k_from_the_half_normal_mixture(
    n: int, alpha: float, tuning_n: float
) -> None:
    rng = np.random.default_rng(35)
    base, cand = ArmStats.from_values(rng.normal(1.0, 0.3, n // 2)), ArmStats.from_values(rng.normal(1.0, 0.3, n // 2))
    result = guardrail_check(base, cand, margin=0.0, alpha=alpha, tuning_n=tuning_n)
    se = math.sqrt(base.variance / base.n + cand.variance / cand.n)
    k = _one_sided_k_by_hand(n, alpha, tuning_n)
    assert result.bound - result.effect == pytest.approx(k * se, rel=1e-9)
    assert result.effect - result.lower_bound == pytest.approx(k * se, rel=1e-9)
    # Between the fixed-n one-sided quantile and the two-sided sequence's multiplier.
    assert stats.norm.ppf(1 - alpha) < k < half_width_multiplier(n_total=n, alpha=alpha, tuning_n=tuning_n)


def test_the_p_value_is_below_alpha_exactly_when_the_lower_bound_clears_the_margin() -> None:
    base = ArmStats.from_values(np.random.default_rng(36).normal(1.0, 0.3, 2000))
    for shift in np.linspace(0.0, 0.12, 25):
        cand = ArmStats(base.n, base.sum * (1 + shift), base.sum_squares * (1 + shift) ** 2)
        result = guardrail_check(base, cand, margin=0.02, relative=True, alpha=0.05)
        assert (result.p_value <= 0.05) == (result.lower_bound > 0.02), shift


def test_guardrail_p_values_combine_with_holm() -> None:
    rng = np.random.default_rng(36)
    base = _lognormal_arm(rng, 4000)
    tpot = guardrail_check(base, _lognormal_arm(rng, 2000, 1.3), margin=0.05, relative=True)
    errors = guardrail_check(
        ArmStats.from_counts(40, 4000), ArmStats.from_counts(20, 2000), kind="proportion", margin=0.005
    )
    assert holm([tpot.p_value, errors.p_value]).reject == (True, False)


def test_guardrail_false_breaches_under_a_a_stay_below_alpha() -> None:
    rng = np.random.default_rng(37)
    sims, looks, per_look, alpha = 600, 20, 50, 0.05
    x = 0.03 * rng.lognormal(0.0, 0.4, size=(2, sims, looks, per_look))
    sums = np.cumsum(x.sum(axis=3), axis=2)
    squares = np.cumsum((x * x).sum(axis=3), axis=2)
    breaches = 0
    for s in range(sims):
        for k in range(looks):
            n = per_look * (k + 1)
            result = guardrail_check(
                ArmStats(n, sums[0, s, k], squares[0, s, k]),
                ArmStats(n, sums[1, s, k], squares[1, s, k]),
                margin=0.0,
                relative=True,
                alpha=alpha,
            )
            if result.decision is Decision.BREACH:
                breaches += 1
                break
    assert breaches / sims <= alpha


def test_guardrail_look_is_cheap() -> None:
    base = ArmStats(9_500_000, 285_000.0, 9_200.0)
    cand = ArmStats(500_000, 15_600.0, 520.0)
    start = time.perf_counter()
    for _ in range(1000):
        guardrail_check(base, cand, margin=0.1, relative=True)
    assert (time.perf_counter() - start) / 1000 < 0.01


# -- tail SLO (share over a threshold) -----------------------------------------


def _wilson_by_hand(share: float, n: int, alpha: float, tuning_n: float) -> tuple[float, float]:
    c = _one_sided_k_by_hand(n, alpha, tuning_n) ** 2
    # (share - p)^2 = c p (1 - p) / n, solved for p.
    a2 = 1 + c / n
    b1 = -(2 * share + c / n)
    c0 = share * share
    root = math.sqrt(b1 * b1 - 4 * a2 * c0)
    return (-b1 - root) / (2 * a2), (-b1 + root) / (2 * a2)


@pytest.mark.parametrize(("over", "n"), [(0, 50), (3, 1000), (40, 2000), (120, 10000)])
def test_tail_bounds_solve_the_mixture_boundary(over: int, n: int) -> None:
    result = tail_slo_check(ArmStats.from_counts(over, n), max_share=0.01)
    low, high = _wilson_by_hand(over / n, n, 0.05, 5000)
    assert result.lower_bound == pytest.approx(max(low, 0.0), abs=1e-12)
    assert result.upper_bound == pytest.approx(high, rel=1e-9)
    assert result.lower_bound <= result.estimate <= result.upper_bound


def test_tail_slo_decisions() -> None:
    assert tail_slo_check(ArmStats.from_counts(0, 20), max_share=0.01).decision is Decision.UNDECIDED
    assert tail_slo_check(ArmStats.from_counts(10, 10000), max_share=0.01).decision is Decision.SAFE
    breach = tail_slo_check(ArmStats.from_counts(300, 10000), max_share=0.01)
    assert breach.decision is Decision.BREACH
    assert breach.p_value <= 0.05


def test_tail_slo_false_breaches_stay_below_alpha() -> None:
    rng = np.random.default_rng(38)
    sims, looks, per_look = 1000, 20, 300
    over = np.cumsum(rng.binomial(per_look, 0.01, size=(sims, looks)), axis=1)
    breaches = 0
    for s in range(sims):
        for k in range(looks):
            if (
                tail_slo_check(
                    ArmStats.from_counts(int(over[s, k]), per_look * (k + 1)), max_share=0.01
                ).decision
                is Decision.BREACH
            ):
                breaches += 1
                break
    assert breaches / sims <= 0.05


# -- absolute SLO on a mean ------------------------------------------------------


def test_mean_slo_check() -> None:
    rng = np.random.default_rng(39)
    fast = ArmStats.from_values(rng.normal(40.0, 10.0, size=2000))
    assert mean_slo_check(fast, threshold=50.0).decision is Decision.SAFE
    assert mean_slo_check(fast, threshold=30.0).decision is Decision.BREACH
    assert mean_slo_check(fast, threshold=40.5).decision is Decision.UNDECIDED
    # A success rate that must stay at or above 99 %.
    good = ArmStats.from_counts(19_950, 20_000)
    assert mean_slo_check(good, threshold=0.99, direction="higher_is_better").decision is Decision.SAFE
    bad = ArmStats.from_counts(19_000, 20_000)
    assert mean_slo_check(bad, threshold=0.99, direction="higher_is_better").decision is Decision.BREACH
    assert mean_slo_check(ArmStats.from_values([1.0, 2.0, 3.0]), threshold=2.0).decision is Decision.UNDECIDED
