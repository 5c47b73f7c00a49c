"""The always-valid bounds for [0, 1] means (shadow quality): the paper's formula, no zero width, and
coverage across every look, simulated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments.stats.bounded import _lower_path, bounded_mean_bounds, bounded_mean_n_needed


def test_the_lower_path_is_the_papers_formula_written_out_step_by_step() -> None:
    # Waudby-Smith and Ramdas (2024), Theorem 2 with eqs. 13-15, one-sided: a plain loop, no numpy tricks.
    x = [0.9, 0.1, 1.0, 0.5, 0.75, 0.0, 1.0, 0.6]
    alpha = 0.05
    log_term = math.log(1 / alpha)
    total, sq_total, num, den, penalty = 0.0, 0.0, 0.0, 0.0, 0.0
    mu_prev, sq_prev = 0.5, 0.25
    expected = []
    for t, value in enumerate(x, start=1):
        lam = min(math.sqrt(2 * log_term / (sq_prev * t * math.log(1 + t))), 0.5)
        penalty += 4 * (value - mu_prev) ** 2 * (-math.log(1 - lam) - lam) / 4
        num += lam * value
        den += lam
        expected.append((num - log_term - penalty) / den)
        total += value
        mu = (0.5 + total) / (t + 1)
        sq_total += (value - mu) ** 2
        mu_prev, sq_prev = mu, (0.25 + sq_total) / (t + 1)
    assert _lower_path(np.array(x), log_term) == pytest.approx(expected, rel=1e-12)


def test_ten_equal_scores_are_not_certainty() -> None:
    zeros = bounded_mean_bounds([0.0] * 10, alpha=0.05)
    ones = bounded_mean_bounds([1.0] * 10, alpha=0.05)
    assert zeros.lower == 0.0 and zeros.upper > 0.5
    assert ones.upper == 1.0 and ones.lower < 0.5
    empty = bounded_mean_bounds([], alpha=0.05)
    assert (empty.n, empty.lower, empty.upper) == (0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bounded_mean_bounds([0.5, 1.5], alpha=0.05)


@pytest.mark.parametrize("truth", ["bernoulli", "rubric"])
def test_coverage_holds_at_every_look(truth: str) -> None:
    """1,000 sequences of 1,000 values, looked at after every value: the running bounds exclude the true mean
    at some look in at most alpha of them (each side; Monte Carlo s.e. 0.7 %). A shadow-quality floor at the
    true mean is thus called safe (or breached) at some look at most alpha of the time."""
    rng = np.random.default_rng(16)
    alpha, reps, n = 0.05, 1000, 1000
    if truth == "bernoulli":
        mean = 0.9
        draws = (rng.random((reps, n)) < mean).astype(float)
    else:
        grades = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
        chances = np.array([0.05, 0.15, 0.3, 0.3, 0.2])
        mean = float(grades @ chances)
        draws = grades[rng.choice(5, size=(reps, n), p=chances)]
    log_term = math.log(1 / alpha)
    low_miss = np.mean([np.max(_lower_path(row, log_term)) > mean for row in draws])
    high_miss = np.mean([np.max(_lower_path(1 - row, log_term)) > 1 - mean for row in draws])
    print(f"{truth}: missed the mean at some look: below {low_miss:.4f}, above {high_miss:.4f}")
    assert low_miss <= alpha and high_miss <= alpha


def test_pairs_needed_is_about_where_the_sequence_gets_there() -> None:
    rng = np.random.default_rng(3)
    needed = bounded_mean_n_needed(mean=0.9, sd=0.3, gap=0.05, alpha=0.05)
    assert needed is not None and 100 < needed < 2000
    widths = []
    for _ in range(200):
        x = (rng.random(needed) < 0.9).astype(float)
        widths.append(x.mean() - bounded_mean_bounds(x, alpha=0.05).lower)
    assert float(np.median(widths)) == pytest.approx(0.05, rel=0.25)
    assert bounded_mean_n_needed(mean=0.9, sd=0.3, gap=0.0, alpha=0.05) is None


def test_scores_over_sessions_are_wilson_like_on_single_pairs_and_never_zero_wide() -> None:
    """session_mean_bounds: with every score its own session the bounds are a Wilson-like interval around the
    share; equal scores give a bound of some width; clustering widens it; under 30 sessions it is [0, 1]."""
    from experiments.stats import RatioStats
    from experiments.stats.bounded import session_mean_bounds

    ones = np.ones(40)
    equal = session_mean_bounds(RatioStats.from_units(ones, ones), alpha=0.05)
    assert equal.mean == 1.0 and equal.upper == 1.0 and 0.5 < equal.lower < 0.97
    scores = (np.arange(400) % 10 != 0).astype(float)  # 90 %, single pairs
    single = session_mean_bounds(RatioStats.from_units(scores, np.ones(400)), alpha=0.05)
    assert single.units == single.n == 400 and single.lower < 0.9 < single.upper
    assert single.sd == pytest.approx(0.3, rel=0.01)
    # The same 400 scores in 40 sessions of 10, each session all right or all wrong: far wider.
    clustered = session_mean_bounds(RatioStats.from_units(10 * scores[:40], 10 * np.ones(40)), alpha=0.05)
    assert clustered.units == 40 and clustered.n == 400 and clustered.mean == pytest.approx(single.mean)
    assert clustered.upper - clustered.lower > 2.5 * (single.upper - single.lower)
    few = session_mean_bounds(RatioStats.from_units(ones[:29], ones[:29]), alpha=0.05)
    assert (few.lower, few.upper) == (0.0, 1.0)
