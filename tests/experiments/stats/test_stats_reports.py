"""Report-side statistics: Hodges-Lehmann, bootstrap percentiles, Bayesian summary, planning."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import proportion_effectsize

from experiments.stats import (
    ArmStats,
    bayesian_summary,
    bootstrap_percentile_differences,
    compare,
    hodges_lehmann_shift,
    mann_whitney,
    nearest_rank_percentile,
    sample_size_per_arm,
    step_tuning_n,
)


@pytest.mark.parametrize("seed", [41, 42, 43])
def test_hodges_lehmann_by_selection_equals_the_direct_median(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.lognormal(3.0, 0.5, size=int(rng.integers(50, 300)))
    b = np.round(rng.lognormal(3.1, 0.5, size=int(rng.integers(50, 300))), 1)  # with ties
    direct = hodges_lehmann_shift(a, b, direct=True)
    assert direct == pytest.approx(np.median(np.subtract.outer(b, a)), rel=1e-12)
    assert hodges_lehmann_shift(a, b, direct=False) == direct
    full = mann_whitney(a, b, direct=True)
    selected = mann_whitney(a, b, direct=False)
    assert (selected.shift_ci_low, selected.shift_ci_high) == (full.shift_ci_low, full.shift_ci_high)


def test_hodges_lehmann_interval_covers_a_known_shift() -> None:
    rng = np.random.default_rng(44)
    covered = 0
    for _ in range(200):
        a = rng.exponential(1.0, size=60)
        b = rng.exponential(1.0, size=70) + 0.5
        result = mann_whitney(a, b, alpha=0.1)
        covered += result.shift_ci_low <= 0.5 <= result.shift_ci_high
    assert covered / 200 >= 0.85


def test_nearest_rank_percentile_returns_observed_values() -> None:
    values = np.arange(1.0, 101.0)
    assert nearest_rank_percentile(values, 50) == 50.0
    assert nearest_rank_percentile(values, 99) == 99.0
    assert nearest_rank_percentile(values, 99.5) == 100.0
    assert nearest_rank_percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_bootstrap_percentiles_are_seeded_and_bracket_the_estimate() -> None:
    rng = np.random.default_rng(45)
    a = 0.03 * rng.lognormal(0.0, 0.4, size=3000)
    b = 0.03 * rng.lognormal(0.1, 0.4, size=3000)
    first = bootstrap_percentile_differences(a, b, seed=3, n_resamples=500)
    again = bootstrap_percentile_differences(a, b, seed=3, n_resamples=500)
    assert first == again
    assert [r.percentile for r in first] == [50.0, 95.0, 99.0]
    for r in first:
        assert r.difference == pytest.approx(
            nearest_rank_percentile(b, r.percentile) - nearest_rank_percentile(a, r.percentile)
        )
        assert r.ci_low <= r.difference <= r.ci_high
    # A 10 % lognormal shift moves the median by about 0.1 * 30 ms = 3.2 ms.
    assert first[0].ci_low > 0


def test_bayesian_summary_matches_the_gaussian_posterior() -> None:
    rng = np.random.default_rng(46)
    base = ArmStats.from_values(rng.normal(100.0, 20.0, size=2000))
    cand = ArmStats.from_values(rng.normal(101.0, 20.0, size=2000))
    summary = bayesian_summary(base, cand, kind="mean", difference="absolute")
    fixed = compare(base, cand, method="fixed")
    mu, sd = fixed.effect, fixed.standard_error
    assert summary.chance_to_win == pytest.approx(stats.norm.cdf(mu / sd), rel=1e-9)
    loss, _ = integrate.quad(lambda d: max(0.0, -d) * stats.norm.pdf(d, mu, sd), mu - 12 * sd, mu + 12 * sd)
    assert summary.expected_loss == pytest.approx(loss, rel=1e-6)
    loss_baseline, _ = integrate.quad(
        lambda d: max(0.0, d) * stats.norm.pdf(d, mu, sd), mu - 12 * sd, mu + 12 * sd
    )
    assert summary.expected_loss_baseline == pytest.approx(loss_baseline, rel=1e-6)
    lower_better = bayesian_summary(
        base, cand, kind="mean", difference="absolute", direction="lower_is_better"
    )
    assert lower_better.chance_to_win == pytest.approx(1 - summary.chance_to_win, rel=1e-9)


def test_bayesian_prior_shrinks_towards_its_mean() -> None:
    base = ArmStats.from_counts(100, 1000)
    cand = ArmStats.from_counts(130, 1000)
    flat = bayesian_summary(base, cand, kind="proportion", difference="absolute")
    shrunk = bayesian_summary(base, cand, kind="proportion", difference="absolute", prior_sd=0.01)
    assert 0 < shrunk.posterior_mean < flat.posterior_mean
    assert shrunk.posterior_sd < flat.posterior_sd
    tau2, s2 = 0.01**2, flat.posterior_sd**2
    assert shrunk.posterior_mean == pytest.approx(flat.posterior_mean * tau2 / (tau2 + s2), rel=1e-9)


def test_sample_size_for_means_matches_statsmodels_and_the_textbook_formula() -> None:
    plan = sample_size_per_arm(kind="mean", baseline_mean=30.0, min_effect=0.05, baseline_sd=12.0)
    d = 1.5 / 12.0
    expected = TTestIndPower().solve_power(effect_size=d, alpha=0.05, power=0.8, ratio=1.0)
    assert plan.baseline_n == math.ceil(expected)
    assert plan.candidate_n == math.ceil(expected)
    textbook = 2 * (stats.norm.isf(0.025) + stats.norm.isf(0.2)) ** 2 / d**2
    assert plan.baseline_n == pytest.approx(textbook, rel=0.01)


def test_sample_size_for_proportions_with_a_small_canary() -> None:
    ratio = 0.05 / 0.95
    plan = sample_size_per_arm(
        kind="proportion",
        baseline_mean=0.01,
        min_effect=0.01,
        relative=False,
        ratio=ratio,
        alternative="larger",
    )
    h = proportion_effectsize(0.02, 0.01)
    expected = NormalIndPower().solve_power(
        effect_size=h, alpha=0.05, power=0.8, ratio=ratio, alternative="larger"
    )
    assert plan.baseline_n == math.ceil(expected)
    assert plan.candidate_n == math.ceil(expected * ratio)
    assert plan.total_n == plan.baseline_n + plan.candidate_n


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "mean", "baseline_mean": 30.0, "min_effect": 0.05}, "baseline_sd"),
        ({"kind": "mean", "baseline_mean": 30.0, "min_effect": 0.0, "baseline_sd": 1.0}, "min_effect"),
        ({"kind": "proportion", "baseline_mean": 1.5, "min_effect": 0.1}, "baseline_mean"),
        ({"kind": "proportion", "baseline_mean": 0.5, "min_effect": 0.1, "power": 1.0}, "power"),
        ({"kind": "median", "baseline_mean": 0.5, "min_effect": 0.1}, "kind"),
        (
            {
                "kind": "mean",
                "baseline_mean": 30.0,
                "min_effect": -0.05,
                "baseline_sd": 1.0,
                "alternative": "larger",
            },
            "alternative",
        ),
    ],
)
def test_sample_size_rejects_nonsense(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sample_size_per_arm(**kwargs)  # type: ignore[arg-type]


def test_a_step_tunes_n_star_to_its_expected_sample_at_the_decision() -> None:
    # 50 candidate requests at a 5 % share: 1,000 requests in all; at 50 %, 100, raised to the floor of 200.
    assert step_tuning_n(candidate_share=0.05, min_candidate_requests=50) == 1000
    assert step_tuning_n(candidate_share=0.5, min_candidate_requests=50) == 200
    assert step_tuning_n(candidate_share=0.5, min_candidate_requests=400) == 800
    # Fewer than 50 requests are taken as 50, a share under 1 % as 1 %.
    assert step_tuning_n(candidate_share=0.1, min_candidate_requests=0) == 500
    assert step_tuning_n(candidate_share=0.0, min_candidate_requests=50) == 5000
