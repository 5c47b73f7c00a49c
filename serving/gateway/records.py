"""Request records: a bounded buffer on the event loop, written to the database in batches off it.

The response never waits for the database. While the database is down, records wait here (and are
retried); a full buffer drops the oldest ones, and the drops are counted. Batches go to PostgreSQL by
COPY (benchmarks/README.md, "Records at volume", has its rate and the buffer's outage cover).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Field

from serving.gateway import metrics

log = logging.getLogger(__name__)

# Django wraps the driver's errors on its own cursors; COPY runs on the driver's cursor, whose errors are
# psycopg's. Both kinds are sorted the same way: the database is unreachable, or it refused the data.
_CONNECTION_ERRORS = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
_REFUSAL_ERRORS = (DatabaseError, psycopg.Error)


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
    attempt: int = 1
    final: bool = True
    assigned_arm: str = ""


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
    """Write a batch (in the writer thread) and return how many records are now stored.

    PostgreSQL gets one COPY per batch, SQLite one multi-row insert. A batch the database refuses is
    written again row by row: a row that was already stored (a batch retried after a commit whose answer
    was lost) is skipped, a row refused on its own is counted in `platform_gateway_records_refused_total`
    with the reason and logged, so one bad row never blocks the rest. Raises DatabaseDown when the
    database cannot be reached: the caller keeps the batch and tries again later."""
    if not drafts:
        return 0
    rows = [_row(draft) for draft in drafts]
    try:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                _copy(rows)
            else:
                _insert(rows)
        return len(rows)
    except _CONNECTION_ERRORS as exc:
        _reset_connection()
        raise DatabaseDown(str(exc)) from exc
    except _REFUSAL_ERRORS as exc:
        log.warning("a batch of %d request records was refused (%s); writing them one by one", len(rows), exc)
    written = 0
    for row in rows:
        try:
            with transaction.atomic():
                _insert([row])
            written += 1
        except _CONNECTION_ERRORS as exc:
            _reset_connection()
            raise DatabaseDown(str(exc)) from exc
        except _REFUSAL_ERRORS as exc:
            reason = refusal_reason(exc)
            metrics.records_refused_total.labels(reason=reason).inc()
            log.error("request record %s refused (%s): %s", row[_REQUEST_ID], reason, exc)
    return written


def refusal_reason(exc: BaseException) -> str:
    """A short, bounded label for why the database refused a row: the SQLSTATE condition where the driver
    gives one (`numeric_value_out_of_range`), else the error's class."""
    cause = exc.__cause__ if isinstance(exc, DatabaseError) and exc.__cause__ is not None else exc
    name = type(cause).__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# A draft's fields are RequestRecord's columns by name (`model_version_id` is the foreign key's column).
_COLUMN_NAMES = tuple(field.name for field in dataclasses.fields(RecordDraft))
_REQUEST_ID = _COLUMN_NAMES.index("request_id")


@functools.cache
def _target() -> tuple[str, tuple[str, ...], tuple[Field[Any, Any], ...]]:
    """The quoted table, the quoted columns in the draft's order, and their model fields."""
    from serving.models import RequestRecord

    stored = {field.attname: field for field in RequestRecord._meta.concrete_fields}
    missing = [name for name in _COLUMN_NAMES if name not in stored]
    if missing:
        raise RuntimeError(f"RecordDraft fields without a RequestRecord column: {missing}")
    fields = tuple(stored[name] for name in _COLUMN_NAMES)
    quote = connection.ops.quote_name
    columns = tuple(quote(field.column) for field in fields if field.column)
    return quote(RequestRecord._meta.db_table), columns, fields


# Free text from clients and engines, cut to the column's width instead of refusing the whole record.
_CUT = {_COLUMN_NAMES.index("alias"): 64, _COLUMN_NAMES.index("error_kind"): 64}
_TEXTS = (_COLUMN_NAMES.index("prompt_text"), _COLUMN_NAMES.index("output_text"))
_values = operator.attrgetter(*_COLUMN_NAMES)
# The test every row takes, written out (generators over _CUT and _TEXTS cost a microsecond per row, a
# fifth of the writer's own time).
_checked = operator.attrgetter("alias", "error_kind", "prompt_text", "output_text")
_ALIAS_MAX, _ERROR_KIND_MAX = _CUT[_COLUMN_NAMES.index("alias")], _CUT[_COLUMN_NAMES.index("error_kind")]


def _row(draft: RecordDraft) -> tuple[Any, ...]:
    row = _values(draft)
    alias, error_kind, prompt_text, output_text = _checked(draft)
    if len(alias) > _ALIAS_MAX or len(error_kind) > _ERROR_KIND_MAX or "\x00" in prompt_text or "\x00" in output_text:
        fixed = list(row)
        for i, width in _CUT.items():
            fixed[i] = fixed[i][:width]
        for i in _TEXTS:
            # PostgreSQL text cannot hold NUL; a prompt that carries one still deserves its record.
            fixed[i] = fixed[i].replace("\x00", "\ufffd")
        row = tuple(fixed)
    return row


@functools.cache
def _copy_types() -> tuple[str, ...]:
    # Binary COPY needs each column's type; "varchar(64)" is known to the driver as "varchar".
    return tuple(re.sub(r"\(.*\)", "", field.db_type(connection) or "") for field in _target()[2])


def _copy(rows: list[tuple[Any, ...]]) -> None:
    table, columns, _ = _target()
    with connection.cursor() as cursor:
        # The driver's own cursor: Django's wrapper has no COPY. Its errors are psycopg's, not Django's.
        # Binary: numbers and times go as they are, with no text to format and parse.
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        with cursor.cursor.copy(sql) as copy:
            copy.set_types(_copy_types())
            for row in rows:
                copy.write_row(row)


def _insert(rows: list[tuple[Any, ...]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: a row already stored is skipped, any other refusal raises. (The
    ORM's ignore_conflicts is SQLite's INSERT OR IGNORE, which also skips CHECK and NOT NULL failures
    without a word: a refused row would vanish uncounted.)"""
    table, columns, fields = _target()
    placeholders = ", ".join(["%s"] * len(columns))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"
    params = [
        [field.get_db_prep_value(value, connection, prepared=False) for field, value in zip(fields, row, strict=True)]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def _reset_connection() -> None:
    # The thread keeps its connection between batches; after a failure, start the next try afresh.
    try:
        connection.close()
    except Exception:
        log.debug("closing a broken connection failed", exc_info=True)
