"""Request records: a bounded buffer on the event loop, written to the database in batches off it.

The response never waits for the database. While the database is down, records wait here (and are
retried); a full buffer drops the oldest ones, and the drops are counted.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db import DatabaseError, InterfaceError, OperationalError, connection

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RecordDraft:
    """A request record as plain values: model instances are built in the writer thread, not per request."""

    request_id: str
    created_at: datetime
    alias: str
    rollout_id: int | None
    arm: str
    model_version_id: int | None
    engine_worker_id: int | None
    endpoint: str
    stream: bool
    session_hash: str
    prompt_hash: str
    prompt_chars: int
    status_code: int
    outcome: str
    error_kind: str = ""
    failover: bool = False
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_text: str = ""
    output_text: str = ""


class RecordBuffer:
    """FIFO of drafts, at most `capacity`; only the event loop's thread touches it."""

    def __init__(self, capacity: int, *, on_drop: Callable[[int], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[RecordDraft] = deque()
        self.dropped = 0
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._items)

    def add(self, draft: RecordDraft) -> None:
        self._items.append(draft)
        self._trim()

    def take(self, limit: int) -> list[RecordDraft]:
        """The oldest `limit` drafts, removed; give them back with `put_back` if writing them fails."""
        items = self._items
        count = min(limit, len(items))
        return [items.popleft() for _ in range(count)]

    def put_back(self, batch: Iterable[RecordDraft]) -> None:
        """Return a batch that could not be written to the front, still dropping the oldest when full."""
        self._items.extendleft(reversed(list(batch)))
        self._trim()

    def _trim(self) -> None:
        excess = len(self._items) - self.capacity
        if excess > 0:
            for _ in range(excess):
                self._items.popleft()
            self.dropped += excess
            if self._on_drop is not None:
                self._on_drop(excess)


class DatabaseDown(Exception):
    """The batch was not written because the database could not be reached; retry it later."""


def records_write(drafts: list[RecordDraft]) -> int:
    """Write a batch (in the writer thread). Raises DatabaseDown when it should be retried; a row the
    database refuses for another reason is logged and skipped, so one bad row never blocks the rest."""
    from serving.models import RequestRecord

    rows = [RequestRecord(**_fields(draft)) for draft in drafts]
    try:
        # ignore_conflicts: a batch retried after a commit whose answer was lost must not fail forever.
        RequestRecord.objects.bulk_create(rows, ignore_conflicts=True)
        return len(rows)
    except (OperationalError, InterfaceError) as exc:
        _reset_connection()
        raise DatabaseDown(str(exc)) from exc
    except DatabaseError:
        log.exception("a batch of %d request records was refused; writing them one by one", len(rows))
    written = 0
    for row in rows:
        try:
            RequestRecord.objects.bulk_create([row], ignore_conflicts=True)
            written += 1
        except (OperationalError, InterfaceError) as exc:
            _reset_connection()
            raise DatabaseDown(str(exc)) from exc
        except DatabaseError:
            log.exception("request record %s refused; skipped", row.request_id)
    return written


def _fields(draft: RecordDraft) -> dict[str, object]:
    return {
        "request_id": draft.request_id,
        "created_at": draft.created_at,
        "alias": draft.alias[:64],
        "rollout_id": draft.rollout_id,
        "arm": draft.arm,
        "model_version_id": draft.model_version_id,
        "engine_worker_id": draft.engine_worker_id,
        "endpoint": draft.endpoint,
        "stream": draft.stream,
        "session_hash": draft.session_hash,
        "prompt_hash": draft.prompt_hash,
        "prompt_chars": draft.prompt_chars,
        "status_code": draft.status_code,
        "outcome": draft.outcome,
        "error_kind": draft.error_kind[:64],
        "failover": draft.failover,
        "ttft_ms": draft.ttft_ms,
        "tpot_ms": draft.tpot_ms,
        "e2e_ms": draft.e2e_ms,
        "prompt_tokens": draft.prompt_tokens,
        "completion_tokens": draft.completion_tokens,
        "prompt_text": draft.prompt_text,
        "output_text": draft.output_text,
    }


def _reset_connection() -> None:
    # The thread keeps its connection between batches; after a failure, start the next try afresh.
    try:
        connection.close()
    except Exception:
        log.debug("closing a broken connection failed", exc_info=True)
