"""Shadow pairs scored by the rollout's scorers, and the quality guardrail read from them."""

from __future__ import annotations

import pytest
from django.utils import timezone

from config.errors import DomainError
from evals.selectors import shadow_quality
from evals.services import shadow_pairs_score, shadow_scoring_configure, shadow_scoring_stop
from evals.tasks import score_shadow_pairs
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
