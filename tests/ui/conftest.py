"""A small world for page tests: versions with (fake) ready engines, a canary with looks of the analysis,
an eval suite with a finished run, and the cast of users from tests/conftest.py."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout
from rollouts.services import rollout_create
from serving.models import EngineWorker
from tests.rollouts.helpers import both_arms, canary_plan, step_back, version


def logged_in(member: Any, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(member.user)
    return client


@pytest.fixture
def versions(db: None) -> None:
    version("adder-v1")
    version("adder-v2")


@pytest.fixture
def canary(owner: Any, versions: None) -> Rollout:
    """A running canary (10 % then 50 % with an approval) whose first step has been looked at once."""
    plan = canary_plan(steps=[
        {"weight": 0.1, "min_duration_s": 60},
        {"weight": 0.5, "min_duration_s": 60, "requires_approval": True},
    ])  # fmt: skip
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    step_back(rollout, 30)
    both_arms(rollout, total=300, weight=0.1, seed=7)
    rollout_analyse(rollout_id=rollout.pk)
    return Rollout.objects.select_related("baseline", "candidate").get(pk=rollout.pk)


def awaiting(rollout: Rollout) -> Rollout:
    """Give the canary's first step its minimums (a minute, and the floor of the error-rate guardrail: 922
    candidate requests; 1,200 here) so that the next look finds both guardrails safe and asks for the approval of
    step 2."""
    step_back(rollout, 61)
    both_arms(rollout, total=12_000, weight=0.1, seed=8)
    rollout_analyse(rollout_id=rollout.pk)
    fresh = Rollout.objects.select_related("baseline", "candidate").get(pk=rollout.pk)
    assert fresh.state == Rollout.State.AWAITING_APPROVAL, fresh.state_reason
    return fresh


@pytest.fixture
def engine_with_metrics(versions: None) -> EngineWorker:
    worker = EngineWorker.objects.select_related("model_version").filter(model_version__version="v1").first()
    assert worker is not None
    EngineWorker.objects.filter(pk=worker.pk).update(
        restarts=2, last_health_ok=True, log_tail="INFO starting\nINFO Uvicorn running on http://127.0.0.1:8101",
        metrics={
            "vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 1.0, "vllm:kv_cache_usage_perc": 0.25,
            "vllm:request_success_total": 120.0,
            "vllm:time_to_first_token_seconds": {"count": 100, "sum": 5.0, "buckets": [[0.01, 10], [0.05, 60], [0.1, 100], ["+Inf", 100]]},
        },
    )  # fmt: skip
    worker.refresh_from_db()
    return worker
