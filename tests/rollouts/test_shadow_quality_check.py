"""The shadow-quality check of a look: its floor (absolute, or a margin below the baseline's own score), the
alpha it is given, and what it says while it cannot decide."""

from __future__ import annotations

from typing import Any

import pytest

from evals.selectors import ShadowQuality
from rollouts import gates
from rollouts.analysis.checks import _quality_check
from rollouts.plans import plan_from_stored, plan_normalise


def _plan(quality: dict[str, Any]) -> Any:
    return plan_normalise({
        "alias": "adder", "candidate": "adder-v2", "strategy": "shadow", "shadow": {"rate": 0.5, "quality": quality},
    })  # fmt: skip


def _fake(monkeypatch: pytest.MonkeyPatch, quality: ShadowQuality | None) -> list[float]:
    asked: list[float] = []

    def read(*, rollout_id: int, alpha: float) -> ShadowQuality | None:
        asked.append(alpha)
        return quality

    monkeypatch.setattr(gates, "shadow_quality", read)
    return asked


def test_a_margin_below_a_pairwise_judges_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(
        {"max_drop": 0.05, "scorer": {"name": "judge", "params": {"judge_model": "m", "mode": "pairwise"}}}
    )
    assert plan.shadow_quality.label == "shadow quality within 0.05 of the baseline"
    assert plan_from_stored(plan.to_dict()).shadow_quality == plan.shadow_quality
    quality = ShadowQuality(
        n=400,
        mean=0.49,
        ci_low=0.46,
        ci_high=0.52,
        scorer="judge",
        alpha=0.01,
        reference=0.5,
        sd=0.3,
        judge_flip_rate=0.12,
    )
    asked = _fake(monkeypatch, quality)
    check = _quality_check(plan, 1, 0.01)
    assert asked == [0.01]
    assert check["decision"] == "safe" and check["limit"] == pytest.approx(0.45) and check["alpha"] == 0.01
    assert check["margin"] == 0.05 and check["judge_flip_rate"] == 0.12 and check["n"] == 400


def test_an_absolute_floor_breaches_and_undecided_says_how_many_more_pairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = _plan({"min_mean": 0.9, "scorer": "exact_match"})
    assert plan.shadow_quality.label == "shadow quality >= 0.9"
    _fake(monkeypatch, ShadowQuality(n=300, mean=0.7, ci_low=0.6, ci_high=0.8, scorer="exact_match", sd=0.46))
    assert _quality_check(plan, 1, 0.05)["decision"] == "breach"
    # Ten identical answers: bounds about half wide, so undecided, never "certain".
    _fake(monkeypatch, ShadowQuality(n=10, mean=1.0, ci_low=0.39, ci_high=1.0, scorer="exact_match", sd=0.0))
    check = _quality_check(plan, 1, 0.05)
    assert check["decision"] == "undecided" and check["pairs_needed"] > 0
    assert "more would" in check["reason"]
    _fake(monkeypatch, ShadowQuality(n=0, mean=None, ci_low=None, ci_high=None, scorer="exact_match"))
    assert _quality_check(plan, 1, 0.05)["decision"] == "undecided"
    _fake(monkeypatch, None)
    assert _quality_check(plan, 1, 0.05)["decision"] == "undecided"


@pytest.mark.parametrize(
    ("quality", "field"),
    [
        ({"scorer": "exact_match"}, "shadow.quality.min_mean"),
        ({"min_mean": 0.9, "max_drop": 0.1}, "shadow.quality.max_drop"),
        ({"max_drop": 1.5}, "shadow.quality.max_drop"),
    ],
)
def test_plan_errors_name_the_field(quality: dict[str, Any], field: str) -> None:
    from rollouts.plans import PlanInvalid

    with pytest.raises(PlanInvalid) as invalid:
        _plan(quality)
    assert field in invalid.value.errors
