"""The normal-mixture confidence sequence: published formulas, monitor, simulations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import integrate, stats

from experiments.stats import (
    ArmStats,
    Monitor,
    always_valid_p_value,
    compare,
    half_width,
    mixture_rho_squared,
    one_sided_multiplier,
    one_sided_p_value,
)

# Values computed with 40-digit decimal arithmetic straight from the formulas in
# DESIGN.md (Waudby-Smith et al. 2024, Robbins normal mixture):
# (alpha, N*, N, V, effect) -> (rho^2, half-width, p-value)
HAND_COMPUTED = [
    ((0.05, 5000, 2000, 0.009, 0.5), (0.0015872309203475131, 0.29634770510712207, 5.289047325828775e-05)),
    ((0.05, 5000, 2000, 0.009, 0.2), (0.0015872309203475131, 0.29634770510712207, 0.37704449177598496)),
    ((0.01, 10000, 50000, 0.0004, 0.05), (0.0011533741340715225, 0.07351888650760975, 0.35494885610542794)),
    ((0.1, 1000, 100, 2.5, 3.0), (0.006328859605296237, 5.732966718694549, 0.6360470365767269)),
]


def _by_hand(alpha: float, tuning_n: float, n: float, v: float, effect: float) -> tuple[float, float, float]:
    """The published equations, written out again without the package."""
    rho2 = (-2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))) / tuning_n
    half = math.sqrt(v * 2 * (n * rho2 + 1) / (n * rho2) * math.log(math.sqrt(n * rho2 + 1) / alpha))
    lam = math.exp(rho2 * n * effect**2 / (2 * v * (n * rho2 + 1))) / math.sqrt(n * rho2 + 1)
    return rho2, half, min(1.0, 1 / lam)


@pytest.mark.parametrize(("inputs", "expected"), HAND_COMPUTED)
def test_formulas_match_hand_computed_values(
    inputs: tuple[float, float, float, float, float], expected: tuple[float, float, float]
) -> None:
    alpha, tuning_n, n, v, effect = inputs
    rho2, half, p = expected
    assert mixture_rho_squared(alpha=alpha, tuning_n=tuning_n) == pytest.approx(rho2, rel=1e-12)
    assert half_width(variance=v, n_total=n, alpha=alpha, tuning_n=tuning_n) == pytest.approx(half, rel=1e-12)
    assert always_valid_p_value(
        effect=effect, variance=v, n_total=n, alpha=alpha, tuning_n=tuning_n
    ) == pytest.approx(p, rel=1e-9)
    assert _by_hand(alpha, tuning_n, n, v, effect) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("alpha", "tuning_n", "n"), [(0.05, 5000, 2000), (0.025, 1000, 60), (0.01, 200, 10**6)])
def test_the_one_sided_bound_is_where_the_half_normal_mixture_reaches_one_over_alpha(
    alpha: float, tuning_n: float, n: float
) -> None:
    # Standardised (V = 1): the mixture over lambda > 0 of exp(lambda z - lambda^2 / 2), lambda ~ N(0, x),
    # doubled; integrated numerically here, not from the closed form the package uses.
    x = n * mixture_rho_squared(alpha=alpha, tuning_n=tuning_n)

    def mixture(z: float) -> float:
        value, _ = integrate.quad(
            lambda lam: math.exp(lam * z - lam * lam / 2) * stats.norm.pdf(lam, scale=math.sqrt(x)), 0, math.inf
        )
        return 2 * value

    k = one_sided_multiplier(n_total=n, alpha=alpha, tuning_n=tuning_n)
    assert mixture(k) == pytest.approx(1 / alpha, rel=1e-7)
    # The p-value is 1 / M: alpha exactly at the bound, below it beyond.
    p_at_bound = one_sided_p_value(effect=k * 0.1, variance=0.01, n_total=n, alpha=alpha, tuning_n=tuning_n)
    assert p_at_bound == pytest.approx(alpha, rel=1e-7)
    assert one_sided_p_value(effect=1.1 * k, variance=1.0, n_total=n, alpha=alpha, tuning_n=tuning_n) < alpha
    assert one_sided_p_value(effect=-5.0, variance=1.0, n_total=n, alpha=alpha, tuning_n=tuning_n) == 1.0


def test_compare_sequential_uses_welch_variance_and_total_n() -> None:
    rng = np.random.default_rng(21)
    a = rng.normal(10.0, 2.0, size=1200)
    b = rng.normal(10.2, 2.2, size=800)
    result = compare(ArmStats.from_values(a), ArmStats.from_values(b), method="sequential", tuning_n=4000)
    v = a.var(ddof=1) / a.size + b.var(ddof=1) / b.size
    effect = b.mean() - a.mean()
    _, half, p = _by_hand(0.05, 4000, 2000, v, effect)
    assert result.effect == pytest.approx(effect, rel=1e-9)
    assert result.ci_low == pytest.approx(effect - half, rel=1e-9)
    assert result.ci_high == pytest.approx(effect + half, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-9)


def test_sequential_interval_is_wider_than_fixed() -> None:
    a = ArmStats.from_values(np.arange(100.0))
    b = ArmStats.from_values(np.arange(100.0) + 5)
    fixed = compare(a, b, method="fixed")
    sequential = compare(a, b, method="sequential")
    assert sequential.ci_high - sequential.ci_low > fixed.ci_high - fixed.ci_low
    assert sequential.p_value >= fixed.p_value


@pytest.mark.parametrize("effect", np.linspace(0.0, 0.6, 25))
def test_p_value_below_alpha_exactly_when_zero_is_outside_the_interval(effect: float) -> None:
    v, n = 0.009, 2000
    half = half_width(variance=v, n_total=n, alpha=0.05, tuning_n=5000)
    p = always_valid_p_value(effect=effect, variance=v, n_total=n, alpha=0.05, tuning_n=5000)
    assert (p <= 0.05) == (abs(effect) >= half - 1e-12)


def test_p_value_does_not_overflow_far_from_the_null() -> None:
    assert always_valid_p_value(effect=1e6, variance=1e-6, n_total=1e7, alpha=0.05, tuning_n=5000) == 0.0


def test_monitor_keeps_the_running_intersection_and_minimum_p() -> None:
    rng = np.random.default_rng(22)
    monitor = Monitor(kind="mean", alpha=0.05, tuning_n=5000)
    baseline = candidate = ArmStats.empty()
    lows, highs, ps = [], [], []
    for _ in range(10):
        baseline += ArmStats.from_values(rng.normal(10.0, 2.0, size=200))
        candidate += ArmStats.from_values(rng.normal(10.0, 2.0, size=200))
        look = compare(baseline, candidate, method="sequential")
        running = monitor.observe(baseline, candidate)
        lows.append(look.ci_low)
        highs.append(look.ci_high)
        ps.append(look.p_value)
        assert running.ci_low == pytest.approx(max(lows))
        assert running.ci_high == pytest.approx(min(highs))
        assert running.p_value == pytest.approx(min(ps))
        assert running.effect == look.effect
    assert monitor.looks == 10
    assert not monitor.drift_detected
    # The state survives a round trip through plain data (as the analysis task stores it).
    restored = Monitor(**dataclasses.asdict(monitor))
    assert restored == monitor


def test_monitor_records_drift_instead_of_an_empty_interval() -> None:
    monitor = Monitor()
    a = ArmStats.from_values(np.r_[np.zeros(500), np.ones(500)])
    monitor.observe(a, ArmStats.from_values(np.r_[np.zeros(500), np.ones(500)] + 1.0))
    before = (monitor.ci_low, monitor.ci_high)
    monitor.observe(a, ArmStats.from_values(np.r_[np.zeros(500), np.ones(500)] - 1.0))
    assert monitor.drift_detected
    assert (monitor.ci_low, monitor.ci_high) == before


def test_monitor_refuses_fixed_horizon_results() -> None:
    a = ArmStats.from_values(np.arange(10.0))
    with pytest.raises(ValueError, match="sequential"):
        Monitor().fold(compare(a, a, method="fixed"))


def _simulate_looks(
    rng: np.random.Generator, sims: int, looks: int, per_look: int, mean_b: float, sd: float
) -> tuple[np.ndarray, ...]:
    """Cumulative (n, sum, sum of squares) per arm at every look, shape (sims, looks)."""
    a = rng.normal(100.0, sd, size=(sims, looks, per_look))
    b = rng.normal(mean_b, sd, size=(sims, looks, per_look))
    cumulative = [np.cumsum(v.sum(axis=2), axis=1) for v in (a, b)]
    squares = [np.cumsum((v * v).sum(axis=2), axis=1) for v in (a, b)]
    n = per_look * np.arange(1, looks + 1)
    return n, cumulative[0], squares[0], cumulative[1], squares[1]


def test_a_a_with_twenty_looks_keeps_false_positives_at_alpha() -> None:
    rng = np.random.default_rng(2024)
    sims, looks, per_look, alpha = 1000, 20, 100, 0.05
    n, sa, qa, sb, qb = _simulate_looks(rng, sims, looks, per_look, 100.0, 20.0)
    sequential_hits = naive_hits = 0
    for s in range(sims):
        seq = naive = False
        for k in range(looks):
            base = ArmStats(int(n[k]), sa[s, k], qa[s, k])
            cand = ArmStats(int(n[k]), sb[s, k], qb[s, k])
            seq = seq or compare(base, cand, method="sequential", alpha=alpha).p_value <= alpha
            naive = naive or compare(base, cand, method="fixed", alpha=alpha).p_value <= alpha
        sequential_hits += seq
        naive_hits += naive
    sequential_rate = sequential_hits / sims
    naive_rate = naive_hits / sims
    assert sequential_rate <= alpha
    # Peeking at a fixed-horizon test 20 times: about a quarter of A/A tests "win".
    assert naive_rate > 2 * alpha
    assert naive_rate > 4 * sequential_rate


def test_a_real_two_percent_lift_is_detected() -> None:
    rng = np.random.default_rng(2025)
    sims, looks, per_look = 150, 20, 1000
    n, sa, qa, sb, qb = _simulate_looks(rng, sims, looks, per_look, 102.0, 30.0)
    detected = []
    first_look = []
    for s in range(sims):
        for k in range(looks):
            result = compare(
                ArmStats(int(n[k]), sa[s, k], qa[s, k]),
                ArmStats(int(n[k]), sb[s, k], qb[s, k]),
                difference="relative",
                method="sequential",
            )
            if result.ci_low > 0:
                detected.append(s)
                first_look.append(k + 1)
                break
    assert len(detected) / sims >= 0.95
    assert np.median(first_look) <= 10
