"""Metrics over sessions, bounds made for proportions and quantiles, and the sequential sample-ratio check,
against worked examples, published formulas and independent implementations (statsmodels, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import integrate, special, stats

from experiments.stats import (
    ArmStats,
    RatioStats,
    cuped_ratio_estimates,
    min_trials,
    mixture_weight,
    proportion_bounds,
    proportion_limit_check,
    quantile_cs_ranks,
    ratio_estimate,
    srm_sequential,
)
from experiments.stats.proportions import log_mixture


def test_the_delta_method_on_a_worked_example() -> None:
    # Three sessions: (sum, requests) = (10, 2), (3, 1), (12, 3). R = 25 / 6; mean requests 2;
    # L = (a - R b) / 2 = 5/6, -7/12, -1/4 (they sum to 0); var(L) = (25/36 + 49/144 + 1/16) / 2 = 79/144;
    # Var(R) = var(L) / 3 = 79/432 (Deng, Knoblich and Lu 2018, eq. 4).
    est = ratio_estimate(RatioStats.from_units([10.0, 3.0, 12.0], [2.0, 1.0, 3.0]))
    assert est.mean == pytest.approx(25 / 6)
    assert est.variance == pytest.approx(79 / 144)
    assert est.standard_error_squared == pytest.approx(79 / 432)


def test_the_ratio_variance_is_the_cluster_robust_variance_statsmodels_computes() -> None:
    rng = np.random.default_rng(3)
    sessions = rng.integers(1, 30, size=80)  # uneven requests per session
    effect = rng.normal(0.0, 1.0, size=80)  # a per-session level: requests of one session move together
    groups = np.repeat(np.arange(80), sessions)
    y = 5.0 + effect[groups] + rng.normal(0.0, 0.5, size=groups.size)
    stats_ = RatioStats.from_units(np.bincount(groups, weights=y), sessions.astype(float))
    est = ratio_estimate(stats_)
    # A mean over requests with the Liang-Zeger sandwich by session; statsmodels' default small-sample
    # factor G / (G - 1) (N - 1) / (N - k) is G / (G - 1) for k = 1, the delta method's K - 1 denominator.
    fit = sm.OLS(y, np.ones_like(y)).fit(cov_type="cluster", cov_kwds={"groups": groups})
    assert est.mean == pytest.approx(fit.params[0])
    assert est.standard_error_squared == pytest.approx(fit.bse[0] ** 2, rel=1e-9)
    # Ignoring the sessions would claim far more precision than the data have.
    naive = ArmStats.from_values(y)
    assert naive.variance / naive.n < est.standard_error_squared / 5


def test_with_one_request_per_session_it_is_the_per_request_variance() -> None:
    rng = np.random.default_rng(4)
    x = rng.lognormal(3.0, 0.5, size=200)
    est = ratio_estimate(RatioStats.from_units(x, np.ones_like(x)))
    plain = ArmStats.from_values(x)
    assert est.mean == pytest.approx(plain.mean) and est.variance == pytest.approx(plain.variance)


def test_cuped_with_theta_pooled_is_the_ancova_estimate() -> None:
    rng = np.random.default_rng(5)
    n_b, n_c = 300, 200
    x = rng.lognormal(6.0, 0.8, size=n_b + n_c)  # prompt length, chosen before any arm answered
    treated = np.r_[np.zeros(n_b), np.ones(n_c)]
    y = 3.0 + 0.4 * np.log(x) + 0.1 * treated + rng.normal(0.0, 0.3, size=x.size)
    ones = np.ones(n_b)
    base = RatioStats.from_units(y[:n_b], ones, x[:n_b], ones)
    cand = RatioStats.from_units(y[n_b:], np.ones(n_c), x[n_b:], np.ones(n_c))
    adjusted = cuped_ratio_estimates(base, cand)
    # With one request per session, CUPED with the within-arm pooled slope is ANCOVA: y ~ 1 + treated + x.
    fit = sm.OLS(y, np.column_stack([np.ones_like(y), treated, x])).fit()
    assert adjusted.candidate.mean - adjusted.baseline.mean == pytest.approx(fit.params[1], rel=1e-9)
    assert adjusted.theta == pytest.approx(fit.params[2], rel=1e-9)
    # The variance removed: each arm's variance of y - theta x against that of y (about the squared
    # within-arm correlation of y and x, as CUPED promises), weighted by 1 / n as in the difference.
    theta = fit.params[2]
    before = y[:n_b].var(ddof=1) / n_b + y[n_b:].var(ddof=1) / n_c
    after = (y[:n_b] - theta * x[:n_b]).var(ddof=1) / n_b + (y[n_b:] - theta * x[n_b:]).var(ddof=1) / n_c
    assert adjusted.variance_reduction == pytest.approx(1 - after / before, rel=1e-9)
    assert adjusted.variance_reduction > 0.3


def _linearised(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """(x_i - R y_i) / mean(y): a ratio's per-session contributions (Deng, Knoblich and Lu 2018)."""
    return (num - num.sum() / den.sum() * den) / den.mean()


def test_cuped_on_two_covariates_is_the_pooled_regression_on_the_linearised_contributions() -> None:
    # Sessions with uneven requests, a per-session speed, a prompt-length covariate (c, d) and the same
    # metric over the session's requests before the rollout (p, q; a third of the sessions are new: 0, 0).
    rng = np.random.default_rng(8)
    arms = {}
    for name, k, shift in (("baseline", 120, 0.0), ("candidate", 90, 0.2)):
        b = rng.integers(1, 12, k).astype(float)
        speed = rng.normal(0.0, 0.5, k)
        d = b.copy()
        c = d * rng.lognormal(5.0, 0.4, k)
        q = np.where(rng.random(k) < 1 / 3, 0.0, rng.integers(1, 15, k).astype(float))
        p = q * (3.0 + speed) + np.sqrt(q) * rng.normal(0.0, 0.4, k)
        a = b * (3.0 + speed + shift) + 1e-4 * (c - 150 * d) + np.sqrt(b) * rng.normal(0.0, 0.4, k)
        arms[name] = (a, b, c, d, p, q)
    stats_ = {n: RatioStats.from_units(a, b, c, d, pre_num=p, pre_den=q) for n, (a, b, c, d, p, q) in arms.items()}
    found = cuped_ratio_estimates(stats_["baseline"], stats_["candidate"])
    assert found.covariates == ("cov", "pre")

    # By hand: per arm L and M_1, M_2; theta regresses L on M within arms (pooled); each arm's ratio moves
    # by theta . (its covariate ratios - the pooled ones); Var = var(L - theta . M) / K.
    lin = {n: (_linearised(a, b), np.column_stack([_linearised(c, d), _linearised(p, q)]))
           for n, (a, b, c, d, p, q) in arms.items()}  # fmt: skip
    ll = np.concatenate([v[0] for v in lin.values()])
    mm = np.vstack([v[1] for v in lin.values()])
    theta = np.linalg.lstsq(mm, ll, rcond=None)[0]  # each arm's L and M have mean 0: no intercepts needed
    assert found.thetas == pytest.approx(tuple(theta), rel=1e-9)
    assert found.theta == pytest.approx(theta[0], rel=1e-9)
    assert theta[1] > 0.3  # the history predicts the session's speed
    all_c = np.concatenate([v[2] for v in arms.values()]).sum() / np.concatenate([v[3] for v in arms.values()]).sum()
    all_p = np.concatenate([v[4] for v in arms.values()]).sum() / np.concatenate([v[5] for v in arms.values()]).sum()
    for name, estimate in (("baseline", found.baseline), ("candidate", found.candidate)):
        a, b, c, d, p, q = arms[name]
        ratio = a.sum() / b.sum() - theta[0] * (c.sum() / d.sum() - all_c) - theta[1] * (p.sum() / q.sum() - all_p)
        assert estimate.mean == pytest.approx(ratio, rel=1e-12)
        residual = lin[name][0] - lin[name][1] @ theta
        assert estimate.variance == pytest.approx(residual.var(ddof=1), rel=1e-9)
        assert estimate.standard_error_squared == pytest.approx(residual.var(ddof=1) / a.size, rel=1e-9)
    plain = sum(v[0].var(ddof=1) / v[0].size for v in lin.values())
    adjusted = sum((v[0] - v[1] @ theta).var(ddof=1) / v[0].size for v in lin.values())
    assert found.variance_reduction == pytest.approx(1 - adjusted / plain, rel=1e-9)
    assert found.variance_reduction > 0.2
    # The prompt's length alone removes little here; the history most of it.
    assert cuped_ratio_estimates(stats_["baseline"], stats_["candidate"], covariates=("cov",)).variance_reduction < 0.1


def test_with_one_request_per_session_two_covariate_cuped_is_ancova() -> None:
    rng = np.random.default_rng(9)
    n_b, n_c = 250, 150
    x1 = rng.lognormal(6.0, 0.8, size=n_b + n_c)
    x2 = rng.normal(3.0, 1.0, size=n_b + n_c)  # the session's mean before the rollout (one request then)
    treated = np.r_[np.zeros(n_b), np.ones(n_c)]
    y = 1.0 + 0.001 * x1 + 0.8 * x2 + 0.2 * treated + rng.normal(0.0, 0.3, size=x1.size)
    ones = np.ones(n_b + n_c)
    base = RatioStats.from_units(y[:n_b], ones[:n_b], x1[:n_b], ones[:n_b], pre_num=x2[:n_b], pre_den=ones[:n_b])
    cand = RatioStats.from_units(y[n_b:], ones[n_b:], x1[n_b:], ones[n_b:], pre_num=x2[n_b:], pre_den=ones[n_b:])
    found = cuped_ratio_estimates(base, cand)
    fit = sm.OLS(y, np.column_stack([np.ones_like(y), treated, x1, x2])).fit()
    assert found.candidate.mean - found.baseline.mean == pytest.approx(fit.params[1], rel=1e-9)
    assert found.thetas == pytest.approx(tuple(fit.params[2:]), rel=1e-9)


def test_without_history_in_one_arm_the_adjustment_uses_what_both_carry() -> None:
    rng = np.random.default_rng(10)
    a, b, c = rng.random(40), np.ones(40), rng.random(40)
    with_history = RatioStats.from_units(a, b, c, b, pre_num=a, pre_den=b)
    without = RatioStats.from_units(a[::-1], b, c[::-1], b)
    assert cuped_ratio_estimates(with_history, without).covariates == ("cov",)
    assert cuped_ratio_estimates(RatioStats.from_units(a, b), RatioStats.from_units(c, b)).variance_reduction == 0.0


def test_sums_merge_in_any_order_and_replicate() -> None:
    rng = np.random.default_rng(6)
    a, b, c = rng.random(50), rng.integers(1, 5, 50).astype(float), rng.random(50)
    whole = RatioStats.from_units(a, b, c, b)
    parts = RatioStats.from_units(a[:20], b[:20], c[:20], b[:20]) + RatioStats.from_units(a[20:], b[20:], c[20:], b[20:])
    for name, value in whole.as_dict().items():
        assert getattr(parts, name) == pytest.approx(value), name
    doubled = whole.replicated(2.0)
    assert doubled.units == 100 and ratio_estimate(doubled).mean == pytest.approx(ratio_estimate(whole).mean)


def test_the_beta_binomial_mixture_is_its_integral() -> None:
    # M_t(p0) = integral of the likelihood ratio of p against p0 under Beta(r p0, r (1 - p0)).
    p0, r, s, t = 0.02, 40.0, 3, 90
    prior = stats.beta(r * p0, r * (1 - p0))

    def integrand(p: float) -> float:
        return float(np.exp(s * np.log(p / p0) + (t - s) * np.log((1 - p) / (1 - p0))) * prior.pdf(p))

    value, _ = integrate.quad(integrand, 0, 1, points=[p0, s / t], limit=200)
    assert math.exp(log_mixture(s, t, p0, r)) == pytest.approx(value, rel=1e-6)


def test_the_weight_follows_n_star_like_the_normal_mixture() -> None:
    alpha, tuning_n = 0.05, 1000.0
    rho2 = (-2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))) / tuning_n
    assert mixture_weight(alpha=alpha, tuning_n=tuning_n) == pytest.approx(1 / rho2 - 1)


def test_the_minimum_sample_follows_from_alpha_and_the_limit() -> None:
    alpha, tuning_n = 0.0125, 1000.0
    r = mixture_weight(alpha=alpha, tuning_n=tuning_n)
    safe = min_trials(limit=0.01, alpha=alpha, tuning_n=tuning_n, all_successes=False)
    # The first t at which t requests without an error reject p = 1 %, by brute force.
    brute = next(t for t in range(1, 10_000) if log_mixture(0, t, 0.01, r) >= -math.log(alpha))
    assert safe == brute
    # No fewer than the fixed-sample exact test needs ((1 - p)^n <= alpha), and not many more.
    exact = math.ceil(math.log(alpha) / math.log(0.99))
    assert exact <= safe <= 2 * exact
    assert min_trials(limit=0.01, alpha=alpha, tuning_n=tuning_n, all_successes=True) < 10
    before = proportion_limit_check(0, safe - 1, limit=0.01, alpha=alpha, tuning_n=tuning_n)
    at = proportion_limit_check(0, safe, limit=0.01, alpha=alpha, tuning_n=tuning_n)
    assert (before.decision.value, at.decision.value) == ("undecided", "safe") and at.min_n == safe


def test_the_bounds_bracket_the_share_and_shrink() -> None:
    low, high = proportion_bounds(5, 100, alpha=0.05, tuning_n=500)
    assert 0 < low < 0.05 < high < 0.2
    low2, high2 = proportion_bounds(50, 1000, alpha=0.05, tuning_n=500)
    assert low < low2 < 0.05 < high2 < high
    # Sessions that err together carry less information: a design effect of 3 widens the bounds.
    low3, high3 = proportion_bounds(50, 1000, alpha=0.05, tuning_n=500, design_effect=3.0)
    assert low3 < low2 and high3 > high2


def test_quantile_ranks_match_the_formula_by_brute_force() -> None:
    alpha, tuning_n = 0.05, 500.0
    r = mixture_weight(alpha=alpha, tuning_n=tuning_n)
    for n, q in ((1, 0.5), (40, 0.5), (300, 0.9), (1000, 0.99), (5000, 0.99)):
        accepted = [s for s in range(n + 1) if log_mixture(s, n, q, r) < -math.log(alpha)]
        lo, hi = quantile_cs_ranks(n, q, alpha=alpha, tuning_n=tuning_n)
        assert (lo, hi) == (min(accepted), max(accepted) + 1), (n, q)
        assert accepted == list(range(min(accepted), max(accepted) + 1))  # an interval of counts


def test_the_quantile_confidence_sequence_covers_at_every_look() -> None:
    """2,000 streams of 1,500 latencies, each checked at every n: the share with any miss stays under alpha
    (Monte Carlo standard error about 0.5 points at alpha = 0.05)."""
    alpha, tuning_n, q, n_max, streams = 0.05, 500.0, 0.9, 1500, 2000
    ranks = np.array([quantile_cs_ranks(n, q, alpha=alpha, tuning_n=tuning_n) for n in range(1, n_max + 1)])
    rng = np.random.default_rng(8)
    # X_(lo) <= Q(q) < X_(hi) holds exactly when lo <= #{X <= Q(q)} < hi: count the observations below it.
    below = np.cumsum(rng.random((streams, n_max)) < q, axis=1)
    miss = (below < ranks[:, 0]) | (below >= ranks[:, 1])
    assert miss.any(axis=1).mean() <= alpha


def test_a_share_at_its_limit_is_rarely_called_either_way() -> None:
    """4,000 streams of errors at exactly the limit (1 %), looked at after every request up to 3,000: the
    share ever called a breach, and the share ever called safe, each stay under alpha (Monte Carlo standard
    error 0.3 points at alpha = 0.05)."""
    alpha, tuning_n, limit, n_max, streams = 0.05, 1000.0, 0.01, 3000, 4000
    r = mixture_weight(alpha=alpha, tuning_n=tuning_n)
    target = -math.log(alpha)
    t = np.arange(1, n_max + 1, dtype=float)
    # The decisions of proportion_limit_check are "the limit is outside the sequence": per n, the counts
    # that reject p0 = limit, above the limit (breach) or below it (safe).
    s = np.arange(0, n_max + 1, dtype=float)
    breach_from = np.full(n_max, np.inf)
    safe_to = np.full(n_max, -1.0)
    for i, n in enumerate(t):
        counts = s[: int(n) + 1]
        rejected = (special.betaln(r * limit + counts, r * (1 - limit) + n - counts) - special.betaln(r * limit, r * (1 - limit))
                    - counts * math.log(limit) - (n - counts) * math.log1p(-limit)) >= target  # fmt: skip
        above, below = rejected & (counts > n * limit), rejected & (counts < n * limit)
        if above.any():
            breach_from[i] = counts[above].min()
        if below.any():
            safe_to[i] = counts[below].max()
    spot = proportion_limit_check(float(breach_from[999]), 1000.0, limit=limit, alpha=alpha, tuning_n=tuning_n, project=False)
    assert spot.decision.value == "breach"  # the table is the function's rule
    spot = proportion_limit_check(float(breach_from[999] - 1), 1000.0, limit=limit, alpha=alpha, tuning_n=tuning_n, project=False)
    assert spot.decision.value == "undecided"
    rng = np.random.default_rng(9)
    errors = np.cumsum(rng.random((streams, n_max)) < limit, axis=1)
    assert (errors >= breach_from).any(axis=1).mean() <= alpha
    assert (errors <= safe_to).any(axis=1).mean() <= alpha


def test_the_sequential_srm_is_the_dirichlet_multinomial_bayes_factor() -> None:
    counts, weights = [530, 470], [0.5, 0.5]
    result = srm_sequential(counts, weights, tuning_n=1000)
    a = mixture_weight(alpha=0.001, tuning_n=1000) + 1.0
    log_bf = (math.lgamma(a) - math.lgamma(a + 1000) + sum(math.lgamma(a * w + n) - math.lgamma(a * w) - n * math.log(w)
                                                          for n, w in zip(counts, weights, strict=True)))  # fmt: skip
    assert result.statistic == pytest.approx(log_bf) and result.p_value == pytest.approx(min(1.0, math.exp(-log_bf)))
    assert not result.mismatch
    assert srm_sequential([600, 400], [0.5, 0.5], tuning_n=1000).mismatch


def test_sessions_at_first_exposure_do_not_raise_false_alarms_where_requests_do() -> None:
    """The issue's finding, and its fix: users sticky to an arm with lognormal request counts (median 10).
    On request counts Pearson's chi-squared flags an honest split in most single looks; on sessions the
    sequential check, looked at 30 times per rollout, flags none of 300 rollouts (standard error of a rate
    near 0 here: under 0.4 points)."""
    rng = np.random.default_rng(10)
    rollouts, users, looks = 300, 2000, 30
    candidate = rng.random((rollouts, users)) < 0.05
    per_look = np.exp(np.log(10.0) + rng.standard_normal((rollouts, users))) / looks
    requests = np.zeros((rollouts, users))
    alarmed = np.zeros(rollouts, dtype=bool)
    for _ in range(looks):
        requests += rng.poisson(per_look)
        seen = requests > 0
        base_sessions, cand_sessions = (seen & ~candidate).sum(1), (seen & candidate).sum(1)
        for i in range(rollouts):
            alarmed[i] |= srm_sequential([int(base_sessions[i]), int(cand_sessions[i])], [0.95, 0.05], tuning_n=1000).mismatch
    on_requests = [
        stats.chisquare([requests[i][~candidate[i]].sum(), requests[i][candidate[i]].sum()],
                        [requests[i].sum() * 0.95, requests[i].sum() * 0.05]).pvalue < 0.001
        for i in range(rollouts)
    ]  # fmt: skip
    assert alarmed.mean() <= 0.01
    assert np.mean(on_requests) > 0.3
