"""The eval gate's non-inferiority tests: published values, exact error rates at the margin, and simulations.

Pass/fail suites need no Monte Carlo: the chance that a candidate exactly `max_drop` worse passes is summed
exactly over every possible outcome of the suite (the paired table is trinomial in the two discordant
counts), and the gate itself (`compare_paired` -> `gate_decide`) is checked to decide each simulated suite
exactly as that enumerated rule does. Graded scores are simulated (the Monte Carlo error is stated)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from evals.noninferiority import (
    DiscordantCounts,
    Verdict,
    _exact_p,
    binary_items_needed,
    binary_noninferiority,
    bootstrap_t_bounds,
    equal_differences_bounds,
    exact_critical_z,
    graded_noninferiority,
    tango_bounds,
    tango_z,
)
from evals.paired import PairedItem, compare_paired, gate_decide

ALPHA = 0.05
MAX_DROP = 0.02


# --- published values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "expected", "decimals"),
    [
        # Bentur et al. (2009), airway hyper-responsiveness before/after transplantation, table
        # [[1, 1], [7, 12]]: Tango's interval in Fagerland, Lydersen and Laake, "Recommended tests and
        # confidence intervals for paired binomial proportions", Statistics in Medicine 33 (2014), Table V.
        (DiscordantCounts(n=21, candidate_only=1, baseline_only=7), (-0.517, -0.026), 3),
        # Cavo et al. (2012), complete response before/after consolidation, [[59, 6], [16, 80]]: Fagerland,
        # Lydersen and Laake, Statistical Analysis of Contingency Tables (2017), chapter 8.
        (DiscordantCounts(n=161, candidate_only=6, baseline_only=16), (-0.1240, -0.0054), 4),
    ],
)
def test_tango_interval_equals_published_values(
    counts: DiscordantCounts, expected: tuple[float, float], decimals: int
) -> None:
    low, high = tango_bounds(counts, alpha=0.025)  # a two-sided 95 % interval: each end one-sided at 2.5 %
    assert (round(low, decimals), round(high, decimals)) == expected


def test_with_no_disagreement_the_bound_is_the_closed_form_never_zero() -> None:
    # b = c = 0: the restricted estimate is q = -d0, so Z(d0)^2 = n |d0| / (1 - |d0|) and the bound is
    # -z^2 / (n + z^2).
    z = stats.norm.isf(ALPHA)
    for n in (5, 50, 200, 1000):
        low, high = tango_bounds(DiscordantCounts(n=n, candidate_only=0, baseline_only=0), alpha=ALPHA)
        assert low == pytest.approx(-(z * z) / (n + z * z), rel=1e-8)
        assert high == pytest.approx(-low, rel=1e-8)


def test_five_identical_answers_never_prove_non_inferiority() -> None:
    items = [PairedItem(key=str(i), baseline=1.0, candidate=1.0) for i in range(5)]
    for binary in (True, False):
        decision = gate_decide(
            compare_paired(items, binary=binary, margin=MAX_DROP)["overall"],
            max_drop=MAX_DROP,
            min_score=None,
            alpha=ALPHA,
        )
        assert decision.verdict == "undecided" and decision.passed is False
        # z^2 (1 - m) / m = 132.6 items with no disagreement at all
        assert decision.detail["items_needed"] == 133
        assert decision.detail["low"] < -0.3
    graded = [PairedItem(key=str(i), baseline=0.8, candidate=0.8) for i in range(5)]
    decision = gate_decide(
        compare_paired(graded, binary=False, margin=MAX_DROP)["overall"],
        max_drop=MAX_DROP,
        min_score=None,
        alpha=ALPHA,
    )
    assert decision.verdict == "undecided"
    assert decision.detail["items_needed"] == 149  # ln(0.05) / ln(0.98) = 148.3
    assert decision.detail["low"] == pytest.approx(equal_differences_bounds(0.0, 5, alpha=ALPHA)[0])


def test_items_needed_matches_the_power_it_promises() -> None:
    # A suite of the size given, with a candidate as good as the baseline that disagrees with it on 10 % of
    # items each way, passes about 80 % of the time (exactly, by enumeration).
    needed = binary_items_needed(discordance=0.10, margin=MAX_DROP, alpha=ALPHA)
    rate = _pass_rate(needed, baseline_only=0.05, candidate_only=0.05)
    assert 0.75 <= rate <= 0.85, (needed, rate)


# --- the pieces the exact computation relies on ------------------------------------------------------------


@pytest.mark.parametrize("n", [20, 60, 150])
@pytest.mark.parametrize("margin", [0.01, 0.02, 0.1])
def test_z_rises_with_the_candidate_only_count(n: int, margin: float) -> None:
    # The exact p-value sums upper tails row by row (fixed number of discordant items); that needs this.
    for d in range(n + 1):
        k = np.arange(d + 1)
        assert np.all(np.diff(tango_z(k, d - k, n, -margin)) >= -1e-12)


def test_exact_p_value_equals_brute_force_over_every_table() -> None:
    n, margin = 30, 0.05
    c = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    inside = b + c <= n
    z = tango_z(c, b, n, -margin)
    for observed in [(3, 2), (8, 4), (1, 5), (0, 0)]:
        z_obs = float(tango_z(*observed, n, -margin))
        region = inside & (z >= z_obs)
        brute = 0.0
        for p_c in np.linspace(0.0, (1 - margin) / 2, 2001):
            p_b = p_c + margin
            pmf = stats.binom.pmf(c, n, p_c) * stats.binom.pmf(b, n - c, p_b / (1 - p_c))
            brute = max(brute, float(np.sum(pmf[region])))
        assert _exact_p(n, margin, z_obs) == pytest.approx(brute, rel=2e-3, abs=1e-9)


# --- the gate at its margin: exact error rates -------------------------------------------------------------


def _pass_rate(n: int, *, baseline_only: float, candidate_only: float, margin: float = MAX_DROP) -> float:
    """P(the gate passes) summed over every outcome of an n-item suite whose items go right only for the
    baseline with probability `baseline_only` and only for the candidate with `candidate_only`."""
    c = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    inside = b + c <= n
    pmf = np.where(
        inside,
        np.exp(stats.binom.logpmf(c, n, candidate_only)
               + stats.binom.logpmf(b, n - c, baseline_only / (1 - candidate_only))),
        0.0,
    )  # fmt: skip
    z = tango_z(c, b, n, -margin)
    passes = inside & (z > stats.norm.isf(ALPHA)) & (z >= exact_critical_z(n, margin, ALPHA))
    return float(np.sum(pmf[passes]))


# Disagreement patterns of a candidate exactly MAX_DROP worse: it only ever loses items, or it loses some
# and wins a few (3 % / 5 %), or the two models are quite different (10 % / 12 %, 28 % / 30 %).
AT_THE_MARGIN = [(0.02, 0.0), (0.05, 0.03), (0.12, 0.10), (0.30, 0.28)]


@pytest.mark.parametrize("n", [50, 200, 1000])
def test_a_candidate_worse_by_max_drop_passes_at_most_alpha(n: int) -> None:
    rates = {
        pattern: _pass_rate(n, baseline_only=pattern[0], candidate_only=pattern[1])
        for pattern in AT_THE_MARGIN
    }
    print(f"n={n}: false-pass rate by (baseline-only, candidate-only): {rates}")
    assert all(rate <= ALPHA for rate in rates.values()), rates
    # Not vacuous: with disagreement both ways the gate runs close to alpha.
    assert max(rates.values()) > 0.8 * ALPHA


def test_a_candidate_better_by_one_point_passes_at_least_80_percent_on_1000_items() -> None:
    # 3 % of items right only for the baseline, 4 % only for the candidate: one point better.
    rate = _pass_rate(1000, baseline_only=0.03, candidate_only=0.04)
    print(f"n=1000, better by 0.01: pass rate {rate:.4f}")
    assert rate >= 0.8


def test_the_gate_decides_each_suite_as_the_enumerated_rule() -> None:
    """compare_paired -> gate_decide on simulated suites gives, suite by suite, the decision whose error rate
    the tests above enumerate (so those rates are the gate's). Suites drawn at and near the margin."""
    rng = np.random.default_rng(20240516)
    for n, draws in ((50, 40), (200, 30), (1000, 12)):
        critical = max(stats.norm.isf(ALPHA), exact_critical_z(n, MAX_DROP, ALPHA))
        for _ in range(draws):
            base_only, cand_only = ((0.05, 0.03), (0.04, 0.04), (0.02, 0.0), (0.03, 0.04))[
                int(rng.integers(4))
            ]
            u = rng.random(n)
            both_right = rng.random(n) < 0.85
            baseline = np.where(
                u < base_only, 1.0, np.where(u < base_only + cand_only, 0.0, both_right * 1.0)
            )
            candidate = np.where(
                u < base_only, 0.0, np.where(u < base_only + cand_only, 1.0, both_right * 1.0)
            )
            items = [
                PairedItem(key=str(i), baseline=float(bb), candidate=float(cc))
                for i, (bb, cc) in enumerate(zip(baseline, candidate, strict=True))
            ]
            decision = gate_decide(
                compare_paired(items, binary=True, margin=MAX_DROP)["overall"],
                max_drop=MAX_DROP,
                min_score=None,
                alpha=ALPHA,
            )
            c = int(np.sum((candidate == 1.0) & (baseline == 0.0)))
            b = int(np.sum((candidate == 0.0) & (baseline == 1.0)))
            z = float(tango_z(c, b, n, -MAX_DROP))
            if abs(z - critical) > 1e-3:
                assert decision.passed == (z > critical), (n, b, c, z, critical, decision.reason)


def test_a_pass_needs_the_exact_test_too() -> None:
    # 50 items, 5 right only for the baseline and 8 only for the candidate, margin 0.05: Tango's bound
    # clears the margin but the exact unconditional test does not reject at 5 %.
    counts = DiscordantCounts(n=50, candidate_only=8, baseline_only=5)
    z = float(tango_z(8, 5, 50, -0.05))
    critical = exact_critical_z(50, 0.05, ALPHA)
    result = binary_noninferiority(counts, margin=0.05, alpha=ALPHA)
    if stats.norm.isf(ALPHA) < z < critical:
        assert result.verdict is Verdict.UNDECIDED and "exact test does not" in result.reason
    else:  # the example no longer sits between the two: the rule still holds
        assert result.verdict is (Verdict.PASS if z >= critical else Verdict.UNDECIDED)


# --- graded scores ---------------------------------------------------------------------------------------

# Judge rubric scores (1..5, scaled to 0, 0.25, ..., 1): most items get the same grade on both sides, some
# one grade apart, a few two. Differences -0.5..0.5 with these chances have mean exactly -0.02.
RUBRIC_STEPS = np.array([-0.5, -0.25, 0.0, 0.25, 0.5])
AT_MARGIN_CHANCES = np.array([0.03, 0.16, 0.69, 0.10, 0.02])
BETTER_CHANCES = np.array([0.02, 0.12, 0.70, 0.14, 0.02])  # mean +0.01


def _graded_pass_rate(n: int, chances: np.ndarray, reps: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    passes = 0
    for rep in range(reps):
        diffs = np.repeat(RUBRIC_STEPS, rng.multinomial(n, chances))
        result = graded_noninferiority(diffs, margin=MAX_DROP, alpha=ALPHA, resamples=999, seed=rep)
        passes += result.verdict is Verdict.PASS
    return passes / reps


@pytest.mark.parametrize("n", [50, 200, 1000])
def test_graded_gate_at_the_margin(n: int) -> None:
    assert float(RUBRIC_STEPS @ AT_MARGIN_CHANCES) == pytest.approx(-MAX_DROP)
    reps = 1000
    rate = _graded_pass_rate(n, AT_MARGIN_CHANCES, reps, seed=n)
    mc_error = math.sqrt(ALPHA * (1 - ALPHA) / reps)  # 0.0069
    print(f"graded, n={n}: false-pass rate {rate:.3f} (Monte Carlo s.e. {mc_error:.4f}, {reps} suites)")
    # The bootstrap-t is second-order accurate, not exact: at most alpha to within three Monte Carlo errors.
    assert rate <= ALPHA + 3 * mc_error


def test_graded_gate_passes_a_better_candidate_on_1000_items() -> None:
    rate = _graded_pass_rate(1000, BETTER_CHANCES, 100, seed=1)
    assert rate >= 0.9


def test_bootstrap_t_lower_side_is_longer_for_a_few_large_losses() -> None:
    # 190 items the same, 10 items one full point worse: the harm sits in the lower tail.
    diffs = np.r_[np.zeros(190), -np.ones(10)]
    low, high = bootstrap_t_bounds(diffs, alpha=0.05, resamples=4000, seed=0)
    mean = diffs.mean()
    assert mean - low > high - mean > 0
