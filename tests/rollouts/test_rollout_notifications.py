"""The notification hook: notable events reach registered dispatchers once, even when the task runs twice."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from rollouts import notifications
from rollouts.models import Notification, RolloutEvent
from rollouts.notifications import dispatcher_register, notifications_pending
from rollouts.services import rollout_create, rollout_pause, rollout_rollback
from rollouts.tasks import analyse_live_rollouts, notify_event
from tests.rollouts.helpers import canary_plan, version

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Any:
    # Only this test's dispatchers: whatever the Slack app registered stays out of it.
    monkeypatch.setattr(notifications, "_DISPATCHERS", {})
    calls: list[tuple[str, int]] = []
    dispatcher_register("test", lambda event: calls.append((event.kind, event.rollout_id)))
    return calls


@pytest.fixture
def rollout(owner: Any) -> Any:
    version("adder-v1")
    version("adder-v2")
    return rollout_create(plan=canary_plan(), actor=owner.user, start=True).rollout


def test_only_notable_events_get_a_notification(rollout: Any, owner: Any) -> None:
    assert not Notification.objects.exists()  # created and started are not notable
    rollout_pause(rollout=rollout, actor=owner.user, reason="looking")
    rollout_rollback(rollout=rollout, actor=owner.user, reason="bad")
    assert sorted(Notification.objects.values_list("event__kind", flat=True)) == ["paused", "rolled_back"]


def test_the_task_on_commit_delivers_once_even_when_run_twice(
    rollout: Any, owner: Any, sent: list[tuple[str, int]], django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueued: list[int] = []
    monkeypatch.setattr(notify_event, "delay", lambda event_id: enqueued.append(event_id))
    with django_capture_on_commit_callbacks(execute=True):
        rollout_rollback(rollout=rollout, actor=owner.user, reason="bad")
    event = RolloutEvent.objects.get(kind="rolled_back")
    assert enqueued == [event.pk]

    assert notify_event.apply(args=[event.pk]).get() == "sent"
    assert notify_event.apply(args=[event.pk]).get() == "sent"
    assert sent == [("rolled_back", rollout.pk)]
    notification = Notification.objects.get(event=event)
    assert (notification.status, notification.deliveries, notification.attempts) == ("sent", {"test": "sent"}, 1)


def test_a_failing_dispatcher_is_retried_without_resending_to_the_others(rollout: Any, owner: Any, sent: list[Any]) -> None:
    failures = iter([RuntimeError("slack is down")])

    def flaky(event: RolloutEvent) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    dispatcher_register("flaky", flaky)
    rollout_rollback(rollout=rollout, actor=owner.user, reason="bad")
    event = RolloutEvent.objects.get(kind="rolled_back")
    # Run eagerly, the task's retry runs at once in the same call: the first attempt fails, the second sends.
    assert notify_event.apply(args=[event.pk]).get() == "sent"
    assert sent == [("rolled_back", rollout.pk)]  # the healthy dispatcher was not called again
    notification = Notification.objects.get(event=event)
    assert (notification.deliveries, notification.attempts) == ({"test": "sent", "flaky": "sent"}, 2)


def test_a_dispatcher_failing_every_time_gives_up_after_bounded_attempts(rollout: Any, owner: Any, sent: list[Any]) -> None:
    def broken(event: RolloutEvent) -> None:
        raise RuntimeError("no route to slack")

    dispatcher_register("broken", broken)
    rollout_rollback(rollout=rollout, actor=owner.user, reason="bad")
    event = RolloutEvent.objects.get(kind="rolled_back")
    assert notify_event.apply(args=[event.pk]).get() == "failed"
    notification = Notification.objects.get(event=event)
    assert notification.status == "failed" and notification.attempts == notifications.MAX_ATTEMPTS
    assert "no route to slack" in notification.last_error and sent == [("rolled_back", rollout.pk)]


def test_a_notification_never_enqueued_is_swept_up(
    rollout: Any, owner: Any, sent: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout_rollback(rollout=rollout, actor=owner.user, reason="bad")  # on_commit never runs in this test
    Notification.objects.update(created_at=timezone.now() - timedelta(minutes=5))
    assert len(notifications_pending()) == 1
    resent: list[int] = []
    monkeypatch.setattr(notify_event, "delay", lambda event_id: resent.append(event_id))
    analyse_live_rollouts.apply()
    assert resent == [RolloutEvent.objects.get(kind="rolled_back").pk]


def test_a_missing_event_is_ignored() -> None:
    assert notify_event.apply(args=[123456]).get() == "missing"
