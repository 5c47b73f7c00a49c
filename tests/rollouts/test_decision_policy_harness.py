"""The decision_policy benchmark's harness (benchmarks/decision_policy.py) on a few rollouts, so it does not
rot: whole rollouts through the real analysis, on the simulated clock. Not timed; each asserts an outcome
that a broken harness (or a broken analysis) would miss."""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from experiments.stats.simulation import Effect
from rollouts.models import Rollout, RolloutEvent
from rollouts.plans import plan_normalise
from serving.models import RequestRecord

pytestmark = pytest.mark.django_db

START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _harness_module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decision_policy.py"
    spec = importlib.util.spec_from_file_location("decision_policy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("decision_policy", module)
    spec.loader.exec_module(module)
    return module


dp = _harness_module()


def test_a_candidate_with_twenty_more_points_of_errors_is_rolled_back_in_its_first_step() -> None:
    plan = dp.plan_load("demo-adder")
    harness = dp.harness_setup([plan])
    broken = dp.Scenario("errors +20 pts", Effect(error_add=0.20))
    outcome = dp.rollout_simulate(harness, "demo-adder", plan, broken, seed=3, start=START, max_minutes=15, keep=True)
    assert outcome.state == "rolled_back", outcome
    first_weight = plan_normalise(plan).steps[0].weight  # the demo's first step (25 %)
    assert outcome.step_reached == 1 and outcome.max_weight == pytest.approx(first_weight)
    assert "error_rate" in outcome.reason
    # Everything followed the simulated clock: the records, the step's start, the rollback's event.
    rollout = Rollout.objects.get(alias_name=f"{harness.alias_prefix}-1")
    assert rollout.started_at == START
    ended = START + timedelta(minutes=outcome.minutes)
    assert rollout.ended_at == ended
    rolled_back = RolloutEvent.objects.get(rollout=rollout, kind=RolloutEvent.Kind.ROLLED_BACK)
    assert rolled_back.created_at == ended
    stored = RequestRecord.objects.filter(rollout_id=rollout.pk)
    assert stored.count() == outcome.requests
    first = stored.order_by("created_at").first()
    last = stored.order_by("-created_at").first()
    assert first is not None and last is not None and START <= first.created_at and last.created_at < ended


def test_an_aa_canary_splits_sticky_users_as_planned_and_is_not_rolled_back() -> None:
    # docs/examples/canary.yaml's first step holds 300 s at 5 %: three minutes in, it is still there.
    plan = dp.plan_load("canary")
    harness = dp.harness_setup([plan])
    outcome = dp.rollout_simulate(harness, "canary", plan, dp.SCENARIOS["aa"], seed=4, start=START, max_minutes=3)
    assert outcome.state == "undecided", outcome
    assert outcome.step_reached == 1 and outcome.looks == 18
    assert 0.8 * 20 * 180 < outcome.requests < 1.2 * 20 * 180  # 20 requests/s
    assert 0.02 < outcome.candidate_requests / outcome.requests < 0.09  # 5 % of users, heavy-tailed
    # Nothing is left behind but the audit trail.
    assert not RequestRecord.objects.filter(alias=f"{harness.alias_prefix}-1").exists()
