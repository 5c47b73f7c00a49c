"""Request records and looks at production volume, on PostgreSQL.

    BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/ramp_bench \\
        .venv/bin/python benchmarks/analysis_volume.py --records 20000000
    ... --phases ingest             # only the record writer's throughput and the buffer's outage cover
    ... --phases looks --before d5f8974   # the looks on the kept fill, the fold at d5f8974 timed beside today's

The database named by BENCH_DATABASE_URL is created if it is missing and migrated; the benchmark owns it
(it fills it, and drops it with --drop). What it measures, phase by phase (`--phases`, all by default):

fill     `--records` request records over the 24 h before the run (10 % in the live A/B rollout), by binary
         COPY; kept between runs.
looks    The live rollout's window from scratch, its first incremental look (cold), steady folds after
         10,000 new records each (sticky sessions, most already in the window), the check that they equal
         the from-scratch computation, and the whole look (rollout_look: fold, checks, policy); wall time
         and CPU per look (this process and its PostgreSQL backend). `--before REV`: the fold of
         experiments/rollups.py at git revision REV, on a window of its own, interleaved with today's;
         with `--cold-looks N` also both first folds N times each first, alternating (medians, ranges).
pages    /experiments (50 A/B rollouts, each with stored looks) and the dashboard through the test client,
         and the list's rows built as now and as before, side by side.
ingest   The gateway's record writer (`serving.gateway.records.records_write`) into the request-record
         table as it stands (after the fill, if there was one): batches of GATEWAY_RECORD_BATCH drafts,
         COPY against the ORM's multi-row INSERT it replaced, in interleaved rounds (median records/s of
         each, and the ratio); then the whole path through a gateway's buffer and flusher in one process
         (drafts added on the event loop as fast as it can, until every one is written); then a database
         outage in real time: drafts at --outage-rate per second for --outage-s seconds while every write
         fails, then the database back: when the first record was dropped, how many, and how long the
         backlog took to drain. Its records are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INGEST_ALIAS = "bench-ingest"


# --- set-up --------------------------------------------------------------------------------------------------


def database_open(url: str, *, var: str = "bench-volume") -> None:
    """Create the database if it is missing, point Django at it and migrate it (`var`: the folder under var/
    for the platform's files, unless PLATFORM_VAR_DIR names one). benchmarks/shadow_quality.py opens its own
    database with it too."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    os.environ.update({
        "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "config.settings", "LOG_LEVEL": "WARNING",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(40),
        "PLATFORM_VAR_DIR": os.environ.get("PLATFORM_VAR_DIR") or str(REPO / "var" / var),
    })  # fmt: skip
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def database_drop(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parts.path.lstrip("/")}" WITH (FORCE)')


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- ingest --------------------------------------------------------------------------------------------------


@functools.cache
def ingest_version() -> int:
    """The model version the ingest's records name (as every served record does: its foreign key is checked
    at each batch's commit)."""
    from tests.rollouts.helpers import version

    return version("bench-ingest-v1", ready=False).pk


def drafts_make(count: int, *, rng_seed: int = 7) -> list[Any]:
    """Drafts as the gateway makes them: random ids and hashes, the model version that served them, a
    streamed success with every timing."""
    import random

    from serving.gateway.records import RecordDraft

    version_id = ingest_version()
    rng = random.Random(rng_seed)
    sessions = [secrets.token_hex(16) for _ in range(max(1, count // 10))]
    now = datetime.now(UTC)
    return [
        RecordDraft(
            request_id=uuid.uuid4().hex, created_at=now, alias=INGEST_ALIAS, rollout_id=None,
            arm="baseline" if rng.random() < 0.9 else "candidate", model_version_id=version_id, engine_worker_id=None,
            endpoint="chat.completions", stream=True, session_hash=rng.choice(sessions),
            prompt_hash=secrets.token_hex(16), prompt_chars=rng.randint(20, 4000), status_code=200, outcome="ok",
            ttft_ms=rng.lognormvariate(4, 0.5), tpot_ms=rng.lognormvariate(3, 0.3), e2e_ms=rng.lognormvariate(6, 0.5),
            prompt_tokens=rng.randint(5, 1000), completion_tokens=rng.randint(1, 500),
        )
        for _ in range(count)
    ]


def orm_write(drafts: list[Any]) -> int:
    """The writer this one replaced: the ORM's multi-row INSERT ... ON CONFLICT DO NOTHING."""
    import dataclasses

    from serving.models import RequestRecord

    rows = [RequestRecord(**dataclasses.asdict(d)) for d in drafts]
    RequestRecord.objects.bulk_create(rows, ignore_conflicts=True)
    return len(rows)


def ingest_cleanup() -> None:
    from serving.models import RequestRecord

    RequestRecord.objects.filter(alias=INGEST_ALIAS).delete()


def backend_cpu_s() -> float:
    """CPU seconds of this connection's PostgreSQL backend so far (the server runs on this machine)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_s() -> float:
    """CPU seconds of every process of the PostgreSQL server so far, those that have exited included (their
    times are added to the postmaster's once it has reaped them): a first fold in parts runs on connections
    of its own, which close when it ends."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]

    def stat(of: int | str) -> list[str]:
        return Path(f"/proc/{of}/stat").read_text().rsplit(")", 1)[1].split()

    postmaster = int(stat(pid)[1])
    ticks = sum(int(v) for v in stat(postmaster)[11:15])  # its own time and its reaped children's
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = stat(entry.name)
            except OSError:  # (gone meanwhile)
                continue
            if int(fields[1]) == postmaster:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def ingest_side_by_side(*, batch: int, rounds: int, batches_per_round: int) -> dict[str, dict[str, float]]:
    """Per writer: the median records/s over the rounds, and CPU microseconds per record in this process
    and in its PostgreSQL backend (what the rate would be on idle cores follows from those)."""
    from serving.gateway.records import records_write

    writers: dict[str, Callable[[list[Any]], int]] = {"COPY (records_write)": records_write, "ORM bulk_create": orm_write}
    rates: dict[str, list[float]] = {name: [] for name in writers}
    client: dict[str, list[float]] = {name: [] for name in writers}
    server: dict[str, list[float]] = {name: [] for name in writers}
    for round_index in range(rounds):
        order = list(writers.items()) if round_index % 2 == 0 else list(reversed(writers.items()))
        for name, write in order:
            drafts = drafts_make(batch * batches_per_round, rng_seed=round_index)
            batches = [drafts[i : i + batch] for i in range(0, len(drafts), batch)]
            server_before, client_before = backend_cpu_s(), time.process_time()
            started = time.perf_counter()
            written = sum(write(b) for b in batches)
            elapsed = time.perf_counter() - started
            client[name].append((time.process_time() - client_before) / written * 1e6)
            server[name].append((backend_cpu_s() - server_before) / written * 1e6)
            assert written == len(drafts), (name, written, len(drafts))
            rates[name].append(written / elapsed)
    return {
        name: {"rate": median(rates[name]), "client_us": median(client[name]), "server_us": median(server[name])}
        for name in writers
    }


def gateway_make(*, writer: Callable[[list[Any]], int], buffer: int, batch: int, flush_s: float) -> Any:
    from serving.gateway.app import Gateway, GatewayConfig
    from serving.gateway.routing import RouteRows

    config = GatewayConfig(record_buffer=buffer, record_batch=batch, record_flush_s=flush_s, route_poll_s=60.0)
    return Gateway(
        config,
        rows_loader=lambda: RouteRows(version=(1, ""), aliases=(), workers=(), keys=()),
        version_reader=lambda: (1, ""),
        records_writer=writer,
    )


def ingest_through_gateway(*, count: int, batch: int, flush_s: float) -> tuple[float, int]:
    """Records per second through one gateway's buffer and flusher, its event loop adding drafts flat out."""
    from serving.gateway.records import records_write

    drafts = drafts_make(count, rng_seed=99)
    written = 0

    def writer(b: list[Any]) -> int:
        nonlocal written
        done = records_write(b)
        written += done
        return done

    async def scenario() -> float:
        gateway = gateway_make(writer=writer, buffer=count + 1, batch=batch, flush_s=flush_s)
        await gateway.startup()
        started = time.perf_counter()
        for i, draft in enumerate(drafts):
            gateway.recorder.add(draft)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # as between requests: the flusher gets its turn
        while written < count:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        await gateway.shutdown()
        return elapsed

    elapsed = asyncio.run(scenario())
    return count / elapsed, written


def ingest_outage(*, rate: float, outage_s: float, buffer: int, batch: int, flush_s: float) -> dict[str, Any]:
    """`rate` drafts per second in real time; every write fails for `outage_s`, then the database is back."""
    from serving.gateway.records import DatabaseDown, records_write

    state: dict[str, Any] = {"down": True, "written": 0}

    def writer(b: list[Any]) -> int:
        if state["down"]:
            raise DatabaseDown("outage (simulated by the benchmark)")
        done = records_write(b)
        state["written"] += done
        return done

    total = int(rate * outage_s)
    drafts = drafts_make(total, rng_seed=5)

    async def scenario() -> dict[str, Any]:
        gateway = gateway_make(writer=writer, buffer=buffer, batch=batch, flush_s=flush_s)
        await gateway.startup()
        started = time.perf_counter()
        first_drop: float | None = None
        for i, draft in enumerate(drafts):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            gateway.recorder.add(draft)
            if first_drop is None and gateway.recorder.buffer.dropped:
                first_drop = time.perf_counter() - started
        state["down"] = False
        back = time.perf_counter()
        backlog = len(gateway.recorder.buffer)
        gateway.recorder.wake()
        while len(gateway.recorder.buffer) or state["written"] < backlog:
            await asyncio.sleep(0.01)
        drain_s = time.perf_counter() - back
        dropped = gateway.recorder.buffer.dropped
        await gateway.shutdown()
        return {"first_drop_s": first_drop, "dropped": dropped, "backlog": backlog, "drain_s": drain_s,
                "written": state["written"]}  # fmt: skip

    return asyncio.run(scenario())


def ingest_phase(args: argparse.Namespace) -> None:
    from django.conf import settings

    from serving.models import RequestRecord

    batch = settings.GATEWAY_RECORD_BATCH
    existing = RequestRecord.objects.count()
    print(f"\n== ingest: the gateway's record writer into a table of {existing:,} records "
          f"(batches of {batch}, one process)")  # fmt: skip
    ingest_cleanup()
    try:
        rates = ingest_side_by_side(batch=batch, rounds=args.ingest_rounds, batches_per_round=args.ingest_batches)
        copy_rate, orm_rate = rates["COPY (records_write)"]["rate"], rates["ORM bulk_create"]["rate"]
        print(f"  {args.ingest_rounds} interleaved rounds of {args.ingest_batches} batches each (medians); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
        print(f"    {'writer':<22} {'records/s':>10} {'client us/rec':>14} {'server us/rec':>14} {'idle-core bound':>16}")
        for name, row in rates.items():
            bound = 1e6 / (row["client_us"] + row["server_us"])
            print(f"    {name:<22} {row['rate']:>10,.0f} {row['client_us']:>14.1f} {row['server_us']:>14.1f} "
                  f"{bound:>15,.0f}/s")  # fmt: skip
        print(f"    ratio COPY / ORM       {copy_rate / orm_rate:>10.2f}x  (target: COPY >= 20,000/s)")
        print("    (idle-core bound: 1 / (client + server CPU per record), the rate with both sides on a core "
              "each and no overlap)")
        through, written = ingest_through_gateway(
            count=args.ingest_gateway, batch=batch, flush_s=settings.GATEWAY_RECORD_FLUSH_S
        )
        print(f"  through a gateway's buffer and flusher: {written:,} records at {through:,.0f}/s")
        capacity = settings.GATEWAY_RECORD_BUFFER
        print(f"  outage at {args.outage_rate:,.0f} records/s for {args.outage_s:.0f} s, buffer {capacity:,} "
              f"(GATEWAY_RECORD_BUFFER): covers {capacity / args.outage_rate:.1f} s by its size")  # fmt: skip
        outage = ingest_outage(
            rate=args.outage_rate, outage_s=args.outage_s, buffer=capacity, batch=batch,
            flush_s=settings.GATEWAY_RECORD_FLUSH_S,
        )  # fmt: skip
        first = outage["first_drop_s"]
        print(f"    first record dropped after {first:.1f} s" if first is not None else "    no record dropped")
        print(f"    dropped {outage['dropped']:,}; backlog {outage['backlog']:,} written in {outage['drain_s']:.2f} s "
              f"once the database was back")  # fmt: skip
    finally:
        ingest_cleanup()


# --- fill ----------------------------------------------------------------------------------------------------

LIVE_ALIAS = "bench-ab-00"
ROLLOUTS = 50  # A/B rollouts on the experiments page: the first live, the others ended
PLAIN_ALIAS = "bench-plain"  # same width as the rollouts' aliases (the binary rows have a fixed layout)
FILL_CHUNK = 500_000
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds: binary COPY's timestamp origin
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_ids(high: Any, low: Any) -> Any:
    """32 hex characters per row from two uint64 arrays."""
    raw = np.empty((len(high), 16), dtype=np.uint8)
    raw[:, :8] = high.astype(">u8").view(np.uint8).reshape(-1, 8)
    raw[:, 8:] = low.astype(">u8").view(np.uint8).reshape(-1, 8)
    out = np.empty((len(high), 32), dtype=np.uint8)
    out[:, 0::2] = _HEX[raw >> 4]
    out[:, 1::2] = _HEX[raw & 15]
    return out.view("S32").ravel()


def binary_rows(n: int, columns: list[tuple[str, str, Any]]) -> bytes:
    """`n` rows of PostgreSQL's binary COPY format (no header), one fixed layout: per column (name, type,
    value), value an array of n, a scalar for every row, or None for NULL."""
    import numpy as np

    formats = {"smallint": ">i2", "integer": ">i4", "bigint": ">i8", "double precision": ">f8", "boolean": "u1",
               "timestamp with time zone": ">i8"}  # fmt: skip
    fields: list[tuple[str, Any]] = [("count", ">i2")]
    plan: list[tuple[int, Any, int]] = []
    for i, (_, kind, value) in enumerate(columns):
        fields.append((f"l{i}", ">i4"))
        if value is None:
            plan.append((i, None, -1))
            continue
        if kind in formats:
            dtype: Any = formats[kind]
            size = np.dtype(dtype).itemsize
        else:  # varchar / text: fixed width in this layout
            width = value.dtype.itemsize if isinstance(value, np.ndarray) else len(value)
            dtype, size = f"S{width}", width
        if size:
            fields.append((f"v{i}", dtype))
        plan.append((i, value, size))
    rows = np.zeros(n, dtype=fields)
    rows["count"] = len(columns)
    for i, value, size in plan:
        rows[f"l{i}"] = size
        if value is not None and size:
            rows[f"v{i}"] = value
    return rows.tobytes()


def ab_plan(k: int) -> dict[str, Any]:
    return {
        "alias": f"bench-ab-{k:02d}", "baseline": "bench-v1", "candidate": "bench-v2", "strategy": "ab",
        "ab": {"weight": 0.5, "min_duration_s": 3600, "horizon_s": 604800},
        "primary_metric": {"metric": "tpot_mean_ms", "min_effect": 1.0},
        "guardrails": [{"metric": "error_rate", "margin": 0.005}, {"metric": "ttft_mean_ms", "margin": "15%"}],
    }  # fmt: skip


def fill_rollouts(stamp: datetime) -> list[int]:
    """ROLLOUTS A/B rollouts on their own aliases, all started a day ago; ids in alias order."""
    from rollouts.actors import SYSTEM
    from rollouts.models import Rollout
    from rollouts.services import rollout_create
    from tests.rollouts.helpers import version

    version("bench-v1")
    version("bench-v2")
    ids = []
    for k in range(ROLLOUTS):
        rollout = rollout_create(plan=ab_plan(k), actor=SYSTEM, start=True).rollout
        ids.append(rollout.pk)
    day_ago = stamp - timedelta(days=1)
    Rollout.objects.filter(pk__in=ids).update(
        created_at=day_ago - timedelta(minutes=5), started_at=day_ago, step_started_at=day_ago - timedelta(minutes=1)
    )
    return ids


def fill_chunk(*, rng: Any, n: int, chunk: int, stamp_us: int, rollout_ids: list[int], versions: tuple[int, int],
               columns: list[tuple[str, str]]) -> list[bytes]:  # fmt: skip
    """One chunk of `n` records over the 24 h before the stamp: 10 % in the live rollout, 40 % spread over
    the ended ones, the rest on an alias with no rollout. Users are sticky to an arm, their request counts
    heavy-tailed (lognormal, median 10), their latencies shifted by a per-user factor; the candidate's TTFT
    is 5 % longer; 0.5 % engine errors. Returned as binary COPY rows, one blob per fixed layout."""
    import numpy as np

    share = rng.random(n)
    group = np.where(share < 0.10, 0, np.where(share < 0.50, 1 + rng.integers(0, ROLLOUTS - 1, n), -1))
    # Sessions: counts per user until the chunk is covered, each user one arm (50/50).
    counts = np.maximum(1, np.round(rng.lognormal(np.log(10), 1.2, n // 4 + 16))).astype(np.int64)
    counts = counts[: int(np.searchsorted(np.cumsum(counts), n)) + 1]
    user = np.repeat(np.arange(len(counts)), counts)[:n]
    rng.shuffle(user)
    user_arm = rng.random(len(counts)) < 0.5
    user_factor = rng.lognormal(0.0, 0.3, len(counts))
    candidate = user_arm[user]
    error = rng.random(n) < 0.005
    created_us = stamp_us - rng.integers(0, 86_400_000_000, n) - PG_EPOCH_US
    tokens_c = np.maximum(2, rng.integers(2, 200, n))
    tokens_p = rng.integers(5, 800, n)
    ttft = user_factor[user] * rng.lognormal(np.log(120.0), 0.5, n) * np.where(candidate, 1.05, 1.0)
    tpot = user_factor[user] * rng.lognormal(np.log(25.0), 0.3, n)
    e2e = ttft + tpot * (tokens_c - 1)
    request_ids = hex_ids(np.full(n, chunk, dtype=np.uint64), np.arange(n, dtype=np.uint64))
    sessions = hex_ids(np.full(len(counts), 0xB0000000 + chunk, dtype=np.uint64), np.arange(len(counts), dtype=np.uint64))
    rollout_of = np.array(rollout_ids, dtype=np.int64)
    blobs = []
    for in_rollout in (True, False):
        for is_candidate in (False, True):
            for failed in (False, True):
                pick = (group >= 0) == in_rollout
                pick &= candidate == is_candidate
                pick &= error == failed
                idx = np.nonzero(pick)[0]
                if not len(idx):
                    continue
                arm = b"candidate" if is_candidate else b"baseline"
                alias = np.char.add(b"bench-ab-", np.char.zfill(group[idx].astype("S2"), 2)) if in_rollout else PLAIN_ALIAS.encode()
                values = {
                    "request_id": request_ids[idx], "created_at": created_us[idx], "alias": alias,
                    "rollout_id": rollout_of[group[idx]] if in_rollout else None, "arm": arm, "assigned_arm": arm,
                    "attempt": 1, "final": True,
                    "model_version_id": versions[1] if is_candidate else versions[0], "engine_worker_id": None,
                    "endpoint": b"chat.completions", "stream": True, "session_hash": sessions[user[idx]],
                    "prompt_hash": b"", "prompt_chars": tokens_p[idx] * 4, "status_code": 502 if failed else 200,
                    "outcome": b"engine_error" if failed else b"ok", "error_kind": b"http_502" if failed else b"",
                    "failover": False, "ttft_ms": None if failed else ttft[idx], "tpot_ms": None if failed else tpot[idx],
                    "e2e_ms": e2e[idx], "prompt_tokens": None if failed else tokens_p[idx],
                    "completion_tokens": None if failed else tokens_c[idx], "prompt_text": b"", "output_text": b"",
                }  # fmt: skip
                missing = [name for name, _ in columns if name not in values]
                if missing:
                    raise RuntimeError(f"the fill does not know the columns {missing}: teach fill_chunk about them")
                blobs.append(binary_rows(len(idx), [(name, kind, values[name]) for name, kind in columns]))
    return blobs


def fill_columns() -> list[tuple[str, str]]:
    """The request-record table's columns the fill writes (all but the id and the commit order), with types."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'serving_requestrecord'::regclass "
            "AND attnum > 0 AND NOT attisdropped AND attname NOT IN ('id', 'commit_xid') ORDER BY attnum"
        )
        return [(name, "varchar" if kind == "character varying" else kind) for name, kind in cursor.fetchall()]


def fill_without_indexes() -> tuple[list[str], list[str]]:
    """Drop the table's indexes, keys and foreign keys for the fill, and return the statements that make
    them again (built once over the filled table: far faster than maintaining each with every row)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'serving_requestrecord'::regclass AND contype IN ('p', 'u', 'f')"
        )
        constraints = cursor.fetchall()
        cursor.execute(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE x.indrelid = 'serving_requestrecord'::regclass AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid AND c.contype IN ('p', 'u'))"
        )
        indexes = cursor.fetchall()
        drops = [f'DROP INDEX "{name}"' for name, _ in indexes]
        drops += [f'ALTER TABLE serving_requestrecord DROP CONSTRAINT "{name}"' for name, _ in constraints]
        for statement in drops:
            cursor.execute(statement)
    remake = [f'ALTER TABLE serving_requestrecord ADD CONSTRAINT "{name}" {definition}' for name, definition in constraints]
    # A partitioned table's definition says "ON ONLY" (the parent alone): the index is wanted on every day.
    return remake, [definition.replace(" ON ONLY ", " ON ", 1) for _, definition in indexes]


def fill_state() -> dict[str, Any] | None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS bench_volume_fill (records bigint, live_rollout bigint, "
                       "rollouts bigint[], stamp timestamptz)")  # fmt: skip
        cursor.execute("SELECT records, live_rollout, rollouts, stamp FROM bench_volume_fill")
        row = cursor.fetchone()
    if row is None:
        return None
    return {"records": row[0], "live_rollout": row[1], "rollouts": list(row[2]), "stamp": row[3]}


def fill_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the table with `--records` records (kept between runs: a second run with the same count
    reuses them)."""
    from django.db import connection
    from django.utils import timezone

    from serving.partitions import partition_create

    state = fill_state()
    if state is not None and state["records"] == args.records:
        print(f"\n== fill: reusing {state['records']:,} records written at {state['stamp']:%Y-%m-%d %H:%M} UTC")
        return state
    if state is not None:
        raise SystemExit(f"the database holds a fill of {state['records']:,} records; --drop it first")
    stamp = timezone.now().replace(microsecond=0)
    print(f"\n== fill: {args.records:,} records over the 24 h before {stamp:%Y-%m-%d %H:%M} UTC, by binary COPY")
    for day in (stamp - timedelta(days=1)).date(), stamp.date():
        partition_create(day=day)
    rollout_ids = fill_rollouts(stamp)
    from serving.models import ModelVersion

    versions = (
        ModelVersion.objects.get(name="bench", version="v1").pk, ModelVersion.objects.get(name="bench", version="v2").pk
    )
    columns = fill_columns()
    rng = np.random.default_rng(args.seed)
    stamp_us = int(stamp.timestamp() * 1_000_000)
    started = time.perf_counter()
    written = 0
    column_list = ", ".join(name for name, _ in columns)
    remake_constraints, remake_indexes = fill_without_indexes()
    for chunk, offset in enumerate(range(0, args.records, FILL_CHUNK)):
        n = min(FILL_CHUNK, args.records - offset)
        blobs = fill_chunk(rng=rng, n=n, chunk=chunk, stamp_us=stamp_us, rollout_ids=rollout_ids, versions=versions,
                           columns=columns)  # fmt: skip
        with connection.cursor() as cursor, cursor.cursor.copy(
            f"COPY serving_requestrecord ({column_list}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2)
            for blob in blobs:
                copy.write(blob)
            copy.write(b"\xff\xff")
        written += n
        elapsed = time.perf_counter() - started
        print(f"  {written:>12,} records, {elapsed:7.1f} s, {written / elapsed:9,.0f}/s", flush=True)
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '1GB'")
        for statement in remake_constraints + remake_indexes:
            built = time.perf_counter()
            cursor.execute(statement)
            print(f"  {time.perf_counter() - built:6.1f} s  {statement[:110]}", flush=True)
        cursor.execute("VACUUM ANALYZE serving_requestrecord")
        cursor.execute("INSERT INTO bench_volume_fill VALUES (%s, %s, %s, %s)",
                       [args.records, rollout_ids[0], rollout_ids, stamp])  # fmt: skip
    return {"records": args.records, "live_rollout": rollout_ids[0], "rollouts": rollout_ids, "stamp": stamp}


# --- looks and pages --------------------------------------------------------------------------------------------

STEADY_RECORDS = 10_000
# The steady looks' new records, as the live rollout's share of them: all of them (the stricter reading,
# every pass so far), and the fill's mix, a tenth (10,000 records are 10 s of a 1,000-request/s day, one
# look's interval; the other records go to an alias with no rollout).
STEADY_SHARES = (1.0, 0.1)


# `--tail`: the live rollout's plan gets docs/examples/canary.yaml's tail SLO and a tail guardrail.
TAIL_SLO = "ttft_p99_ms <= 800"
TAIL_GUARDRAIL = {"metric": "ttft_p90_ms", "margin": "10%"}
TAIL_LIMITS = {"ttft_ms": [800.0]}


def bench_fold(live: Any, *, tail: bool = False, history: bool = True) -> dict[str, Any]:
    """`window_fold`'s arguments for the live rollout's window besides the window itself, as its looks fold
    it (experiments.analysis.records_fold: the A/B plan has no tail thresholds): with `history`, the
    sessions' requests before the rollout (CUPED's pre-period, which every look of a started rollout keeps:
    9 more columns, 111 products in all); `tail`: each session's first request for the fields of
    `TAIL_LIMITS`, and the counts over them (what the fold keeps for `--tail`'s plan: TTFT)."""
    from experiments.analysis import PrePeriod, records_fold

    limits = TAIL_LIMITS if tail else {}
    pre = PrePeriod(alias=live.alias_name, until=live.started_at, model_version_id=live.baseline_id) if history else None
    fold = records_fold(limits=limits, pre_period=pre, first_fields=tuple(limits))
    assert fold is not None
    return fold


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return (time.perf_counter() - started) * 1000, value


class SteadyTraffic:
    """The live rollout's next records, like the fill's: most from sessions already in its window (each
    sticky to its arm), the rest from new sessions split 50/50; the fill's latency distributions (the
    candidate's TTFT 5 % longer, a per-user factor) and 0.5 % engine errors."""

    RETURNING = 0.8  # the share of records from sessions the window has seen

    def __init__(self, live_rollout: int, since: datetime, *, seed: int = 1) -> None:
        from serving.models import ModelVersion, RequestRecord

        self.rollout = live_rollout
        self.sessions = list(
            RequestRecord.objects.filter(rollout_id=live_rollout, created_at__gte=since)
            .exclude(session_hash="").values_list("session_hash", "arm").distinct()
        )  # fmt: skip
        self.versions = {"baseline": ModelVersion.objects.get(name="bench", version="v1").pk,
                         "candidate": ModelVersion.objects.get(name="bench", version="v2").pk}  # fmt: skip
        self.rng = np.random.default_rng(seed)
        self.factor: dict[str, float] = {}

    def drafts(self, count: int) -> list[Any]:
        from django.utils import timezone

        from serving.gateway.records import RecordDraft

        rng = self.rng
        fresh = [(secrets.token_hex(16), "candidate" if rng.random() < 0.5 else "baseline")
                 for _ in range(max(1, count // 30))]  # fmt: skip
        returning = rng.random(count) < self.RETURNING
        old_pick = rng.integers(0, len(self.sessions), count)
        new_pick = rng.integers(0, len(fresh), count)
        failed = rng.random(count) < 0.005
        base_ttft = rng.lognormal(np.log(120.0), 0.5, count)
        base_tpot = rng.lognormal(np.log(25.0), 0.3, count)
        tokens_c = rng.integers(2, 200, count)
        tokens_p = rng.integers(5, 800, count)
        now = timezone.now()
        drafts = []
        for i in range(count):
            session, arm = self.sessions[old_pick[i]] if returning[i] else fresh[new_pick[i]]
            factor = self.factor.setdefault(session, float(rng.lognormal(0.0, 0.3)))
            ttft = factor * base_ttft[i] * (1.05 if arm == "candidate" else 1.0)
            tpot = factor * base_tpot[i]
            bad = bool(failed[i])
            drafts.append(RecordDraft(
                request_id=uuid.uuid4().hex, created_at=now, alias=LIVE_ALIAS, rollout_id=self.rollout, arm=arm,
                model_version_id=self.versions[arm], engine_worker_id=None, endpoint="chat.completions", stream=True,
                session_hash=session, prompt_hash="", prompt_chars=int(tokens_p[i]) * 4, status_code=502 if bad else 200,
                outcome="engine_error" if bad else "ok", error_kind="http_502" if bad else "",
                ttft_ms=None if bad else ttft, tpot_ms=None if bad else tpot, e2e_ms=ttft + tpot * (int(tokens_c[i]) - 1),
                prompt_tokens=None if bad else int(tokens_p[i]), completion_tokens=None if bad else int(tokens_c[i]),
                assigned_arm=arm,
            ))  # fmt: skip
        self.sessions.extend(fresh)
        return drafts

    def write(self, count: int, *, share: float = 1.0) -> None:
        """`count` new records, `share` of them the live rollout's, the rest `PLAIN_ALIAS`'s (no rollout)."""
        from serving.gateway.records import records_write

        live = round(count * share)
        drafts = self.drafts(live)
        if count > live:
            seen = len(self.sessions)
            drafts += [dataclasses.replace(d, alias=PLAIN_ALIAS, rollout_id=None) for d in self.drafts(count - live)]
            del self.sessions[seen:]  # (their new sessions are not the window's)
        for i in range(0, len(drafts), 500):
            records_write(drafts[i : i + 500])


def module_at(rev: str, path: str) -> Any:
    """The module at `path` (e.g. experiments/rollups.py) as it was at git revision `rev`, loaded as a module
    of its own (it reads and writes the same tables): the code it had, to time beside today's on the same
    data. benchmarks/shadow_quality.py loads evals/selectors.py with it."""
    import importlib.util
    import subprocess

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader(f"{Path(path).stem}_at_{rev}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


class CpuClock:
    """Wall time, this process's CPU time and its PostgreSQL backend's (with `whole_server`, every PostgreSQL
    process's: a first fold in parts uses connections of its own), over a block."""

    def __init__(self, *, whole_server: bool = False) -> None:
        self.server_cpu_s = server_cpu_s if whole_server else backend_cpu_s

    def __enter__(self) -> CpuClock:
        self.server, self.client, self.wall = self.server_cpu_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_ms = (time.perf_counter() - self.wall) * 1000
        self.client_ms = (time.process_time() - self.client) * 1000
        self.server_ms = (self.server_cpu_s() - self.server) * 1000


def cpu_text(clocks: list[CpuClock]) -> str:
    client, server = median([c.client_ms for c in clocks]), median([c.server_ms for c in clocks])
    if clocks[0].server_cpu_s is server_cpu_s:  # (its parts' connections at once: no bound on the wall time)
        return f"CPU per look: this process {client:,.0f} ms, PostgreSQL {server:,.0f} ms (all its processes)"
    return f"CPU per look: this process {client:,.0f} ms, PostgreSQL {server:,.0f} ms (idle-core bound {client + server:,.0f} ms)"


def unit_statistics_text() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT n_live_tup, n_mod_since_analyze, GREATEST(last_analyze, last_autoanalyze), "
                       "pg_relation_size(relid), pg_indexes_size(relid) "
                       "FROM pg_stat_user_tables WHERE relname = 'experiments_rollupunit'")  # fmt: skip
        row = cursor.fetchone()
    if row is None:
        return "unit rows: no statistics"
    at = f"{row[2]:%H:%M:%S}" if row[2] is not None else "never"
    return (f"unit rows {row[0]:,} (table {row[3] / 2**20:,.0f} MB, its indexes {row[4] / 2**20:,.0f} MB), "
            f"{row[1]:,} changed since the table was last analysed ({at})")  # fmt: skip


def units_vacuum() -> None:
    """The unit rows dropped windows left dead: what autovacuum would have reclaimed by the next look (it may
    be off on a benchmark's server: this one's is), so that no fold's writes fight an earlier window's
    garbage for room on their pages."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE experiments_rollupunit")


def looks_reset(state: dict[str, Any]) -> None:
    """Back to the fill: the records earlier runs' looks added (all after the fill's stamp) and the live
    rollout's rollups go, so that every run measures the same window."""
    from django.db import connection
    from django.db.models import Q

    from experiments.rollups import window_drop
    from serving.models import RequestRecord

    added, _ = RequestRecord.objects.filter(Q(rollout_id=state["live_rollout"]) | Q(alias=PLAIN_ALIAS),
                                            created_at__gte=state["stamp"]).delete()  # fmt: skip
    window_drop(rollout_ids=[state["live_rollout"]])
    with connection.cursor() as cursor:
        if added:
            cursor.execute("VACUUM ANALYZE serving_requestrecord")
        cursor.execute("SELECT current_setting('autovacuum'), current_setting('shared_buffers')")
        autovacuum, buffers = cursor.fetchone()
    units_vacuum()
    if added:
        print(f"  (removed the {added:,} records earlier runs' looks had added)")
    # (shared_buffers decides whether a look's touched unit rows and their index pages are found in
    # PostgreSQL's own cache; at 100M a larger one did not make the steady look faster: benchmarks/README.md,
    # "Tenth pass")
    print(f"  (this server: autovacuum {autovacuum}, shared_buffers {buffers}; the rollup unit table vacuumed before the looks)")


def colds_side_by_side(rounds: int, live_rollout: int, folds: dict[str, Callable[[], Any]]) -> None:
    """Each of `folds` (a window's first fold, by name) `rounds` times, the order alternating, each on a window
    dropped and vacuumed just before: the wall and server CPU medians and ranges. The windows are dropped
    after."""
    from experiments.rollups import window_drop

    clocks: dict[str, list[CpuClock]] = {name: [] for name in folds}
    loads: list[float] = []
    for k in range(rounds):
        for name in list(folds) if k % 2 == 0 else list(reversed(folds)):
            window_drop(rollout_ids=[live_rollout])
            units_vacuum()
            loads.append(os.getloadavg()[0])
            with CpuClock(whole_server=True) as clock:
                folds[name]()
            clocks[name].append(clock)
    window_drop(rollout_ids=[live_rollout])
    units_vacuum()
    print(f"  the first look (cold), {rounds} rounds side by side, the order alternating (load average "
          f"{min(loads):.1f}-{max(loads):.1f}):")  # fmt: skip
    for name, found in clocks.items():
        walls = [c.wall_ms for c in found]
        cpus = [c.server_ms for c in found]
        print(f"    {name:>12}: median {median(walls):10,.0f} ms ({min(walls):,.0f}-{max(walls):,.0f}), PostgreSQL CPU "
              f"median {median(cpus):,.0f} ms ({min(cpus):,.0f}-{max(cpus):,.0f})")  # fmt: skip


def looks_phase(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """The live rollout's look: from scratch (what every look did), the first incremental one (cold: it
    builds the rollup), and steady-state ones after 10,000 new records each (the fold alone, beside the
    fold of `--before` on its own window when asked, then the whole look: the fold and the checks and the
    policy, nothing applied); the decisions compared."""
    from datetime import timedelta

    from experiments import rollups
    from experiments.rollups import arms_from_scratch_equal, window_drop, window_fold, window_scratch
    from rollouts.analysis import rollout_look
    from rollouts.models import Rollout
    from serving.selectors import record_commit_horizon

    live = Rollout.objects.select_related("baseline", "candidate").get(pk=state["live_rollout"])
    since = live.step_started_at
    assert since is not None
    fold_args = bench_fold(live, tail=args.tail, history=not args.no_history)
    spec = fold_args["spec"]
    scratch_args = {k: v for k, v in fold_args.items() if k != "rows_key"}
    history = ", the sessions' history" if fold_args["fill"] is not None else ""
    looks_reset(state)
    live_records = state["records"] // 10
    print(f"\n== looks: the live rollout ({live_records:,} of the {state['records']:,} records, {len(spec.columns)} "
          f"per-session columns, {len(spec.pairs)} products, 3 sketches{', first requests per session' if spec.firsts else ''}"
          f"{history}); "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    scratch_ms, scratch = timed(lambda: window_scratch(rollout_id=live.pk, since=since, until=None, **scratch_args))
    print(f"  from scratch (every record of the window, as each look did):     {scratch_ms:10,.0f} ms")
    window_drop(rollout_ids=[live.pk])  # a cold look: no rollup yet

    def fold() -> Any:
        return window_fold(rollout_id=live.pk, since=since, until=None, **fold_args)

    before = module_at(args.before, "experiments/rollups.py") if args.before else None
    # The fold as it was, on a window of its own (a microsecond later: the same records, another window).
    before_since = since + timedelta(microseconds=1)

    def fold_before() -> Any:
        assert before is not None
        return before.window_fold(rollout_id=live.pk, since=before_since, until=None, **fold_args)

    if before is not None and args.cold_looks > 1:
        colds_side_by_side(args.cold_looks, live.pk, {"now": fold, args.before: fold_before})
    with CpuClock(whole_server=True) as clock:
        cold = fold()
    print(f"  first incremental look (cold: builds the rollup of {cold.records_read:,} records): {clock.wall_ms:10,.0f} ms "
          f"(target <= 60,000); load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"    {cpu_text([clock]).replace('per look', 'of the look')}")
    if before is not None:
        with CpuClock(whole_server=True) as clock:
            fold_before()
        print(f"  the same, as the fold was at {args.before}: {clock.wall_ms:10,.0f} ms (its records read second: "
              f"more of them in the OS's cache); load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"    {cpu_text([clock]).replace('per look', 'of the look')}")
    print(f"  {unit_statistics_text()}")
    traffic = SteadyTraffic(live.pk, since)
    for share in STEADY_SHARES:
        now_clocks: list[CpuClock] = []
        before_clocks: list[CpuClock] = []
        reads: list[int] = []
        settled: list[int] = []
        loads: list[float] = []
        for look in range(args.steady_looks):
            traffic.write(STEADY_RECORDS, share=share)
            loads.append(os.getloadavg()[0])
            runs: list[tuple[list[CpuClock], Callable[[], Any]]] = [(now_clocks, fold)]
            if before is not None:
                runs.append((before_clocks, fold_before))
            for clocks, run in runs if look % 2 == 0 else reversed(runs):
                with CpuClock() as clock:
                    folded = run()
                clocks.append(clock)
                if clocks is now_clocks:
                    reads.append(folded.records_read)
                    settled.append(folded.settled)
        walls = [c.wall_ms for c in now_clocks]
        print(f"  steady-state look after {STEADY_RECORDS:,} new records, {share:.0%} of them the live rollout's, "
              f"{args.steady_looks} looks (load average {min(loads):.1f}-{max(loads):.1f}): median {median(walls):,.0f} ms, "
              f"max {max(walls):,.0f} ms (target <= 100); records read per look {min(reads):,}-{max(reads):,}, settled "
              f"{min(settled):,}-{max(settled):,} (the rest was above the horizon: other transactions open on the server)")  # fmt: skip
        print(f"    {cpu_text(now_clocks)}")
        if before is not None:
            walls = [c.wall_ms for c in before_clocks]
            print(f"  side by side, the fold as it was at {args.before}: median {median(walls):,.0f} ms, "
                  f"max {max(walls):,.0f} ms")  # fmt: skip
            print(f"    {cpu_text(before_clocks)}")
    print(f"  {unit_statistics_text()}")
    horizon = record_commit_horizon()
    final = fold()
    check = window_scratch(rollout_id=live.pk, since=since, until=None, **scratch_args)
    problems = arms_from_scratch_equal(final.arms, check)
    print(f"  incremental == from scratch on the same records (horizon {horizon}): "
          f"{'yes' if not problems else 'NO: ' + '; '.join(problems[:5])}")  # fmt: skip
    if before is not None:
        # (the fold as it was keeps no first requests: compared without them)
        plain = dataclasses.replace(spec, firsts=(), over=())
        arms = {arm: rollups.ArmRollup(a.units, a.exposed, a.sums, a.products, a.sketches) for arm, a in fold_before().arms.items()}
        problems = arms_from_scratch_equal(arms, window_scratch(
            rollout_id=live.pk, since=before_since, until=None, **{**scratch_args, "spec": plain}))  # fmt: skip
        print(f"  (the fold at {args.before} == from scratch: {'yes' if not problems else 'NO: ' + '; '.join(problems[:5])})")
    for arm in ("baseline", "candidate"):
        a = final.arms.get(arm)
        if a is None:
            continue
        tails = ", ".join(f"{name} p50 {a.quantile(name, 0.5):.1f} / p99 {a.quantile(name, 0.99):.1f}"
                          for name, _ in spec.sketch)  # fmt: skip
        print(f"    {arm:<9} units {a.units:,}, exposed {a.exposed:,}, requests {a.sums.get('requests', 0):,.0f}; "
              f"{tails} ms (each within 1 %)")  # fmt: skip
    del scratch, cold

    # The whole look as the analysis loop runs it (rollouts.analysis.rollout_look: the fold of the plan's
    # window, the outcome events, the engines' readiness, the checks and the policy; nothing applied).
    fold_ms: list[float] = []
    real_fold = rollups.window_fold

    def timed_fold(**kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_fold(**kwargs)
        finally:
            fold_ms.append((time.perf_counter() - started) * 1000)

    if args.tail:
        tail_plan(live)
    samples = TailSamples() if args.tail else None
    window_drop(rollout_ids=[live.pk])  # (the steady folds' window may be the look's: its first look is cold)
    units_vacuum()
    rollups.window_fold = timed_fold  # type: ignore[assignment]
    try:
        cold_ms, (first, _) = timed(lambda: rollout_look(rollout=live))
        if samples is not None:
            samples.calls.clear()
        print(f"  the whole look (rollouts.analysis.rollout_look, nothing applied), first (cold): {cold_ms:,.0f} ms, "
              f"of which the fold {sum(fold_ms):,.0f} ms; decision {first.decision}")  # fmt: skip
        for share in STEADY_SHARES:
            whole: list[CpuClock] = []
            folds: list[float] = []
            loads = []
            for _ in range(args.steady_looks):
                traffic.write(STEADY_RECORDS, share=share)
                loads.append(os.getloadavg()[0])
                fold_ms.clear()
                with CpuClock() as clock:
                    rollout_look(rollout=live)
                whole.append(clock)
                folds.append(sum(fold_ms))
                if samples is not None:
                    samples.compare()
            walls = [c.wall_ms for c in whole]
            rest = [w - f for w, f in zip(walls, folds, strict=True)]
            print(f"  the whole look after {STEADY_RECORDS:,} new records, {share:.0%} of them the live rollout's, "
                  f"{args.steady_looks} looks (load average {min(loads):.1f}-{max(loads):.1f}): median "
                  f"{median(walls):,.0f} ms, max {max(walls):,.0f} ms; the fold median {median(folds):,.0f} ms, the rest "
                  f"(outcomes, engines, checks, policy) median {median(rest):,.0f} ms")  # fmt: skip
            print(f"    {cpu_text(whole)}")
    finally:
        rollups.window_fold = real_fold  # type: ignore[assignment]
        if samples is not None:
            samples.restore()
    if samples is not None:
        samples.report()


def tail_plan(live: Any) -> None:
    """Give the live rollout's plan `TAIL_SLO` and `TAIL_GUARDRAIL` (its looks then count each session's
    first request)."""
    from rollouts.models import Rollout
    from rollouts.plans.normalise import plan_normalise

    plan = ab_plan(int(live.alias_name.rsplit("-", 1)[1]))
    plan["slos"] = [TAIL_SLO]
    plan["guardrails"] = [*plan["guardrails"], TAIL_GUARDRAIL]
    live.plan = plan_normalise(plan, enforce_floors=False).to_dict()
    Rollout.objects.filter(pk=live.pk).update(plan=live.plan)
    print(f"  (--tail: the live rollout's plan has the tail SLO {TAIL_SLO!r} and the tail guardrail {TAIL_GUARDRAIL})")


class TailSamples:
    """The tail checks' samples of each whole look (rollouts.analysis.checks' first_request_bins and
    first_request_over, timed: read from the folded windows), then the same counted from scratch over every
    record of the windows (what each look did before), timed on the same records and compared."""

    def __init__(self) -> None:
        from rollouts.analysis import checks

        self.checks = checks
        self.real = (checks.first_request_bins, checks.first_request_over)
        self.calls: list[tuple[str, dict[str, Any], Any, CpuClock]] = []
        self.folded: list[CpuClock] = []
        self.scratch: list[CpuClock] = []
        self.equal = True

        def timed_call(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(**kwargs: Any) -> Any:
                with CpuClock() as clock:
                    value = fn(**kwargs)
                self.calls.append((name, kwargs, value, clock))
                return value

            return call

        checks.first_request_bins = timed_call("bins", self.real[0])  # type: ignore[assignment]
        checks.first_request_over = timed_call("over", self.real[1])  # type: ignore[assignment]

    def restore(self) -> None:
        self.checks.first_request_bins, self.checks.first_request_over = self.real  # type: ignore[assignment]

    def compare(self) -> None:
        from experiments.analysis.tails import first_request_bins_scratch, first_request_over_scratch

        folded, scratch = CpuClock(), CpuClock()
        folded.wall_ms = folded.client_ms = folded.server_ms = 0.0
        scratch.wall_ms = scratch.client_ms = scratch.server_ms = 0.0
        other: Any
        for name, kwargs, value, clock in self.calls:
            for attr in ("wall_ms", "client_ms", "server_ms"):
                setattr(folded, attr, getattr(folded, attr) + getattr(clock, attr))
            if name == "bins":
                args = {k: v for k, v in kwargs.items() if k not in ("thresholds", "pre_period", "first_fields", "rollups")}
                with CpuClock() as again:
                    other = first_request_bins_scratch(**args)
            else:
                args = {k: v for k, v in kwargs.items() if k not in ("pre_period", "first_fields", "rollups")}
                with CpuClock() as again:
                    other = first_request_over_scratch(**args)
            self.equal &= other == value
            for attr in ("wall_ms", "client_ms", "server_ms"):
                setattr(scratch, attr, getattr(scratch, attr) + getattr(again, attr))
        self.folded.append(folded)
        self.scratch.append(scratch)
        self.calls.clear()

    def report(self) -> None:
        for label, clocks in (("from the folded windows", self.folded), ("from scratch (as before)", self.scratch)):
            print(f"  the tail checks' samples per whole look, {label}: median {median([c.wall_ms for c in clocks]):,.0f} ms; "
                  f"{cpu_text(clocks)}")  # fmt: skip
        print(f"  the tail checks' samples folded == from scratch on the same records: {'yes' if self.equal else 'NO'}")


def looks_stored(state: dict[str, Any], *, history: int) -> int:
    """Give every rollout of the page a stored look, as the analysis loop stores one (rollout_look's
    measure and decision, not applied), and `history` earlier copies a minute apart: the pages read the
    latest of many. Kept between runs. Returns how many looks the rollouts have.

    The live rollout's look is computed; the others get a copy of its measure (arms, checks, SRM,
    comparisons) under their own rollout, version, state and step: the pages read stored looks only,
    whatever the records, and computing each rollout's first look would be 49 more cold looks (at 100
    million records each reads most of the day's heap: an hour of the benchmark for nothing it measures)."""
    from django.utils import timezone

    from rollouts.analysis import rollout_look
    from rollouts.models import Rollout, RolloutAnalysis

    looks = RolloutAnalysis.objects.filter(rollout_id__in=state["rollouts"])
    if looks.exists():
        return looks.count()
    started = time.perf_counter()
    now = timezone.now()
    rollouts = Rollout.objects.select_related("baseline", "candidate").filter(pk__in=state["rollouts"])
    look, _ = rollout_look(rollout=rollouts.get(pk=state["live_rollout"]), now=now)
    for rollout in rollouts:
        rows = [
            RolloutAnalysis(
                rollout_id=rollout.pk, created_at=now - timedelta(minutes=minutes), rollout_version=rollout.version,
                state=rollout.state, step_index=rollout.step_index, window_start=look.window_start,
                decision=look.decision, reason=look.reason[:500], applied=False, arms=look.arms, checks=look.checks,
                srm=look.srm, comparisons=look.comparisons,
            )
            for minutes in range(history, -1, -1)
        ]
        RolloutAnalysis.objects.bulk_create(rows, batch_size=500)
    print(f"  stored a look of each of the {len(state['rollouts'])} rollouts (and {history} earlier ones each) "
          f"in {time.perf_counter() - started:,.1f} s")  # fmt: skip
    return looks.count()


def page_phase(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """The experiments list (50 A/B rollouts) and the dashboard, as a viewer's browser asks for them."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(username="bench-viewer", defaults={"is_superuser": True,
                                                                                         "is_staff": True})  # fmt: skip
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(user)
    stored = looks_stored(state, history=args.look_history)
    print(f"\n== pages ({ROLLOUTS} A/B rollouts, {stored:,} stored looks); load average {os.getloadavg()[0]:.1f}")
    for path in ("/experiments", "/"):
        times = []
        for _ in range(args.page_repeats):
            ms, response = timed(lambda p=path: client.get(p))  # type: ignore[misc]
            assert response.status_code == 200, (path, response.status_code)
            times.append(ms)
        print(f"  GET {path:<13} median {median(times):9,.0f} ms over {args.page_repeats} (target <= 300)")
    list_side_by_side(args, user)


def list_side_by_side(args: argparse.Namespace, user: Any) -> None:
    """The experiments list's rows and their rendering, now (the latest looks of all the rollouts in one
    read, the primary check formatted) and as before (a look read per rollout, and each look's every check
    and comparison formatted with its alpha split), interleaved."""
    from django.db import connection
    from django.template.loader import render_to_string
    from django.test import RequestFactory
    from django.test.utils import CaptureQueriesContext

    from rollouts import selectors
    from rollouts.views import experiments as page
    from rollouts.views.display import check_view, rollout_summary

    request = RequestFactory().get("/experiments")
    request.user = user

    def now() -> str:
        rollouts = page._experiments()
        looks = selectors.rollout_latest_analyses(rollout_ids=[r.pk for r in rollouts])
        rows = []
        for rollout in rollouts:
            primary = page._primary(looks.get(rollout.pk))
            rows.append({"summary": rollout_summary(rollout, looks.get(rollout.pk)),
                         "primary_view": check_view(primary) if primary else None})  # fmt: skip
        return render_to_string("experiments/list.html", {"rows": rows}, request=request)

    def before() -> str:
        rows = []
        for rollout in page._experiments():
            results = page._results(rollout)
            rows.append({"summary": rollout_summary(rollout), "results": results, "primary_view": results["primary_view"]})
        return render_to_string("experiments/list.html", {"rows": rows}, request=request)

    times: dict[str, list[float]] = {"now": [], "before": []}
    queries: dict[str, int] = {}
    for repeat in range(args.page_repeats):
        for name, build in (("now", now), ("before", before)) if repeat % 2 == 0 else (("before", before), ("now", now)):
            with CaptureQueriesContext(connection) as captured:
                ms, _ = timed(build)
            times[name].append(ms)
            queries[name] = len(captured.captured_queries)
    print(f"  the list's rows and rendering, side by side (load average {os.getloadavg()[0]:.1f}): now median "
          f"{median(times['now']):,.0f} ms in {queries['now']} queries; as before (a look read per rollout, every "
          f"check and comparison formatted) median {median(times['before']):,.0f} ms in {queries['before']} queries")  # fmt: skip


# --- main ----------------------------------------------------------------------------------------------------

PHASES = ("fill", "ingest", "looks", "pages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--records", type=int, default=100_000_000, help="records to fill (100 million)")
    parser.add_argument("--seed", type=int, default=20, help="the fill's random seed (20)")
    parser.add_argument("--ingest-rounds", type=int, default=5, help="interleaved rounds of COPY and ORM (5)")
    parser.add_argument("--ingest-batches", type=int, default=40, help="batches per round and writer (40)")
    parser.add_argument("--ingest-gateway", type=int, default=200_000, help="drafts through a gateway (200,000)")
    parser.add_argument("--outage-rate", type=float, default=1000.0, help="records/s during the outage (1,000)")
    parser.add_argument("--outage-s", type=float, default=30.0, help="seconds the database is down (30)")
    parser.add_argument("--steady-looks", type=int, default=5, help="steady-state looks (5)")
    parser.add_argument("--page-repeats", type=int, default=5, help="page loads each (5)")
    parser.add_argument("--look-history", type=int, default=100,
                        help="stored looks per rollout before the latest, for the pages (100)")
    parser.add_argument("--cold-looks", type=int, default=1,
                        help="with --before, also the first look (cold) now and at --before this many times each, "
                             "interleaved, before the looks (1: once each, as part of them)")
    parser.add_argument("--before", default="",
                        help="also time the fold of experiments/rollups.py at this git revision, side by side")
    parser.add_argument("--drop", action="store_true", help="drop the benchmark's database at the end")
    parser.add_argument("--no-history", action="store_true",
                        help="the folds without the sessions' history (CUPED's pre-period), as this benchmark timed "
                             "them before session 30; the whole look keeps it always")
    parser.add_argument("--tail", action="store_true",
                        help="the looks with tail checks: the fold keeps first requests per session, the live plan "
                             f"gets {TAIL_SLO!r} and a ttft_p90_ms guardrail (samples timed beside from scratch)")
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        parser.error("BENCH_DATABASE_URL must name a PostgreSQL database (the benchmark creates it if missing)")
    if args.cold_looks < 1 or (args.cold_looks > 1 and not args.before):
        parser.error("--cold-looks: a whole number of at least 1, above 1 only with --before (the fold it is timed beside)")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
    database_open(url)
    try:
        state = fill_phase(args) if {"fill", "looks", "pages"} & set(phases) else None
        if "ingest" in phases:
            ingest_phase(args)
        if state is not None and "looks" in phases:
            looks_phase(args, state)
        if state is not None and "pages" in phases:
            page_phase(args, state)
    finally:
        if args.drop:
            from django.db import connections

            connections.close_all()
            database_drop(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
