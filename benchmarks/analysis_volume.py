"""Request records and looks at production volume, on PostgreSQL.

    BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/ramp_bench \\
        .venv/bin/python benchmarks/analysis_volume.py --records 20000000
    ... --phases ingest             # only the record writer's throughput and the buffer's outage cover

The database named by BENCH_DATABASE_URL is created if it is missing and migrated; the benchmark owns it
(it fills it, and drops it with --drop). What it measures, phase by phase (`--phases`, all by default):

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
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INGEST_ALIAS = "bench-ingest"


# --- set-up --------------------------------------------------------------------------------------------------


def database_open(url: str) -> None:
    """Create the database if it is missing, point Django at it and migrate it."""
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
        "PLATFORM_VAR_DIR": os.environ.get("PLATFORM_VAR_DIR") or str(REPO / "var" / "bench-volume"),
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


def drafts_make(count: int, *, rng_seed: int = 7) -> list[Any]:
    """Drafts as the gateway makes them: random ids and hashes, a streamed success with every timing."""
    import random

    from serving.gateway.records import RecordDraft

    rng = random.Random(rng_seed)
    sessions = [secrets.token_hex(16) for _ in range(max(1, count // 10))]
    now = datetime.now(UTC)
    return [
        RecordDraft(
            request_id=uuid.uuid4().hex, created_at=now, alias=INGEST_ALIAS, rollout_id=None,
            arm="baseline" if rng.random() < 0.9 else "candidate", model_version_id=None, engine_worker_id=None,
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
            gateway._record(draft)
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
            gateway._record(draft)
            if first_drop is None and gateway.records.dropped:
                first_drop = time.perf_counter() - started
        state["down"] = False
        back = time.perf_counter()
        backlog = len(gateway.records)
        gateway._flush_wakeup.set()
        while len(gateway.records) or state["written"] < backlog:
            await asyncio.sleep(0.01)
        drain_s = time.perf_counter() - back
        dropped = gateway.records.dropped
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


# --- main ----------------------------------------------------------------------------------------------------

PHASES = ("ingest",)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--ingest-rounds", type=int, default=5, help="interleaved rounds of COPY and ORM (5)")
    parser.add_argument("--ingest-batches", type=int, default=40, help="batches per round and writer (40)")
    parser.add_argument("--ingest-gateway", type=int, default=200_000, help="drafts through a gateway (200,000)")
    parser.add_argument("--outage-rate", type=float, default=1000.0, help="records/s during the outage (1,000)")
    parser.add_argument("--outage-s", type=float, default=30.0, help="seconds the database is down (30)")
    parser.add_argument("--drop", action="store_true", help="drop the benchmark's database at the end")
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        parser.error("BENCH_DATABASE_URL must name a PostgreSQL database (the benchmark creates it if missing)")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
    database_open(url)
    try:
        if "ingest" in phases:
            ingest_phase(args)
    finally:
        if args.drop:
            from django.db import connections

            connections.close_all()
            database_drop(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
