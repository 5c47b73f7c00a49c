"""Engines follow rollouts (rollouts.engines): a start-when-ready rollout asks for the engines it has none of,
and the engines of the version a rollout retired are stopped ENGINE_IDLE_STOP_S after it ended, once, and
only when nothing uses that version any more. (The agent's cap on local engines: tests/serving/engines/
test_agent_engine_cap.py; the whole of it with real engines: the demo, README "The demo".)"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from rollouts.engines import retired_engines_stop
from rollouts.models import Rollout
from rollouts.services import rollout_abort, rollout_create, rollout_promote, rollout_rollback
from rollouts.tasks import retired_engines_stop as retired_engines_stop_task
from serving.models import EngineWorker
from serving.services import alias_ensure, engine_worker_create, model_version_register
from tests.rollouts.helpers import canary_plan, version

pytestmark = pytest.mark.django_db

State = EngineWorker.State
STEPS = [{"weight": 0.1, "min_duration_s": 300, "min_candidate_requests": 1100}]


def local_ready(label: str) -> EngineWorker:
    """A version with one local engine READY, as the agent leaves it."""
    found = version(label, ready=False)
    worker = engine_worker_create(model_version=found, driver=EngineWorker.Driver.LOCAL)
    EngineWorker.objects.filter(pk=worker.pk).update(state=State.READY, claimed_by="agent-x")
    return EngineWorker.objects.get(pk=worker.pk)


def row(worker: EngineWorker) -> EngineWorker:
    return EngineWorker.objects.get(pk=worker.pk)


def ended_ago(rollout: Rollout, seconds: float) -> None:
    Rollout.objects.filter(pk=rollout.pk).update(ended_at=timezone.now() - timedelta(seconds=seconds))


def test_a_start_when_ready_rollout_asks_for_the_engines_its_versions_lack(owner: Any) -> None:
    baseline = local_ready("adder-v1")
    candidate = model_version_register(name="adder", version="v3", artifact="/nonexistent/adder-v3",
                                       served_model_name="adder-v3")
    rollout = rollout_create(plan=canary_plan(candidate="adder-v3", steps=STEPS), actor=owner.user,
                             start_when_ready=True).rollout
    workers = list(EngineWorker.objects.filter(model_version=candidate))
    assert len(workers) == 1
    (asked,) = workers
    assert (asked.driver, asked.desired_state, asked.state, asked.host_name) == (
        "local", "running", "pending", settings.ENGINE_AGENT_HOST)
    created = rollout.events.get(kind="created")
    assert created.evidence["engines_requested"] == [
        {"version": "adder-v3", "worker": asked.pk, "how": f"created for the engine agent of {asked.host_name}"}
    ]
    # The baseline had an engine: nothing more was asked of it.
    assert list(EngineWorker.objects.filter(model_version=baseline.model_version)) == [baseline]
    assert rollout.state == "draft"


def test_a_stopped_engine_of_the_version_is_asked_to_run_again_rather_than_a_second_one_made(owner: Any) -> None:
    local_ready("adder-v1")
    stopped = local_ready("adder-v2")
    EngineWorker.objects.filter(pk=stopped.pk).update(state=State.STOPPED, desired_state="stopped", claimed_by="")
    rollout_create(plan=canary_plan(steps=STEPS), actor=owner.user, start_when_ready=True)
    assert EngineWorker.objects.filter(model_version=stopped.model_version).count() == 1
    assert (row(stopped).desired_state, row(stopped).state) == ("running", "pending")


def test_without_start_when_ready_no_engine_is_asked_for(owner: Any) -> None:
    local_ready("adder-v1")
    lacking = version("adder-v2", ready=False)
    rollout_create(plan=canary_plan(steps=STEPS), actor=owner.user)
    assert not EngineWorker.objects.filter(model_version=lacking).exists()


def test_a_rolled_back_candidates_engines_stop_after_the_delay_once_and_static_ones_stay(
    owner: Any, settings: Any
) -> None:
    settings.ENGINE_IDLE_STOP_S = 300
    local_ready("adder-v1")
    candidate = local_ready("adder-v2")
    static = engine_worker_create(model_version=candidate.model_version, driver="static", base_url="http://127.0.0.1:9")
    rollout = rollout_create(plan=canary_plan(steps=STEPS), actor=owner.user, start=True).rollout
    rollout_rollback(rollout=rollout, actor=owner.user, reason="bad")

    ended_ago(rollout, 299)
    assert retired_engines_stop() == []
    assert row(candidate).desired_state == "running"

    ended_ago(rollout, 301)
    assert retired_engines_stop_task() == "1 engines asked to stop (1 ended rollouts looked at)"
    stopped = row(candidate)
    assert (stopped.desired_state, stopped.state) == ("stopped", "draining")
    assert stopped.state_reason == f"stop requested: rollout {rollout.pk} rolled back and nothing uses adder-v2"
    assert row(static).desired_state == "running"
    assert Rollout.objects.get(pk=rollout.pk).engines_released_at is not None

    # Once per rollout: an engine a person starts again afterwards stays up.
    EngineWorker.objects.filter(pk=candidate.pk).update(desired_state="running", state=State.READY)
    assert retired_engines_stop() == []
    assert row(candidate).desired_state == "running"


def test_a_version_something_still_uses_keeps_its_engines(owner: Any, settings: Any) -> None:
    settings.ENGINE_IDLE_STOP_S = 0
    local_ready("adder-v1")
    candidate = local_ready("adder-v2")
    first = rollout_create(plan=canary_plan(steps=STEPS), actor=owner.user, start=True).rollout
    rollout_abort(rollout=first, actor=owner.user, reason="wrong plan")
    # A second try of the same candidate, still a draft, names it.
    second = rollout_create(plan=canary_plan(steps=STEPS), actor=owner.user).rollout
    (released,) = retired_engines_stop()
    assert (released.rollout_id, released.stopped, released.kept) == (first.pk, [], f"rollout {second.pk} is live on it")
    assert row(candidate).desired_state == "running"


def test_a_promotion_retires_the_old_baseline_unless_another_alias_still_serves_it(owner: Any, settings: Any) -> None:
    settings.ENGINE_IDLE_STOP_S = 0
    baseline = local_ready("adder-v1")
    local_ready("adder-v2")
    alias_ensure(name="adder-other", stable=baseline.model_version)
    rollout = rollout_create(plan=canary_plan(steps=STEPS), actor=owner.user, start=True).rollout
    rollout_promote(rollout=rollout, actor=owner.user, reason="good")
    # While the promotion bakes, the old baseline serves the holdout: nothing is retired yet.
    assert retired_engines_stop() == []
    rollout_promote(rollout=rollout, actor=owner.user, reason="the bake looks fine")
    (released,) = retired_engines_stop()
    assert (released.version, released.kept) == ("adder-v1", "the alias 'adder-other' routes to it")
    assert row(baseline).desired_state == "running"
