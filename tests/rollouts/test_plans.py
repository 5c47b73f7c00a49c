"""The plan schema: one validator, every error named by its field, every default written out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollouts.plans import PLAN_EXAMPLE, PlanInvalid, plan_from_stored, plan_normalise, plan_parse

DOCS = Path(__file__).resolve().parents[2] / "docs" / "examples"


def errors_of(plan: dict[str, Any]) -> dict[str, list[str]]:
    with pytest.raises(PlanInvalid) as invalid:
        plan_normalise(plan)
    return invalid.value.errors


def base(**overrides: Any) -> dict[str, Any]:
    return {"alias": "adder", "candidate": "adder-v2", "strategy": "canary", "steps": [{"weight": 0.1}], **overrides}


def test_defaults_are_written_out() -> None:
    plan = plan_normalise(base()).to_dict()
    # The default error-rate guardrail cannot be shown safe on fewer than 764 candidate requests at 10 %, at
    # alpha 0.05: its check on the bake alone takes half of its breach side, no share (922 at 0.025 when it did).
    assert plan["steps"] == [
        {"weight": 0.1, "shadow_rate": 0.0, "min_duration_s": 60, "min_candidate_requests": 764, "requires_approval": False}
    ]
    assert (plan["on_inconclusive"], plan["holdout"], plan["bake_s"]) == ("pause", 0.05, 600)
    assert (plan["alpha"], plan["tuning_n"], plan["allow_self_approval"], plan["engine_grace_s"]) == (0.05, None, False, 30)
    assert plan["guardrails"] == [{"metric": "error_rate", "margin": 0.01, "relative": False}]


def test_percentages_slo_strings_and_relative_margins() -> None:
    plan = plan_normalise(base(
        steps=[{"weight": "5%"}, {"weight": "50%"}],
        slos=["ttft_p99_ms <= 800", "goodput >= 95%", {"metric": "tpot_mean_ms", "max": 40}],
        guardrails=[{"metric": "tpot_mean_ms", "margin": "10%"}, {"metric": "error_rate", "margin": 0.005}],
    ))  # fmt: skip
    assert [s.weight for s in plan.steps] == [0.05, 0.5]
    assert [(s.metric, s.op, s.threshold) for s in plan.slos] == [
        ("ttft_p99_ms", "<=", 800.0), ("goodput", ">=", 0.95), ("tpot_mean_ms", "<=", 40.0),
    ]  # fmt: skip
    assert [(g.metric, g.margin, g.relative) for g in plan.guardrails] == [("tpot_mean_ms", 0.1, True), ("error_rate", 0.005, False)]
    assert plan.latency_thresholds == {"ttft_ms": [800.0]}


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"steps": [{"weight": 0.5}, {"weight": 0.2}]}, "steps[1].weight", "weights must increase"),
        ({"steps": [{"weight": 1.5}]}, "steps[0].weight", "must be from 0 to 1, got 1.5"),
        ({"steps": [{"weight": 0}]}, "steps[0].weight", "above 0"),
        ({"steps": [{"weight": 0.1, "min_duration_s": -1}]}, "steps[0].min_duration_s", "must be from 0"),
        ({"steps": [{"weight": 0.1, "min_duration_s": 0}]}, "steps[0].min_duration_s", "at least 60 s"),
        ({"steps": [{"weight": 0.1, "min_candidate_requests": 0}]}, "steps[0].min_candidate_requests", "at least 764"),
        ({"steps": [{"weight": 0.1}, {"weight": 0.5, "min_candidate_requests": 50}]}, "steps[1].min_candidate_requests",
         "at least 979: the fewest candidate requests at which this step's checks can be shown safe"),
        ({"on_inconclusive": "shrug"}, "on_inconclusive", "must be one of pause, advance, rollback"),
        ({"holdout": 0.7}, "holdout", "at most 0.5"),
        ({"holdout": "-5%"}, "holdout", "must be from 0 to 1"),
        ({"bake_s": 10}, "bake_s", "0 (no bake) or at least 60 s"),
        ({"steps": [{"weight": 0.1, "wieght": 1}]}, "steps[0].wieght", "unknown field"),
        ({"steps": []}, "steps", "at least one step"),
        ({"slos": ["ttft_p99_ms >= 800"]}, "slos[0]", "only an upper limit"),
        ({"slos": ["error_rate <= 3"]}, "slos[0]", "between 0 and 1"),
        ({"slos": ["latency <= 3"]}, "slos[0].metric", "unknown metric 'latency'"),
        ({"slos": ["ttft_p99_ms is small"]}, "slos[0]", "write an SLO as"),
        ({"guardrails": [{"metric": "ttft_p99_ms", "margin": 20}]}, "guardrails[0].margin", "ratio of the arms' quantiles"),
        ({"guardrails": [{"metric": "tpot_mean_ms"}]}, "guardrails[0].margin", "required"),
        ({"alpha": 0.9}, "alpha", "at most 0.5"),
        ({"strategy": "yolo"}, "strategy", "one of canary, shadow, ab, blue_green"),
        ({"alias": ""}, "alias", "required"),
        ({"candidate": None}, "candidate", "required"),
        ({"guardrail": []}, "guardrail", "unknown field"),
        ({"ab": {"weight": 0.5}}, "ab", "only for the ab strategy"),
    ],
)
def test_each_error_names_its_field(overrides: dict[str, Any], field: str, reason: str) -> None:
    errors = errors_of(base(**overrides))
    assert field in errors, errors
    assert any(reason in message for message in errors[field]), errors[field]


def test_the_first_error_reported_is_the_first_one_written() -> None:
    with pytest.raises(PlanInvalid) as invalid:
        plan_normalise(base(steps=[{"weight": 0.1}, {"weight": 0.5}, {"weight": 0.2}], alpha=2))
    assert invalid.value.message == "steps[2].weight: weights must increase (the step before has 0.5)"
    assert set(invalid.value.errors) == {"steps[2].weight", "alpha"}


def test_strategies_compile_to_steps() -> None:
    shadow = plan_normalise({"alias": "a", "candidate": "c", "strategy": "shadow", "shadow": {"rate": 0.2}})
    assert [(s.weight, s.shadow_rate) for s in shadow.steps] == [(0.0, 0.2)] and shadow.promotion_requires_approval
    ab = plan_normalise({"alias": "a", "candidate": "c", "strategy": "ab", "primary_metric": "thumbs_up_rate"})
    assert [s.weight for s in ab.steps] == [0.5] and ab.primary_metric and ab.primary_metric.difference == "absolute"
    bg = plan_normalise({"alias": "a", "candidate": "c", "strategy": "blue_green", "blue_green": {"rollback_window_s": 120}})
    # The switch keeps the holdout on the baseline; its minimums meet the floors without being written.
    assert [(s.weight, s.shadow_rate, s.min_duration_s) for s in bg.steps] == [(0.0, 1.0, 300), (0.95, 0.0, 120)]
    # 945, 1030 while the bake-alone checks took shares of their own; now half of each guardrail's breach side.
    assert [s.min_candidate_requests for s in bg.steps] == [782, 854]
    assert errors_of({"alias": "a", "candidate": "c", "strategy": "ab"}) == {
        "primary_metric": ["required for an A/B test: the metric that decides it"]
    }
    assert "shadow.rate" in errors_of({"alias": "a", "candidate": "c", "strategy": "shadow"})


@pytest.mark.parametrize("strategy", ["canary", "shadow", "ab", "blue_green"])
def test_a_stored_plan_reads_back_as_the_same_plan(strategy: str) -> None:
    raw: dict[str, Any] = {"alias": "a", "baseline": "b", "candidate": "c", "strategy": strategy, "shadow": {"rate": 0.3},
                           "slos": ["goodput >= 0.9"], "primary_metric": {"metric": "success_rate", "min_effect": 0.05}}  # fmt: skip
    if strategy == "canary":
        raw["steps"] = [{"weight": 0.1, "requires_approval": True}, {"weight": 1}]
    plan = plan_normalise(raw)
    stored = json.loads(json.dumps(plan.to_dict()))
    assert plan_from_stored(stored) == plan


def test_json_and_yaml_texts_parse_to_the_same_plan() -> None:
    as_json = plan_parse(json.dumps(PLAN_EXAMPLE), content_type="application/json")
    as_yaml = plan_parse(yaml.safe_dump(PLAN_EXAMPLE), content_type="application/yaml")
    assert plan_normalise(as_json) == plan_normalise(as_yaml)
    with pytest.raises(PlanInvalid, match="not valid JSON: Expecting"):
        plan_parse("{", content_type="application/json")
    with pytest.raises(PlanInvalid, match="a plan is a mapping"):
        plan_parse("- a list")


@pytest.mark.parametrize("path", sorted(p.name for p in DOCS.glob("*") if p.suffix in (".yaml", ".json")))
def test_the_documented_example_plans_are_valid(path: str) -> None:
    text = (DOCS / path).read_text()
    plan = plan_normalise(plan_parse(text, content_type="application/json" if path.endswith(".json") else ""))
    assert plan.steps


def test_the_example_ci_workflow_calls_rolloutctl_as_documented() -> None:
    workflow = yaml.safe_load((DOCS / "github-actions.yml").read_text())
    runs = " ".join(step.get("run", "") for step in workflow["jobs"]["rollout"]["steps"])
    assert "rolloutctl create" in runs and "--output id" in runs and "rolloutctl wait" in runs
