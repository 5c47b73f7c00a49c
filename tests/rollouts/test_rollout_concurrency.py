"""Concurrency: two transitions of one rollout at once, two analyses at once, analyses on real Celery workers.

On PostgreSQL the second transaction blocks on the row lock (select_for_update) and then sees the first
one's result; on SQLite the IMMEDIATE transaction serialises the writers the same way. Either way the
first transition holds its transaction open for a while here, so the second really is waiting on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from config.errors import Conflict
from rollouts import services
from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout
from rollouts.services import rollout_advance, rollout_create, rollout_rollback
from rollouts.tasks import analyse_rollout
from tests.rollouts.helpers import both_arms, canary_plan, kinds, quick_plan, step_back, version
from tests.support.processes import celery_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def running(owner: Any) -> Rollout:
    version("adder-v1")
    version("adder-v2")
    return rollout_create(plan=quick_plan(), actor=owner.user, start=True).rollout


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads that start together; each result is a return value or an exception."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def worker(index: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = call()
        except Exception as exc:
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.fixture
def slow_transitions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold each transition's transaction open for a moment after it has written, before it commits."""
    original = services._apply

    def slow_apply(*args: Any, **kwargs: Any) -> Any:
        event = original(*args, **kwargs)
        time.sleep(0.5)
        return event

    monkeypatch.setattr(services, "_apply", slow_apply)


def test_two_transitions_at_once_exactly_one_wins(running: Rollout, owner: Any, approver: Any, slow_transitions: None) -> None:
    """Two people act on what they both saw (version 2, as the UI, the API and Slack send it): whichever
    commits first wins, the other is refused. (Without a version, an advance then a rollback are two
    valid moves in a row, as they should be.)"""
    seen = running.version
    results = race(
        lambda: rollout_advance(rollout=running.pk, actor=owner.user, reason="advance", expected_version=seen),
        lambda: rollout_rollback(rollout=running.pk, actor=approver.user, reason="rollback", expected_version=seen),
    )
    winners = [r for r in results if isinstance(r, Rollout)]
    losers = [r for r in results if isinstance(r, Conflict)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert f"expected version {seen}, found {seen + 1}" in losers[0].message, losers[0].message
    rollout = Rollout.objects.get(pk=running.pk)
    assert rollout.state == winners[0].state and rollout.version == 3
    assert len(kinds(rollout)) == 3  # created, started, and the winner's event only


def test_the_same_transition_twice_at_once_applies_once(running: Rollout, owner: Any, slow_transitions: None) -> None:
    version_read = running.version
    results = race(*[
        lambda: rollout_advance(rollout=running.pk, actor=owner.user, expected_version=version_read) for _ in range(2)
    ])  # fmt: skip
    assert sum(isinstance(r, Rollout) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 1
    assert Rollout.objects.get(pk=running.pk).step_index == 1
    assert kinds(Rollout.objects.get(pk=running.pk)).count("step_started") == 1


def test_two_creations_on_one_alias_at_once_leave_one(owner: Any) -> None:
    version("adder-v1")
    version("adder-v2")
    version("adder-v3")
    results = race(
        lambda: rollout_create(plan=canary_plan(), actor=owner.user),
        lambda: rollout_create(plan=canary_plan(candidate="adder-v3"), actor=owner.user),
    )
    assert sum(isinstance(r, Conflict) for r in results) == 1, results
    assert Rollout.objects.filter(alias_name="adder").count() == 1


def test_two_analyses_at_once_apply_one_decision(running: Rollout) -> None:
    step_back(running, 61)
    both_arms(running, total=1000, weight=0.1, seed=31)
    results = race(*[lambda: rollout_analyse(rollout_id=running.pk) for _ in range(3)])
    assert not [r for r in results if isinstance(r, Exception)], results
    rollout = Rollout.objects.get(pk=running.pk)
    assert rollout.step_index == 1 and kinds(rollout).count("step_started") == 1


def test_analyses_on_real_celery_workers_apply_one_decision(running: Rollout) -> None:
    step_back(running, 61)
    both_arms(running, total=1000, weight=0.1, seed=32)
    with celery_worker(name="rollouts-analysis", concurrency=2):
        results = [analyse_rollout.delay(running.pk) for _ in range(4)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not Rollout.objects.get(pk=running.pk).analyses.exists():
            time.sleep(0.2)
        time.sleep(2)  # let the other deliveries run (they skip or hold)
    assert len(results) == 4
    rollout = Rollout.objects.get(pk=running.pk)
    assert rollout.step_index == 1
    assert kinds(rollout).count("step_started") == 1
    assert rollout.analyses.filter(applied=True).count() == 1
