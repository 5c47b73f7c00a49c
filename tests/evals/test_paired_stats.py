"""Paired comparison statistics against scipy and statsmodels on fixed data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from evals.paired import (
    PairedItem,
    accuracy_difference_interval,
    compare_paired,
    gate_decide,
    mcnemar_counts,
    paired_bootstrap_interval,
    wilcoxon_p_value,
)

# 40 items: 20 right on both, 12 right only for the baseline, 3 only for the candidate, 5 on neither.
BASELINE = [True] * 20 + [True] * 12 + [False] * 3 + [False] * 5
CANDIDATE = [True] * 20 + [False] * 12 + [True] * 3 + [False] * 5


def test_mcnemar_counts_and_exact_p_value_equal_statsmodels() -> None:
    counts = mcnemar_counts(BASELINE, CANDIDATE)
    assert (counts.both_pass, counts.baseline_only, counts.candidate_only, counts.both_fail) == (20, 12, 3, 5)
    table = [[counts.both_pass, counts.baseline_only], [counts.candidate_only, counts.both_fail]]
    expected = mcnemar(table, exact=True).pvalue
    assert counts.p_value == pytest.approx(expected, rel=1e-12)
    assert counts.p_value == pytest.approx(stats.binomtest(3, 15, 0.5).pvalue, rel=1e-12)


def test_no_discordant_items_means_no_evidence_of_a_difference() -> None:
    counts = mcnemar_counts([True, False, True], [True, False, True])
    assert counts.p_value == 1.0
    assert accuracy_difference_interval(counts, alpha=0.05) == (0.0, 0.0, 0.0)


def test_accuracy_interval_is_clopper_pearson_on_the_discordant_items() -> None:
    counts = mcnemar_counts(BASELINE, CANDIDATE)
    difference, low, high = accuracy_difference_interval(counts, alpha=0.05)
    assert difference == pytest.approx((3 - 12) / 40)
    pi = stats.binomtest(3, 15).proportion_ci(confidence_level=0.95, method="exact")
    assert low == pytest.approx(15 * (2 * pi.low - 1) / 40)
    assert high == pytest.approx(15 * (2 * pi.high - 1) / 40)
    assert low < difference < high < 0


def test_paired_bootstrap_is_seeded_and_matches_scipy_bootstrap_closely() -> None:
    rng = np.random.default_rng(7)
    baseline = rng.uniform(0.4, 1.0, size=120)
    candidate = np.clip(baseline - rng.normal(0.05, 0.1, size=120), 0, 1)
    first = paired_bootstrap_interval(baseline, candidate, alpha=0.05, resamples=4000, seed=3)
    assert first == paired_bootstrap_interval(baseline, candidate, alpha=0.05, resamples=4000, seed=3)
    assert first[0] == pytest.approx(float(np.mean(candidate - baseline)))
    reference = stats.bootstrap((candidate - baseline,), np.mean, n_resamples=4000, method="percentile",
                                confidence_level=0.95, random_state=3)
    # Different random streams: equal to within the bootstrap's own noise (a small fraction of the width).
    width = reference.confidence_interval.high - reference.confidence_interval.low
    assert first[1] == pytest.approx(reference.confidence_interval.low, abs=0.1 * width)
    assert first[2] == pytest.approx(reference.confidence_interval.high, abs=0.1 * width)


def test_wilcoxon_p_value_equals_scipy() -> None:
    baseline = [0.9, 0.8, 0.7, 0.95, 0.6, 0.85, 0.75, 0.9, 0.5, 0.65]
    candidate = [0.7, 0.8, 0.5, 0.9, 0.4, 0.8, 0.7, 0.6, 0.45, 0.6]
    diffs = np.subtract(candidate, baseline)
    assert wilcoxon_p_value(baseline, candidate) == pytest.approx(
        stats.wilcoxon(diffs, zero_method="wilcox").pvalue
    )
    assert wilcoxon_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0


def _items() -> list[PairedItem]:
    return [
        PairedItem(key=str(i), baseline=float(b), candidate=float(c), baseline_passed=b, candidate_passed=c,
                   tags=("carry",) if i % 2 else ("no-carry",))
        for i, (b, c) in enumerate(zip(BASELINE, CANDIDATE, strict=True))
    ]


def test_comparison_overall_and_per_tag_is_json_and_consistent() -> None:
    items = [*_items(), PairedItem(key="lost", baseline=None, candidate=1.0, tags=("carry",))]
    result = compare_paired(items, binary=True, alpha=0.05)
    assert json.loads(json.dumps(result)) == result
    overall = result["overall"]
    assert overall["n"] == 40 and overall["missing"] == 1
    assert overall["baseline_mean"] == pytest.approx(32 / 40)
    assert overall["candidate_mean"] == pytest.approx(23 / 40)
    assert overall["mcnemar"]["baseline_only"] == 12 and overall["mcnemar"]["candidate_only"] == 3
    assert [row["tag"] for row in result["per_tag"]] == ["carry", "no-carry"]
    assert sum(row["n"] for row in result["per_tag"]) == 40
    for row in result["per_tag"]:
        tagged = [i for i in items if row["tag"] in i.tags and i.baseline is not None]
        counts = mcnemar_counts([bool(i.baseline_passed) for i in tagged], [bool(i.candidate_passed) for i in tagged])
        assert row["mcnemar"]["p_value"] == pytest.approx(counts.p_value)


def test_graded_comparison_uses_the_bootstrap() -> None:
    r = random.Random(2)
    items = [PairedItem(key=str(i), baseline=r.random(), candidate=r.random()) for i in range(50)]
    result = compare_paired(items, binary=False, seed=5)
    assert result["kind"] == "graded"
    assert result["overall"]["interval_method"] == "paired-bootstrap"
    assert result["overall"]["bootstrap"] == {"resamples": 2000, "seed": 5}
    assert result["overall"]["ci_low"] <= result["overall"]["difference"] <= result["overall"]["ci_high"]


def test_gate_passes_only_when_non_inferiority_is_shown() -> None:
    worse = compare_paired(_items(), binary=True)["overall"]
    failed = gate_decide(worse, max_drop=0.05, min_score=None, alpha=0.05)
    assert failed.passed is False
    assert "McNemar exact p" in failed.reason
    assert failed.detail["drop_upper_bound"] == pytest.approx(-worse["ci_low"])
    # Same answers on both sides: shown not worse by more than any margin, even zero.
    same = compare_paired([PairedItem(key=str(i), baseline=1.0, candidate=1.0) for i in range(30)], binary=True)
    assert gate_decide(same["overall"], max_drop=0.0, min_score=None, alpha=0.05).passed is True
    # A drop that is probably small but not shown to be under the margin fails: no data will come to wait for.
    close = [PairedItem(key=str(i), baseline=1.0, candidate=0.0 if i < 2 else 1.0) for i in range(30)]
    decided = gate_decide(compare_paired(close, binary=True)["overall"], max_drop=0.05, min_score=None, alpha=0.05)
    assert decided.passed is False
    assert gate_decide(same["overall"], max_drop=None, min_score=0.9, alpha=0.05).passed is True
    below = gate_decide(worse, max_drop=None, min_score=0.9, alpha=0.05)
    assert below.passed is False and "below the minimum" in below.reason
    assert gate_decide({"n": 0}, max_drop=0.1, min_score=None, alpha=0.05).passed is None
