"""Paired comparison statistics against scipy and statsmodels on fixed data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from evals.noninferiority import DiscordantCounts, bootstrap_t_bounds, tango_bounds
from evals.paired import PairedItem, compare_paired, gate_decide, mcnemar_counts, wilcoxon_p_value

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


def test_no_discordant_items_is_no_difference_but_not_a_zero_width_interval() -> None:
    counts = mcnemar_counts([True, False, True], [True, False, True])
    assert counts.p_value == 1.0
    row = compare_paired([PairedItem(key=str(i), baseline=v, candidate=v) for i, v in enumerate([1.0, 0.0, 1.0])],
                         binary=True)["overall"]
    assert row["difference"] == 0.0 and row["ci_low"] < -0.5 and row["ci_high"] > 0.5


def test_accuracy_interval_is_tangos_score_interval() -> None:
    row = compare_paired(_items(), binary=True, alpha=0.05)["overall"]
    assert row["interval_method"] == "tango-score"
    low, high = tango_bounds(DiscordantCounts(n=40, candidate_only=3, baseline_only=12), alpha=0.025)
    assert row["difference"] == pytest.approx((3 - 12) / 40)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    assert low < row["difference"] < high < 0


def test_paired_bootstrap_t_is_seeded_and_close_to_scipy_on_smooth_data() -> None:
    rng = np.random.default_rng(7)
    baseline = rng.uniform(0.4, 1.0, size=120)
    candidate = np.clip(baseline - rng.normal(0.05, 0.1, size=120), 0, 1)
    diffs = candidate - baseline
    first = bootstrap_t_bounds(diffs, alpha=0.025, resamples=4000, seed=3)
    assert first == bootstrap_t_bounds(diffs, alpha=0.025, resamples=4000, seed=3)
    # scipy has no studentised bootstrap; on smooth, nearly symmetric data BCa lands on the same interval
    # to within the bootstrap's own noise.
    reference = stats.bootstrap((diffs,), np.mean, n_resamples=4000, method="BCa", confidence_level=0.95,
                                random_state=3)
    width = reference.confidence_interval.high - reference.confidence_interval.low
    assert first[0] == pytest.approx(reference.confidence_interval.low, abs=0.1 * width)
    assert first[1] == pytest.approx(reference.confidence_interval.high, abs=0.1 * width)


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
    assert result["overall"]["interval_method"] == "bootstrap-t"
    assert result["overall"]["bootstrap"] == {"resamples": 2000, "seed": 5}
    assert result["overall"]["ci_low"] <= result["overall"]["difference"] <= result["overall"]["ci_high"]


def test_gate_passes_only_when_non_inferiority_is_shown() -> None:
    worse = compare_paired(_items(), binary=True, margin=0.05)["overall"]
    failed = gate_decide(worse, max_drop=0.05, min_score=None, alpha=0.05)
    assert failed.passed is False and failed.verdict == "fail"
    assert "McNemar exact p" in failed.reason
    assert failed.detail["drop_upper_bound"] == pytest.approx(-worse["noninferiority"]["low"])
    assert failed.detail["high"] < -0.05
    # Thirty identical answers show nothing at a margin of 0.05: undecided, with the suite size it would take.
    same = [PairedItem(key=str(i), baseline=1.0, candidate=1.0) for i in range(30)]
    undecided = gate_decide(compare_paired(same, binary=True, margin=0.05)["overall"], max_drop=0.05, min_score=None,
                            alpha=0.05)
    assert undecided.verdict == "undecided" and undecided.passed is False
    assert undecided.detail["items_needed"] == 52  # z^2 (1 - m) / m = 51.4 with no disagreement at all
    assert "about 52 items would show it" in undecided.reason
    # ... and two hundred of them do.
    many = [PairedItem(key=str(i), baseline=1.0, candidate=1.0) for i in range(200)]
    assert gate_decide(compare_paired(many, binary=True, margin=0.05)["overall"], max_drop=0.05, min_score=None,
                       alpha=0.05).passed is True
    # A margin of 0 can never be shown.
    zero = gate_decide(compare_paired(many, binary=True, margin=0.0)["overall"], max_drop=0.0, min_score=None,
                       alpha=0.05)
    assert zero.verdict == "undecided"
    assert gate_decide(compare_paired(same, binary=True)["overall"], max_drop=None, min_score=0.9, alpha=0.05).passed
    below = gate_decide(worse, max_drop=None, min_score=0.9, alpha=0.05)
    assert below.passed is False and "below the minimum" in below.reason
    assert gate_decide({"n": 0}, max_drop=0.1, min_score=None, alpha=0.05).passed is None
    with pytest.raises(ValueError, match="no non-inferiority test"):
        gate_decide(compare_paired(same, binary=True)["overall"], max_drop=0.05, min_score=None, alpha=0.05)
