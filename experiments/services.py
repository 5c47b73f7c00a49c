"""Writes of the experiments app: outcome events reported by applications, and their join to arms."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Subquery
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from config.errors import DomainError
from experiments.models import OutcomeEvent
from serving import hashing
from serving.selectors import request_records

MAX_EVENTS_PER_BATCH = 1000
# Outcomes whose request record has not arrived after this long are left unattributed.
RESOLVE_WINDOW = timedelta(hours=1)
# Clients' clocks drift: an outcome dated far in the future or the past is refused rather than guessed.
MAX_CLOCK_SKEW = timedelta(minutes=5)
MAX_EVENT_AGE = timedelta(days=7)

_ITEM_KEYS = {"id", "request_id", "session_id", "kind", "value", "name", "occurred_at"}
_THUMBS = {"up": 1.0, "down": 0.0, True: 1.0, False: 0.0}


class OutcomeBatchInvalid(DomainError):
    """A batch with bad items: each is reported by index and nothing is written."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        first, reasons = next(iter(errors.items()))
        super().__init__(f"{first}: {reasons[0]}", field=first)
        self.errors = errors

    def as_dict(self) -> dict[str, object]:
        return {"detail": self.message, "code": self.code, "errors": self.errors}


def session_hash(session_id: str) -> str:
    """The gateway's hash of a `user` field or X-Session-Id, to join an outcome to the request's arm."""
    return hashing.session_hash(session_id, key=hashing.session_key(settings.SECRET_KEY))


def _value(kind: Any, raw: Any) -> float | str:
    """The event's number, or the reason it has none."""
    if kind == OutcomeEvent.Kind.THUMBS:
        if isinstance(raw, str):
            raw = raw.lower()
        if raw in _THUMBS and not (isinstance(raw, int | float) and not isinstance(raw, bool)):
            return _THUMBS[raw]
        return "a thumbs value is 'up' or 'down' (or true / false)"
    if kind == OutcomeEvent.Kind.SUCCESS:
        if isinstance(raw, bool):
            return 1.0 if raw else 0.0
        return "a success value is true or false"
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(float(raw)):
        return "a value is a finite number"
    return float(raw)


def _item(index: int, item: Any, now: datetime, errors: dict[str, list[str]]) -> OutcomeEvent | None:
    path = f"events[{index}]"

    def bad(field: str, message: str) -> None:
        errors.setdefault(f"{path}.{field}" if field else path, []).append(message)

    if not isinstance(item, dict):
        bad("", "must be an object {request_id | session_id, kind, value}")
        return None
    for key in item:
        if key not in _ITEM_KEYS:
            bad(str(key), f"unknown field (expected one of {', '.join(sorted(_ITEM_KEYS))})")
    request_id, session_id = item.get("request_id"), item.get("session_id")
    if (request_id is None) == (session_id is None):
        bad("request_id", "give exactly one of request_id (X-Request-Id from the gateway) or session_id")
        return None
    for name, ref in (("request_id", request_id), ("session_id", session_id)):
        if ref is not None and (not isinstance(ref, str) or not ref or len(ref) > 256):
            bad(name, "must be a non-empty string of at most 256 characters")
            return None
    if request_id is not None and len(request_id) > 64:
        bad("request_id", "must be at most 64 characters")
        return None
    kind = item.get("kind")
    if kind not in OutcomeEvent.Kind.values:
        bad("kind", f"must be one of {', '.join(OutcomeEvent.Kind.values)}")
        return None
    if "value" not in item:
        bad("value", "required")
        return None
    value = _value(kind, item["value"])
    if isinstance(value, str):
        bad("value", value)
        return None
    name = item.get("name", "")
    if not isinstance(name, str) or len(name) > 64:
        bad("name", "must be text of at most 64 characters")
        return None
    event_id = item.get("id")
    if event_id is not None and (not isinstance(event_id, str) or not event_id or len(event_id) > 64):
        bad("id", "must be a non-empty string of at most 64 characters")
        return None
    occurred = now
    if item.get("occurred_at") is not None:
        parsed = parse_datetime(item["occurred_at"]) if isinstance(item["occurred_at"], str) else None
        if parsed is None or parsed.tzinfo is None:
            bad("occurred_at", "must be an ISO 8601 date and time with a time zone")
            return None
        if parsed > now + MAX_CLOCK_SKEW or parsed < now - MAX_EVENT_AGE:
            bad("occurred_at", "must be within the last 7 days and not in the future")
            return None
        occurred = parsed
    return OutcomeEvent(
        event_id=event_id,
        kind=kind,
        name=name,
        value=value,
        request_id=request_id or "",
        session_hash=session_hash(session_id) if session_id is not None else "",
        occurred_at=occurred,
    )


def outcome_events_record(*, items: list[Any], allowed_aliases: list[str] | None = None) -> dict[str, int]:
    """Validate a batch of outcome events and store them, all or nothing.

    `allowed_aliases`: those of the reporting gateway key when it is limited; the events then join only
    requests served on them.

    Returns {"accepted": stored, "duplicates": items whose `id` was already stored, "resolved": items
    joined to a rollout arm at once}. An event whose request is not recorded yet is joined later
    (`outcome_events_resolve`, every analysis interval)."""
    if not isinstance(items, list) or not items:
        raise DomainError("events must be a non-empty list", field="events")
    if len(items) > MAX_EVENTS_PER_BATCH:
        raise DomainError(f"at most {MAX_EVENTS_PER_BATCH} events per call, got {len(items)}", field="events")
    now = timezone.now()
    errors: dict[str, list[str]] = {}
    events = [_item(i, item, now, errors) for i, item in enumerate(items)]
    ids = [e.event_id for e in events if e is not None and e.event_id]
    if len(ids) != len(set(ids)):
        seen: set[str] = set()
        for i, event in enumerate(events):
            if event is not None and event.event_id:
                if event.event_id in seen:
                    errors.setdefault(f"events[{i}].id", []).append("the same id appears twice in this batch")
                seen.add(event.event_id)
    if errors:
        raise OutcomeBatchInvalid(errors)
    valid = [e for e in events if e is not None]
    for event in valid:
        event.allowed_aliases = sorted(allowed_aliases or [])
    with transaction.atomic():
        known = set(OutcomeEvent.objects.filter(event_id__in=ids).values_list("event_id", flat=True)) if ids else set()
        fresh = [e for e in valid if not (e.event_id and e.event_id in known)]
        # ignore_conflicts: a concurrent retry of the same batch inserts nothing twice.
        OutcomeEvent.objects.bulk_create(fresh, ignore_conflicts=True)
    resolved = outcome_events_resolve(since=now - timedelta(seconds=1))
    return {"accepted": len(fresh), "duplicates": len(valid) - len(fresh), "resolved": resolved}


def outcome_events_resolve(*, since: datetime | None = None) -> int:
    """Join unresolved outcome events to the arm that served their request (or the session's latest
    request before the outcome), and to that request's session, by two UPDATE statements; returns how many
    were joined."""
    now = timezone.now()
    pending = OutcomeEvent.objects.filter(resolved_at__isnull=True, created_at__gte=since or now - RESOLVE_WINDOW)
    # A retried request has a record per attempt: the outcome belongs to the one that answered (final).
    by_request = request_records().filter(request_id=OuterRef("request_id"), final=True)
    by_session = (
        request_records()
        .filter(session_hash=OuterRef("session_hash"), created_at__lte=OuterRef("occurred_at"), final=True)
        .order_by("-created_at")
    )
    # Events from keys limited to some aliases join only requests on those: one pass per distinct limit
    # (there are as many as limited keys reporting, a handful).
    limits: list[list[str]] = [[]]
    limits += [aliases for aliases in pending.exclude(allowed_aliases=[]).values_list("allowed_aliases", flat=True).distinct() if aliases]
    joined = 0
    for aliases in limits:
        events = pending.filter(allowed_aliases=aliases)
        on_request, on_session = by_request, by_session
        if aliases:
            on_request, on_session = by_request.filter(alias__in=aliases), by_session.filter(alias__in=aliases)
        for refs, source in ((events.exclude(request_id="").filter(Exists(on_request)), on_request),
                             (events.filter(request_id="").exclude(session_hash="").filter(Exists(on_session)), on_session)):  # fmt: skip
            joined += refs.update(
                rollout_id=Subquery(source.values("rollout_id")[:1]),
                arm=Subquery(source.values("arm")[:1]),
                model_version_id=Subquery(source.values("model_version_id")[:1]),
                request_created_at=Subquery(source.values("created_at")[:1]),
                # An outcome about a request belongs to that request's session: the unit of the analysis.
                session_hash=Subquery(source.values("session_hash")[:1]),
                resolved_at=now,
            )
    return joined
