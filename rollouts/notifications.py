"""The notification hook: notable rollout events reach whoever registered a dispatcher.

A transition that appends a notable event (awaiting approval, rolled back, promoted, eval gate failed,
paused) also writes a `Notification` row in the same transaction (an outbox: nothing is lost if the
broker is down at that moment) and, on commit, enqueues `rollouts.tasks.notify_event(event_id)`.
The task calls every registered dispatcher once per event; delivery state lives on the Notification,
so a task that runs twice, or a retry after one dispatcher failed, sends nothing twice.

No dispatcher is registered today. The Slack app plugs in from its AppConfig.ready():

    from rollouts.notifications import dispatcher_register
    dispatcher_register("slack", send_rollout_event)   # send_rollout_event(event: RolloutEvent) -> None

A dispatcher raises to ask for a retry (bounded, with backoff); it must not block for long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from django.db import transaction
from django.db.models import F, Q
from django.db.models.expressions import CombinedExpression
from django.utils import timezone

from rollouts.models import Notification, RolloutEvent

logger = logging.getLogger(__name__)

Dispatcher = Callable[[RolloutEvent], None]
_DISPATCHERS: dict[str, Dispatcher] = {}
MAX_ATTEMPTS = 5
# A claim older than this belongs to a worker that died while sending; the next sweep takes it over.
STALE_CLAIM = timedelta(minutes=5)


def dispatcher_register(name: str, dispatcher: Dispatcher) -> None:
    """Register (or replace) a dispatcher under a stable name; the name keys its delivery state."""
    _DISPATCHERS[name] = dispatcher


def dispatcher_unregister(name: str) -> None:
    _DISPATCHERS.pop(name, None)


def dispatchers() -> dict[str, Dispatcher]:
    return dict(_DISPATCHERS)


def is_notable(kind: str) -> bool:
    return kind in RolloutEvent.NOTABLE_KINDS


def notification_enqueue(*, event: RolloutEvent) -> Notification | None:
    """Inside the transition's transaction: write the outbox row and enqueue the task on commit."""
    if not is_notable(event.kind):
        return None
    notification = Notification.objects.create(event=event)
    transaction.on_commit(lambda: _enqueue(event.pk))
    return notification


def _enqueue(event_id: int) -> None:
    from rollouts.tasks import notify_event

    try:
        notify_event.delay(event_id)
    except Exception:  # the broker is down: the outbox row stays pending and the sweep re-sends it
        logger.exception("could not enqueue the notification of rollout event %s; the sweep will retry", event_id)


class DeliveryFailed(Exception):
    """One or more dispatchers failed; the notification is pending again and will be retried."""


def notification_deliver(*, event_id: int) -> str:
    """Deliver one event to every registered dispatcher that has not had it yet. Safe to run twice.

    Returns the notification's status afterwards, or "missing" when there is nothing to deliver.
    Raises `DeliveryFailed` when a dispatcher failed and another attempt is allowed."""
    now = timezone.now()
    claimed = Notification.objects.filter(event_id=event_id).filter(
        status=Notification.Status.PENDING
    ).update(status=Notification.Status.SENDING, claimed_at=now, attempts=_plus_one())
    if not claimed:
        # Take over a claim whose worker died mid-send (compare-and-set on the old claim time).
        stale = Notification.objects.filter(
            event_id=event_id, status=Notification.Status.SENDING, claimed_at__lt=now - STALE_CLAIM
        ).update(claimed_at=now, attempts=_plus_one())
        if not stale:
            current = Notification.objects.filter(event_id=event_id).values_list("status", flat=True).first()
            return current or "missing"
    notification = Notification.objects.select_related("event", "event__rollout").get(event_id=event_id)
    deliveries = dict(notification.deliveries)
    errors: list[str] = []
    for name, dispatcher in dispatchers().items():
        if deliveries.get(name) == "sent":
            continue
        try:
            dispatcher(notification.event)
        except Exception as exc:
            logger.exception("dispatcher %s failed on rollout event %s", name, event_id)
            errors.append(f"{name}: {exc}"[:200])
            continue
        deliveries[name] = "sent"
        # Record each delivery at once: a crash after this line must not resend to this dispatcher.
        Notification.objects.filter(pk=notification.pk).update(deliveries=deliveries)
    if errors:
        final = notification.attempts >= MAX_ATTEMPTS
        Notification.objects.filter(pk=notification.pk).update(
            status=Notification.Status.FAILED if final else Notification.Status.PENDING,
            last_error="; ".join(errors)[:500],
            claimed_at=None,
        )
        if final:
            return Notification.Status.FAILED
        raise DeliveryFailed("; ".join(errors))
    Notification.objects.filter(pk=notification.pk).update(
        status=Notification.Status.SENT, sent_at=timezone.now(), claimed_at=None, last_error=""
    )
    return Notification.Status.SENT


def notifications_pending(*, older_than: timedelta = timedelta(seconds=60)) -> list[int]:
    """Event ids whose notification is waiting: never tried (the broker was down on commit) or its worker
    died mid-send. One that failed and waits for its retry is left to the task's own backoff."""
    now = timezone.now()
    waiting = Q(status=Notification.Status.PENDING, attempts=0, created_at__lt=now - older_than) | Q(
        status=Notification.Status.SENDING, claimed_at__lt=now - STALE_CLAIM
    )
    return list(Notification.objects.filter(waiting).order_by("id").values_list("event_id", flat=True)[:500])


def _plus_one() -> CombinedExpression:
    return F("attempts") + 1
