"""The eval gate's `min_score` as a one-sided bound, not a point check: a candidate whose true score sits
exactly at the minimum passes at most alpha of the time (exactly, for pass/fail items: the binomial
distribution summed over every outcome; by simulation through compare_paired and gate_decide for graded
scores), and one clearly above it passes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from evals.noninferiority import clopper_pearson_bounds, min_score_items_needed
from evals.paired import PairedItem, compare_paired, gate_decide


@pytest.mark.parametrize("n", [50, 200, 1000])
@pytest.mark.parametrize("minimum", [0.8, 0.9, 0.97])
def test_a_pass_fail_candidate_at_the_minimum_passes_at_most_alpha(n: int, minimum: float) -> None:
    alpha = 0.05
    # Every outcome k of n items at a true accuracy of exactly the minimum: the lower bound rises with k, so
    # the gate passes exactly the k from the first passing one up, with the binomial's probability of those.
    first = next((k for k in range(n + 1) if clopper_pearson_bounds(k, n, alpha=alpha)[0] >= minimum), None)
    assert first is None or all(clopper_pearson_bounds(k, n, alpha=alpha)[0] >= minimum for k in range(first, n + 1))
    chance = float(stats.binom.sf(first - 1, n, minimum)) if first is not None else 0.0
    assert chance <= alpha
    # The old point check passed about half of them.
    point = float(stats.binom.sf(np.ceil(minimum * n) - 1, n, minimum))
    assert point > 0.4


def _items(rng: np.random.Generator, n: int, candidate: np.ndarray) -> list[PairedItem]:
    return [PairedItem(key=str(i), baseline=1.0, candidate=float(c)) for i, c in enumerate(candidate)]


def test_the_gate_passes_a_pass_fail_candidate_at_the_minimum_rarely_and_a_better_one_mostly() -> None:
    rng = np.random.default_rng(11)
    alpha, minimum, n = 0.05, 0.9, 200

    def passed(accuracy: float) -> float:
        verdicts = []
        for _ in range(100):
            right = rng.random(n) < accuracy
            items = [PairedItem(key=str(i), baseline=1.0, candidate=float(r), baseline_passed=True, candidate_passed=bool(r))
                     for i, r in enumerate(right)]  # fmt: skip
            overall = compare_paired(items, binary=True, alpha=alpha)["overall"]
            verdicts.append(gate_decide(overall, max_drop=None, min_score=minimum, alpha=alpha).verdict)
        return verdicts.count("pass") / len(verdicts)

    assert passed(minimum) <= alpha
    assert passed(0.96) >= 0.8


def test_graded_scores_at_the_minimum_pass_near_alpha() -> None:
    """Judge-rubric-like scores (a lumpy beta) with a true mean exactly at the minimum: the bootstrap-t bound
    passes about alpha of 300 suites of 200 items (second-order accurate: allowed 2.5 Monte Carlo s.e.)."""
    rng = np.random.default_rng(12)
    alpha, minimum, n, suites = 0.05, 0.7, 200, 300
    levels = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    weights = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    weights = weights / weights.sum()
    # Shift mass so the mean is exactly the minimum.
    mean = float(levels @ weights)
    adjusted = weights.copy()
    adjusted[-1] -= (mean - minimum) / 1.0
    adjusted[0] += (mean - minimum) / 1.0
    assert abs(float(levels @ adjusted) - minimum) < 1e-12 and adjusted.min() >= 0
    passes = 0
    for seed in range(suites):
        scores = rng.choice(levels, size=n, p=adjusted)
        overall = compare_paired(_items(rng, n, scores), binary=False, alpha=alpha, resamples=400, seed=seed)["overall"]
        passes += gate_decide(overall, max_drop=None, min_score=minimum, alpha=alpha).verdict == "pass"
    se = (alpha * (1 - alpha) / suites) ** 0.5
    assert passes / suites <= alpha + 2.5 * se


def test_a_clearly_good_graded_candidate_passes() -> None:
    """The same lumpy rubric scores with a true mean of 0.725, 0.075 over the minimum (3.6 standard errors
    at 200 items): the bootstrap-t bound shows the minimum in at least 90 % of 100 suites, and never fails."""
    rng = np.random.default_rng(13)
    alpha, minimum, n, suites = 0.05, 0.65, 200, 100
    levels = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    weights = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    assert float(levels @ weights) == pytest.approx(0.725)
    verdicts = []
    for seed in range(suites):
        scores = rng.choice(levels, size=n, p=weights)
        overall = compare_paired(_items(rng, n, scores), binary=False, alpha=alpha, resamples=400, seed=seed)["overall"]
        verdicts.append(gate_decide(overall, max_drop=None, min_score=minimum, alpha=alpha).verdict)
    assert verdicts.count("pass") / suites >= 0.9 and "fail" not in verdicts, verdicts.count("pass")


def test_a_small_suite_says_it_cannot_show_the_minimum_and_how_many_items_would() -> None:
    items = [PairedItem(key=str(i), baseline=1.0, candidate=1.0, baseline_passed=True, candidate_passed=True) for i in range(20)]
    overall = compare_paired(items, binary=True, alpha=0.05)["overall"]
    decision = gate_decide(overall, max_drop=None, min_score=0.9, alpha=0.05)
    # 20 of 20 right: the exact lower bound is 0.05^(1/20) = 0.861, not 0.9.
    assert decision.verdict == "undecided" and "cannot show the minimum 0.9 on 20 items" in decision.reason
    assert decision.detail["min_score_test"]["low"] == pytest.approx(0.05 ** (1 / 20))
    needed = decision.detail["min_score_test"]["items_needed"]
    assert needed is not None and needed > 20
    assert min_score_items_needed(mean=0.85, sd=0.3, minimum=0.9, alpha=0.05, binary=True) is None
    with pytest.raises(ValueError, match="bounds of the candidate's mean score"):
        gate_decide({k: v for k, v in overall.items() if k != "candidate_bounds"}, max_drop=None, min_score=0.9, alpha=0.05)
