"""Fixed-horizon results against scipy and statsmodels on the same data (1e-9 relative)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats import proportion as sm_proportion
from statsmodels.stats.multitest import multipletests

from experiments.stats import (
    ArmStats,
    adjust_p_values,
    benjamini_hochberg,
    compare,
    holm,
    mann_whitney,
    srm_check,
    srm_test,
)

REL = 1e-9


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.2])
def test_welch_matches_scipy(seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    a = rng.lognormal(3.0, 0.6, size=int(rng.integers(20, 400)))
    b = rng.lognormal(3.05, 0.8, size=int(rng.integers(20, 400)))
    ours = compare(ArmStats.from_values(a), ArmStats.from_values(b), method="fixed", alpha=alpha)
    theirs = stats.ttest_ind(b, a, equal_var=False)
    ci = theirs.confidence_interval(confidence_level=1 - alpha)
    assert ours.effect == pytest.approx(b.mean() - a.mean(), rel=REL)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=REL)
    assert ours.effect / ours.standard_error == pytest.approx(theirs.statistic, rel=REL)
    assert ours.df == pytest.approx(theirs.df, rel=REL)
    assert ours.ci_low == pytest.approx(ci.low, rel=REL)
    assert ours.ci_high == pytest.approx(ci.high, rel=REL)


@pytest.mark.parametrize(
    ("x_a", "n_a", "x_b", "n_b"), [(120, 1000, 150, 1000), (3, 400, 9, 350), (500, 600, 480, 610)]
)
def test_proportion_difference_matches_statsmodels_wald(x_a: int, n_a: int, x_b: int, n_b: int) -> None:
    ours = compare(
        ArmStats.from_counts(x_a, n_a), ArmStats.from_counts(x_b, n_b), kind="proportion", method="fixed"
    )
    test = sm_proportion.test_proportions_2indep(x_b, n_b, x_a, n_a, method="wald", compare="diff")
    low, high = sm_proportion.confint_proportions_2indep(
        x_b, n_b, x_a, n_a, method="wald", compare="diff", alpha=0.05
    )
    assert ours.effect == pytest.approx(x_b / n_b - x_a / n_a, rel=REL)
    assert ours.p_value == pytest.approx(test.pvalue, rel=REL)
    assert ours.ci_low == pytest.approx(low, rel=REL)
    assert ours.ci_high == pytest.approx(high, rel=REL)


def test_relative_difference_uses_the_delta_method_with_welch_df() -> None:
    rng = np.random.default_rng(11)
    a = rng.normal(50.0, 8.0, size=300)
    b = rng.normal(53.0, 10.0, size=250)
    ours = compare(
        ArmStats.from_values(a), ArmStats.from_values(b), difference="relative", method="fixed", alpha=0.05
    )
    ma, mb = a.mean(), b.mean()
    va, vb = a.var(ddof=1), b.var(ddof=1)
    na, nb = a.size, b.size
    variance = vb / (ma**2 * nb) + va * mb**2 / (ma**4 * na)
    df = stats.ttest_ind(b, a, equal_var=False).df
    t_crit = stats.t.ppf(0.975, df)
    effect = mb / ma - 1
    assert ours.effect == pytest.approx(effect, rel=REL)
    assert ours.standard_error == pytest.approx(math.sqrt(variance), rel=REL)
    assert ours.ci_low == pytest.approx(effect - t_crit * math.sqrt(variance), rel=REL)
    assert ours.ci_high == pytest.approx(effect + t_crit * math.sqrt(variance), rel=REL)
    assert ours.p_value == pytest.approx(2 * stats.t.sf(abs(effect) / math.sqrt(variance), df), rel=REL)


def test_relative_proportion_uses_normal_reference() -> None:
    ours = compare(
        ArmStats.from_counts(100, 1000),
        ArmStats.from_counts(130, 1000),
        kind="proportion",
        difference="relative",
        method="fixed",
    )
    pa, pb = 0.1, 0.13
    variance = pb * (1 - pb) / (pa**2 * 1000) + pa * (1 - pa) * pb**2 / (pa**4 * 1000)
    assert ours.effect == pytest.approx(0.3, rel=REL)
    assert ours.p_value == pytest.approx(2 * stats.norm.sf(0.3 / math.sqrt(variance)), rel=REL)
    assert math.isinf(ours.df)


def test_cuped_effect_and_theta_equal_the_ancova_regression() -> None:
    rng = np.random.default_rng(12)
    n_a, n_b = 400, 380
    y_a = rng.normal(20.0, 4.0, size=n_a)
    y_b = rng.normal(20.0, 4.0, size=n_b)
    x_a = 5.0 + 0.8 * y_a + rng.normal(0.0, 2.0, size=n_a)
    x_b = 5.5 + 0.8 * y_b + rng.normal(0.0, 2.0, size=n_b)
    ours = compare(
        ArmStats.from_values(x_a, covariate=y_a),
        ArmStats.from_values(x_b, covariate=y_b),
        method="fixed",
        cuped=True,
    )
    # x ~ 1 + treated + y: the treated coefficient is the CUPED estimate with
    # theta pooled within arms, and the y coefficient is that theta.
    x = np.concatenate([x_a, x_b])
    design = sm.add_constant(
        np.column_stack([np.r_[np.zeros(n_a), np.ones(n_b)], np.concatenate([y_a, y_b])])
    )
    fit = sm.OLS(x, design).fit()
    assert ours.effect == pytest.approx(fit.params[1], rel=REL)
    assert ours.cuped_theta == pytest.approx(fit.params[2], rel=REL)
    plain = compare(ArmStats.from_values(x_a), ArmStats.from_values(x_b), method="fixed")
    assert ours.standard_error < 0.6 * plain.standard_error


def test_ratio_metric_variance_is_the_delta_method_on_raw_units() -> None:
    rng = np.random.default_rng(13)

    def arm(n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
        requests = rng.integers(1, 20, size=n).astype(float)
        tokens = rng.poisson(rate * requests).astype(float)
        return tokens, requests

    xa, ya = arm(300, 50.0)
    xb, yb = arm(320, 52.0)
    ours = compare(
        ArmStats.from_values(xa, covariate=ya),
        ArmStats.from_values(xb, covariate=yb),
        kind="ratio",
        method="fixed",
    )

    def ratio_and_se2(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        ratio = x.sum() / y.sum()
        influence = (x - ratio * y) / y.mean()
        return ratio, influence.var(ddof=1) / x.size

    ra, va = ratio_and_se2(xa, ya)
    rb, vb = ratio_and_se2(xb, yb)
    assert ours.baseline_estimate == pytest.approx(ra, rel=REL)
    assert ours.candidate_estimate == pytest.approx(rb, rel=REL)
    assert ours.effect == pytest.approx(rb - ra, rel=REL)
    assert ours.standard_error == pytest.approx(math.sqrt(va + vb), rel=REL)


@pytest.mark.parametrize(
    ("counts", "weights"),
    [
        ([5000, 5100], [0.5, 0.5]),
        ([950, 50], [0.95, 0.05]),
        ([9300, 700], [0.95, 0.05]),
        ([100, 220, 310], [0.2, 0.3, 0.5]),
    ],
)
def test_srm_matches_scipy_chisquare(counts: list[int], weights: list[float]) -> None:
    total = sum(counts)
    theirs = stats.chisquare(counts, f_exp=[total * w for w in weights])
    assert srm_test(counts, weights) == pytest.approx(theirs.pvalue, rel=REL)
    result = srm_check(counts, weights)
    assert result.statistic == pytest.approx(theirs.statistic, rel=REL)
    assert result.mismatch == (theirs.pvalue < 0.001)


def test_srm_flags_a_broken_split_and_not_a_fair_one() -> None:
    assert srm_check([9300, 700], [0.95, 0.05]).mismatch
    assert not srm_check([9490, 510], [0.95, 0.05]).mismatch
    assert srm_test([0, 0], [0.5, 0.5]) == 1.0


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_mann_whitney_matches_scipy(alternative: str) -> None:
    rng = np.random.default_rng(14)
    a = rng.lognormal(3.0, 0.5, size=150)
    b = rng.lognormal(3.1, 0.5, size=120)
    ours = mann_whitney(a, b, alternative=alternative)
    theirs = stats.mannwhitneyu(b, a, alternative=alternative)
    assert ours.u_statistic == pytest.approx(theirs.statistic, rel=REL)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=REL)
    assert ours.shift == pytest.approx(np.median(np.subtract.outer(b, a)), rel=REL)


def test_mann_whitney_with_ties_matches_scipy() -> None:
    rng = np.random.default_rng(15)
    a = rng.integers(0, 5, size=80).astype(float)
    b = rng.integers(0, 6, size=90).astype(float)
    ours = mann_whitney(a, b)
    theirs = stats.mannwhitneyu(b, a)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=REL)
    assert ours.shift == np.median(np.subtract.outer(b, a))


@pytest.mark.parametrize("method", ["holm", "benjamini-hochberg"])
def test_multiple_testing_matches_statsmodels(method: str) -> None:
    p_values = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.5, 0.9]
    ours = adjust_p_values(p_values, method=method, alpha=0.05)
    reject, adjusted, _, _ = multipletests(
        p_values, alpha=0.05, method={"holm": "holm", "benjamini-hochberg": "fdr_bh"}[method]
    )
    assert ours.reject == tuple(bool(r) for r in reject)
    assert ours.adjusted_p_values == pytest.approx(list(adjusted), rel=REL)


def test_holm_is_stricter_than_benjamini_hochberg() -> None:
    p_values = [0.011, 0.02, 0.03, 0.04, 0.05]
    assert sum(holm(p_values).reject) == 0
    assert sum(benjamini_hochberg(p_values).reject) == 5
