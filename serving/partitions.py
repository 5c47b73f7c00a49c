"""Request records on PostgreSQL: one partition per UTC day (declarative range partitioning on created_at).

Why: at 1,000 requests/s an alias writes 86 million records a day. Old days then go by `DROP TABLE` of
their partition (no row-by-row delete, no vacuum debt), and a look of a live rollout touches the days it
covers only. Beat creates each day's partition `PARTITIONS_AHEAD` days before it starts; anything that
arrives outside every day partition (a clock far off, beat stopped for days) lands in the default
partition rather than being refused, and is moved into its day when that day's partition is created.

The table keeps the model's columns, indexes, checks and foreign keys under their Django names, so later
migrations find what they expect; the primary key and every unique constraint also include created_at (a
partitioned table can only enforce uniqueness within a partition). One column is PostgreSQL's own and not
in the model: `commit_xid`, the id of the transaction that wrote the row (`pg_current_xact_id()`), the
commit order incremental looks read by (experiments.rollups). SQLite keeps a plain table.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db import connection, transaction

log = logging.getLogger(__name__)

TABLE = "serving_requestrecord"
DEFAULT_PARTITION = f"{TABLE}_default"
PARTITIONS_AHEAD = 3
_DAY_NAME = re.compile(rf"^{TABLE}_p(\d{{8}})$")
# The commit order of a record: all of one batch's rows share it, and a look reads below the oldest
# transaction still running (experiments.rollups), so a batch that commits late is read by a later look.
COMMIT_XID_DEFAULT = "pg_current_xact_id()::text::bigint"


def partitioned() -> bool:
    """Is the request-record table partitioned here (PostgreSQL after migration serving 0004)?"""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as own:
        own.execute("SELECT relkind FROM pg_class WHERE relname = %s AND relnamespace = current_schema()::regnamespace",
                    [TABLE])  # fmt: skip
        row = own.fetchone()
    return row is not None and row[0] == "p"


def partition_name(day: date) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


def _bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=UTC)
    return start, start + timedelta(days=1)


def record_partitions() -> dict[str, date]:
    """The day partitions that exist, by name."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            [TABLE],
        )
        names = [row[0] for row in cursor.fetchall()]
    days = {}
    for name in names:
        match = _DAY_NAME.match(name)
        if match:
            days[name] = datetime.strptime(match.group(1), "%Y%m%d").date()
    return days


def partition_create(*, day: date) -> bool:
    """Create the day's partition if it is missing; rows of that day already in the default partition are
    moved into it in the same transaction. Returns whether it was created."""
    name = partition_name(day)
    start, end = _bounds(day)
    with transaction.atomic(), connection.cursor() as cursor:
        # One creator at a time (two beats, or a beat and a migration): the loser finds it there.
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [TABLE])
        cursor.execute("SELECT to_regclass(%s)", [name])
        if cursor.fetchone()[0] is not None:
            return False
        cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION} WHERE created_at >= %s AND created_at < %s)",
                       [start, end])  # fmt: skip
        strays = cursor.fetchone()[0]
        if not strays:
            cursor.execute(f"CREATE TABLE {name} PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)", [start, end])
            return True
        # The default partition holds rows of this day: PostgreSQL refuses the new partition while they are
        # there. Take the default out, create the day, move its rows through the parent, put it back.
        log.warning("moving request records of %s out of the default partition", day)
        cursor.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {DEFAULT_PARTITION}")
        cursor.execute(f"CREATE TABLE {name} PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)", [start, end])
        cursor.execute(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE created_at >= %s AND created_at < %s RETURNING *) "
            f"INSERT INTO {TABLE} SELECT * FROM moved",
            [start, end],
        )
        cursor.execute(f"ALTER TABLE {TABLE} ATTACH PARTITION {DEFAULT_PARTITION} DEFAULT")
        return True


def record_partitions_ensure(*, today: date, ahead: int = PARTITIONS_AHEAD) -> list[str]:
    """Today's partition and the next `ahead` days', those missing created. Safe to run twice."""
    created = []
    for offset in range(ahead + 1):
        day = today + timedelta(days=offset)
        if partition_create(day=day):
            created.append(partition_name(day))
    return created


def record_partition_analyse(*, day: date) -> bool:
    """ANALYZE the day's partition (False when it does not exist). The planner's choices for a look's reads
    of the day (each new session's history in experiments.analysis.preperiod, the fold's new records) follow
    its statistics. Autovacuum keeps them on a default server, but with it off (this project's CI server) or
    in the first burst of a new day they were missing, and the history of each session was read by filtering
    the alias's whole hour: 22 s a look for 150 new sessions (benchmarks/decision_policy.py). Beat analyses
    today's partition hourly (`serving.tasks.record_partitions_ensure`); ANALYZE samples at most 30,000 rows."""
    name = partition_name(day)
    if name not in record_partitions():
        return False
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {name}")
    return True


@dataclass(frozen=True)
class PartitionExpiry:
    dropped: tuple[str, ...]
    held: tuple[str, ...]
    default_rows_deleted: int


def record_partitions_expire(*, cutoff: datetime, holds: list[tuple[int, datetime]]) -> PartitionExpiry:
    """Drop each day partition that ended at or before `cutoff`, unless it holds records that a hold
    (rollout id, since) still needs; delete the default partition's expired rows that no hold covers."""
    dropped, held = [], []
    for name, day in sorted(record_partitions().items(), key=lambda item: item[1]):
        _, end = _bounds(day)
        if end > cutoff:
            continue
        with transaction.atomic(), connection.cursor() as cursor:
            needed = False
            for rollout_id, since in holds:
                if since >= end:
                    continue
                cursor.execute(
                    f"SELECT EXISTS (SELECT 1 FROM {name} WHERE rollout_id = %s AND created_at >= %s)",
                    [rollout_id, since],
                )
                if cursor.fetchone()[0]:
                    needed = True
                    break
            if needed:
                held.append(name)
                continue
            # Foreign-key checks still pending in this transaction would make PostgreSQL refuse the DROP.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            # DETACH first: the parent is locked only for the detach, and a concurrent look sees either the
            # whole day or none of it.
            cursor.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {name}")
            cursor.execute(f"DROP TABLE {name}")
            dropped.append(name)
    deleted = 0
    with transaction.atomic(), connection.cursor() as cursor:
        keep = " OR ".join(["(rollout_id = %s AND created_at >= %s)"] * len(holds)) or "FALSE"
        params: list[Any] = [cutoff]
        for rollout_id, since in holds:
            params += [rollout_id, since]
        # COALESCE: a record of no rollout has a NULL rollout_id, which no hold covers.
        cursor.execute(f"DELETE FROM {DEFAULT_PARTITION} WHERE created_at < %s AND NOT COALESCE({keep}, FALSE)", params)
        deleted = cursor.rowcount
    if dropped:
        log.info("dropped request-record partitions %s", ", ".join(dropped))
    return PartitionExpiry(dropped=tuple(dropped), held=tuple(held), default_rows_deleted=deleted)


# --- the conversion (migration serving 0004) ----------------------------------------------------------------


def table_partition(schema_editor: Any, *, today: date, retention_days: int) -> None:
    """Turn the plain request-record table into the partitioned one, rows, indexes, constraints and all.

    Generic over the columns (whatever migrations made them): the new table is created LIKE the old one,
    then each index and constraint of the old one is made again under its own name, with created_at added
    to the primary key and to every unique one."""
    execute = schema_editor.execute
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.conname, c.contype, pg_get_constraintdef(c.oid), i.relname "
            "FROM pg_constraint c LEFT JOIN pg_class i ON i.oid = c.conindid "
            "WHERE c.conrelid = %s::regclass AND c.contype IN ('p', 'u', 'f')",
            [TABLE],
        )
        constraints = cursor.fetchall()
        cursor.execute(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE x.indrelid = %s::regclass AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid AND c.contype IN ('p', 'u'))",
            [TABLE],
        )
        indexes = cursor.fetchall()
        cursor.execute(f"SELECT min(created_at) FROM {TABLE}")
        oldest = cursor.fetchone()[0]
    old = f"{TABLE}_unpartitioned"
    execute(f"ALTER TABLE {TABLE} RENAME TO {old}")
    # Index and constraint names are per schema: the old ones step aside for the new table's.
    for name, kind, _, _ in constraints:
        if kind in ("p", "u", "f"):
            execute(f'ALTER TABLE {old} RENAME CONSTRAINT "{name}" TO "{name[:50]}_old"')
    for name, _ in indexes:
        execute(f'ALTER INDEX "{name}" RENAME TO "{name[:50]}_old"')
    execute(
        f"CREATE TABLE {TABLE} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS "
        f"INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE (created_at)"
    )
    execute(f"ALTER TABLE {TABLE} ADD COLUMN commit_xid bigint NOT NULL DEFAULT {COMMIT_XID_DEFAULT}")
    for name, kind, definition, _ in constraints:
        if kind in ("p", "u"):
            columns = re.fullmatch(r"(PRIMARY KEY|UNIQUE) \((.*)\)", definition)
            if columns is None:
                raise RuntimeError(f"{name}: cannot partition a constraint defined as {definition!r}")
            names = [c.strip() for c in columns.group(2).split(",")]
            if "created_at" not in names:
                names.append("created_at")
            execute(f'ALTER TABLE {TABLE} ADD CONSTRAINT "{name}" {columns.group(1)} ({", ".join(names)})')
        else:
            execute(f'ALTER TABLE {TABLE} ADD CONSTRAINT "{name}" {definition}')
    for _, definition in indexes:
        # Read before the renames: "CREATE INDEX <its name> ON public.serving_requestrecord ...", the new table.
        execute(definition)
    execute(f"CREATE INDEX {TABLE}_rollout_commit ON {TABLE} (rollout_id, commit_xid)")
    execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT")
    # A day partition for each day of the rows kept (within the retention); older ones go to the default.
    day = today if oldest is None else min(today, max(today - timedelta(days=retention_days), oldest.astimezone(UTC).date()))
    while day <= today + timedelta(days=PARTITIONS_AHEAD):
        start, end = _bounds(day)
        execute(f"CREATE TABLE {partition_name(day)} PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)", [start, end])
        day += timedelta(days=1)
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            [old],
        )
        columns = cursor.fetchone()[0]
    execute(f"INSERT INTO {TABLE} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM {old}")
    execute(f"DROP TABLE {old}")
    # The identity sequence of the new table starts over: it goes on from the highest id moved.
    execute(
        f"SELECT setval(pg_get_serial_sequence('{TABLE}', 'id'), COALESCE((SELECT max(id) FROM {TABLE}), 0) + 1, false)"
    )
