"""Shadow pairs scored by the rollout's scorers, and the quality guardrail read from them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from config.errors import DomainError
from evals.scorers import FLIP_SUFFIX
from evals.selectors import shadow_quality
from evals.services import shadow_pairs_score, shadow_scoring_configure, shadow_scoring_stop
from evals.tasks import score_shadow_pairs
from experiments.stats import RatioStats
from experiments.stats.bounded import SessionMeanBounds, session_mean_bounds
from serving.models import ShadowPair


def pair(n: int, baseline: str, candidate: str, *, rollout_id: int = 7, outcome: str = "ok") -> ShadowPair:
    # Shadow pairs are written by serving's gateway; here they are set up directly as test data.
    return ShadowPair.objects.create(
        request_id=f"r{rollout_id}-{n}", created_at=timezone.now(), alias="adder", rollout_id=rollout_id,
        prompt_text="37+48=", baseline_output=baseline, candidate_output=candidate, candidate_outcome=outcome,
    )


def test_configuration_is_checked_and_names_the_field(db: None) -> None:
    with pytest.raises(DomainError) as caught:
        shadow_scoring_configure(rollout_id=7, scorers=["exact_match", {"name": "nope"}])
    assert caught.value.field == "scorers[1].name"
    config = shadow_scoring_configure(rollout_id=7, scorers=["exact_match"])
    assert shadow_scoring_configure(rollout_id=7, scorers=["exact_match", "numeric"]).pk == config.pk


def test_pairs_are_scored_once_and_the_guardrail_has_an_interval(db: None) -> None:
    assert shadow_quality(rollout_id=7) is None
    shadow_scoring_configure(rollout_id=7, scorers=["exact_match", {"name": "numeric", "params": {"tolerance": 1}}])
    assert shadow_quality(rollout_id=7).n == 0  # type: ignore[union-attr]
    for n in range(30):
        pair(n, "85", "85" if n % 10 else "86")
    pair(30, "85", "", outcome="engine_error")
    pair(31, "85", "0", rollout_id=8)  # another rollout's pair: not touched
    assert score_shadow_pairs() == 31
    assert shadow_pairs_score(rollout_id=7) == 0  # nothing left to score
    scored = ShadowPair.objects.get(request_id="r7-0").scores
    assert scored == {"exact_match": 0.0, "numeric": 1.0}
    assert ShadowPair.objects.get(request_id="r7-30").scores == {"exact_match": None, "numeric": None}
    assert ShadowPair.objects.get(request_id="r8-31").scores == {}
    quality = shadow_quality(rollout_id=7)
    assert quality is not None and quality.scorer == "exact_match" and quality.n == 30
    assert quality.mean == pytest.approx(27 / 30)
    assert quality.ci_low is not None and quality.ci_high is not None
    assert 0.0 <= quality.ci_low < quality.mean < quality.ci_high <= 1.0
    assert shadow_quality(rollout_id=7, scorer="numeric").mean == 1.0  # type: ignore[union-attr]


def test_stopped_scoring_scores_nothing_more(db: None) -> None:
    shadow_scoring_configure(rollout_id=7, scorers=["exact_match"])
    shadow_scoring_stop(rollout_id=7)
    pair(1, "85", "85")
    assert score_shadow_pairs() == 0
    assert ShadowPair.objects.get(request_id="r7-1").scores == {}


def test_quality_bounds_never_collapse_and_judge_flips_are_counted(versions) -> None:  # type: ignore[no-untyped-def]
    judge = {"name": "judge", "params": {"judge_model": "adder-v1", "mode": "pairwise"}}
    shadow_scoring_configure(rollout_id=9, scorers=[judge])
    for n in range(10):
        made = pair(n, "85", "84", rollout_id=9)
        # As shadow scoring writes a pairwise judge's verdict: the score and whether it flipped.
        made.scores = {"judge": 0.0 if n < 8 else 0.5, "judge#flipped": n >= 8}
        made.save(update_fields=["scores"])
    quality = shadow_quality(rollout_id=9, alpha=0.01)
    assert quality is not None and quality.n == 10 and quality.reference == 0.5 and quality.alpha == 0.01
    assert quality.mean == pytest.approx(0.1)
    assert quality.ci_high is not None and quality.ci_high > 0.5  # ten pairs prove little, whatever they say
    assert quality.judge_flip_rate == pytest.approx(0.2)
    with pytest.raises(DomainError):
        shadow_quality(rollout_id=9, scorer="nope")


def quality_in_python(pairs: list[ShadowPair], label: str, alpha: float) -> tuple[SessionMeanBounds, float | None]:
    """The guardrail read pair by pair in Python, as shadow_quality read it before the database summed it."""
    sums: dict[str, list[float]] = {}
    flips = judged = 0
    for made in pairs:
        value = made.scores.get(label)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            unit = sums.setdefault(made.session_hash or f"r:{made.request_id}", [0.0, 0.0])
            unit[0] += min(1.0, max(0.0, float(value)))
            unit[1] += 1.0
            flipped = made.scores.get(f"{label}{FLIP_SUFFIX}")
            if isinstance(flipped, bool):
                judged += 1
                flips += flipped
    totals = np.array(list(sums.values()), dtype=float)
    bounds = session_mean_bounds(RatioStats.from_units(totals[:, 0], totals[:, 1]), alpha=alpha)
    return bounds, (flips / judged if judged else None)


def test_the_database_sums_the_sessions_as_python_did(db: None) -> None:
    shadow_scoring_configure(rollout_id=11, scorers=["exact_match"])
    rng = np.random.default_rng(20)
    # Scores as they may lie in the JSON: numbers in and out of [0, 1] (clamped), whole numbers, huge
    # ones, and what is no score: a bool, a string, null.
    raw: list[Any] = [0.0, 0.25, 0.5, 0.75, 1.0, 1, 0, 1.7, -0.4, 3, 1e300, True, False, "0.5", None]
    flags: list[Any] = [True, False, "true", 1, None]
    weights = 1.0 / np.arange(1, 46) ** 0.7
    weights /= weights.sum()
    pairs = []
    for n in range(400):
        # 45 sessions of one to many pairs (a few heavy), and 60 pairs with no session: each its own unit.
        session = "" if n % 7 == 0 else f"s{int(rng.choice(45, p=weights)):02d}"
        made = pair(n, "85", "85", rollout_id=11)
        made.session_hash = session
        scores: dict[str, Any] = {"exact_match": raw[int(rng.integers(len(raw)))]}
        flag = flags[int(rng.integers(len(flags)))]
        if flag is not None:
            scores[f"exact_match{FLIP_SUFFIX}"] = flag
        if n % 50 == 3:
            scores = {"numeric": 1.0}  # not scored on this scorer
        made.scores = scores
        made.save(update_fields=["session_hash", "scores"])
        pairs.append(made)
    other = pair(999, "85", "85", rollout_id=12)  # another rollout's
    other.scores = {"exact_match": 0.0}
    other.save(update_fields=["scores"])
    expected, flip_rate = quality_in_python(pairs, "exact_match", 0.05)
    quality = shadow_quality(rollout_id=11)
    assert quality is not None and expected.units >= 60
    assert (quality.n, quality.units) == (expected.n, expected.units)
    assert quality.mean == pytest.approx(expected.mean, rel=1e-12)
    assert quality.sd == pytest.approx(expected.sd, rel=1e-9)
    assert (quality.ci_low, quality.ci_high) == pytest.approx((expected.lower, expected.upper), rel=1e-9)
    assert 0.0 < quality.ci_low < quality.mean < quality.ci_high < 1.0  # type: ignore[operator]
    assert quality.judge_flip_rate == pytest.approx(flip_rate, rel=1e-12)
    assert 0.0 < flip_rate < 1.0  # type: ignore[operator]
