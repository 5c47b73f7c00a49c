"""Sustained mixed load on the whole platform: the gateway with two real vLLM engines, a Celery worker and
beat analysing a canary in progress, for a few minutes.

    .venv/bin/python benchmarks/load.py                      # 3 min through the gateway, 20 s direct first
    .venv/bin/python benchmarks/load.py --duration 60 --direct-s 10 --clients 6
    .venv/bin/python benchmarks/load.py --help
    .venv/bin/python benchmarks/load.py --external 'aiperf profile ... --url "$LOAD_GATEWAY_URL" ...'

What runs: adder-v1 and adder-v2 each in their own engine (tests/support/engines.running_engine, so the
machine-wide engine slots are respected), registered as static engine workers; three aliases - `adder`
(a canary adder-v1 -> adder-v2 at 30 % with 5 % shadow mirroring, analysed every 5 s), `adder-stable`
(adder-v1 only) and `adder-next` (adder-v2 only); the gateway as its own uvicorn process; a Celery worker
and beat. The database is a scratch SQLite file in a temporary directory, or, when DATABASE_URL points at
PostgreSQL, a scratch database created on that server and dropped at the end; the broker is the
configured one (kombu's filesystem transport in the temporary directory by default).

The load: closed-loop clients, each sending one chat completion after another to a random alias, half of
them streamed (`max_tokens` tokens, ignore_eos), each as a new user. First `--direct-s` seconds of the
same mix straight to the engines (the comparison), then `--duration` seconds through the gateway.

It prints throughput, TTFT and end-to-end latency percentiles (nearest rank) for both phases and the
difference (what the gateway adds), the request records written against the requests the gateway
answered (they must be equal), and the resident memory of each process (gateway, worker, beat, each
engine; process groups summed) sampled every few seconds: the first minute's mean against the last
minute's (it must be flat).

With `--external CMD` the same system is set up, and instead of its own load it runs CMD (a shell command,
e.g. an LLM load tool) with LOAD_GATEWAY_URL, LOAD_GATEWAY_KEY, LOAD_ALIASES and LOAD_TOKENIZER (the demo
model's directory, for tools that count tokens) in its environment; it then prints the requests the gateway
served meanwhile (its /metrics) against the records written, and the memory table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import httptools

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.http1 import Http1Connection  # noqa: E402
from config.queues import all_queues  # noqa: E402

if TYPE_CHECKING:
    from rollouts.models import Rollout

VENV_BIN = Path(sys.executable).parent
GATEWAY_KEY = "gw_load_" + secrets.token_hex(16)
ALIASES = ("adder", "adder-stable", "adder-next")


@dataclass
class Result:
    phase: str
    alias: str
    stream: bool
    status: int
    ttft_ms: float | None
    e2e_ms: float
    request_id: str = ""
    ok: bool = False


class _Received:
    """A response body as it arrives, and when the first streamed text came (seconds after `started`)."""

    def __init__(self, stream: bool, started: float) -> None:
        self.stream, self.started = stream, started
        self.parts: list[bytes] = []
        self.first: float | None = None

    def feed(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        if self.stream and self.first is None and _has_text(chunk):
            self.first = time.perf_counter() - self.started


def _has_text(data: bytes) -> bool:
    """Does a piece of an SSE stream carry a delta with text? (The role-only first chunk has "content":"".)"""
    mark = b'"content":"'
    at = data.find(mark)
    while at >= 0:
        if data[at + len(mark):at + len(mark) + 1] not in (b'"', b""):
            return True
        at = data.find(mark, at + 1)
    return False


def _body(model: str, stream: bool, max_tokens: int, user: str, rng: random.Random) -> bytes:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    body: dict[str, object] = {
        "model": model, "messages": [{"role": "user", "content": f"{a}+{b}"}], "max_tokens": max_tokens,
        "ignore_eos": True, "stream": stream, "temperature": 0, "user": user,
    }  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _ok(stream: bool, status: int, content: bytes) -> bool:
    if status != 200:
        return False
    if stream:
        return content.rstrip().endswith(b"data: [DONE]") and b'data: {"error"' not in content
    return b'"choices"' in content


async def closed_loop(*, phase: str, targets: dict[str, tuple[str, int, str, dict[str, str]]], clients: int,
                      seconds: float, max_tokens: int, stream_share: float, into: list[Result], seed: int) -> None:
    """`targets`: alias -> (host, port, model name to send, headers)."""
    deadline = time.perf_counter() + seconds

    async def one_client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        conns: dict[tuple[str, int], Http1Connection] = {}
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            alias = rng.choice(list(targets))
            host, port, model, headers = targets[alias]
            stream = rng.random() < stream_share
            conn = conns.setdefault((host, port), Http1Connection(host, port))
            started = time.perf_counter()
            received = _Received(stream, started)
            try:
                status, got = await conn.post(
                    "/v1/chat/completions", _body(model, stream, max_tokens, f"{phase}-{index}-{n}", rng),
                    {"Content-Type": "application/json", **headers}, received.feed)
                content, first = b"".join(received.parts), received.first
            except (OSError, ConnectionError, httptools.HttpParserError) as exc:
                into.append(Result(phase, alias, stream, 0, None, (time.perf_counter() - started) * 1000))
                print(f"  client error: {type(exc).__name__}: {exc}", file=sys.stderr)
                await asyncio.sleep(0.2)
                continue
            into.append(Result(
                phase, alias, stream, status, first * 1000 if first is not None else None,
                (time.perf_counter() - started) * 1000, got.get(b"x-request-id", b"").decode(), _ok(stream, status, content),
            ))  # fmt: skip
        for conn in conns.values():
            conn.close()

    await asyncio.gather(*(one_client(i) for i in range(clients)))


# --- memory of the processes -----------------------------------------------------------------------------


def _group_rss_kib(pgid: int) -> int:
    """Resident memory of every process in a process group (an engine is an API server and its EngineCore)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total


class MemorySampler:
    def __init__(self, groups: dict[str, int], every_s: float) -> None:
        self.groups, self.every_s = groups, every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - start, {n: _group_rss_kib(g) for n, g in self.groups.items()}))
            self._stop.wait(self.every_s)


# --- set-up --------------------------------------------------------------------------------------------------


def _scratch_database(tmp: Path) -> tuple[str, str | None]:
    """(DATABASE_URL for this run, a PostgreSQL database to drop at the end or None)."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        return f"sqlite:///{tmp / 'load.sqlite3'}", None
    import psycopg

    parts = urlsplit(url)
    name = f"ramp_load_{os.getpid()}"
    admin = urlunsplit((parts.scheme.replace("postgresql", "postgres"), parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, "")), name


def _drop_database(name: str) -> None:
    import psycopg

    parts = urlsplit(os.environ["DATABASE_URL"])
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def child(args: list[str], log: Path, env: dict[str, str], ready: str | None, timeout_s: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while ready and ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 1)) - 1))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load through the gateway (180)")
    parser.add_argument("--direct-s", type=float, default=20.0, help="seconds of the same load on the engines directly (20)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients (8)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (16, ignore_eos)")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests (0.5)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples (5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--external", metavar="CMD", help="run this shell command as the load instead (see above)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ramp-load-"))
    database_url, scratch_db = _scratch_database(tmp)
    os.environ.update({
        "DATABASE_URL": database_url, "PLATFORM_VAR_DIR": str(tmp), "SECRET_KEY": secrets.token_urlsafe(40),
        "DEMO_MODELS_DIR": os.environ.get("DEMO_MODELS_DIR", str(REPO / "var" / "demo-models")),
        "ROLLOUT_ANALYSIS_INTERVAL_S": "5", "DJANGO_SETTINGS_MODULE": "config.settings", "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
    })  # fmt: skip
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from rollouts.actors import SYSTEM
    from rollouts.services import rollout_create
    from serving.models import RequestRecord, ShadowPair
    from serving.services import RouteSplit, gateway_key_create, route_set
    from tests.support.demo import demo_models, static_worker_ready, version_register
    from tests.support.engines import free_port, running_engine

    env = {**os.environ, "CELERY_BROKER_URL": settings.CELERY_BROKER_URL}
    try:
        with ExitStack() as stack:
            print(f"set-up in {tmp} (database {'PostgreSQL ' + scratch_db if scratch_db else 'SQLite'}, "
                  f"broker {settings.CELERY_BROKER_URL.split(':')[0]})", flush=True)
            call_command("migrate", verbosity=0)
            models = demo_models(["adder-v1", "adder-v2"])
            engines = {}
            for label in ("adder-v1", "adder-v2"):
                print(f"starting {label} (takes an engine slot) ...", flush=True)
                engines[label] = stack.enter_context(running_engine(
                    model_dir=models[label].path, served_name=label, log_dir=tmp, engine_args=list(models[label].engine_args)))
            versions = {label: version_register(models[label]) for label in engines}
            for label, version in versions.items():
                static_worker_ready(version, engines[label].base_url, agent="load")
            route_set(alias_name="adder-stable", split=RouteSplit(versions["adder-v1"], None, 0.0, 0.0, None))
            route_set(alias_name="adder-next", split=RouteSplit(versions["adder-v2"], None, 0.0, 0.0, None))
            plan = {
                "alias": "adder", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "canary",
                "steps": [{"weight": 0.3, "shadow_rate": 0.05, "min_duration_s": 3600},
                          {"weight": 1.0, "min_duration_s": 60}],
                "guardrails": [{"metric": "error_rate", "margin": 0.05}, {"metric": "tpot_mean_ms", "margin": "50%"}],
            }  # fmt: skip
            rollout = rollout_create(plan=plan, actor=SYSTEM, start=True).rollout
            gateway_key_create(name="load", raw=GATEWAY_KEY)

            port = free_port()
            gateway = stack.enter_context(child(
                [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--host", "127.0.0.1", "--port", str(port),
                 "--http", "config.http_server:HeadBoundedProtocol", "--no-access-log"], tmp / "gateway.log", env,
                "Application startup complete"))
            worker = stack.enter_context(child(
                [str(VENV_BIN / "celery"), "-A", "config", "worker", "--loglevel", "INFO", "--concurrency", "1",
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"load-{port}@%h",
                 "-Q", ",".join(all_queues())],
                tmp / "worker.log", env, "ready."))
            beat = stack.enter_context(child(
                [str(VENV_BIN / "celery"), "-A", "config", "beat", "--loglevel", "INFO", "-s", str(tmp / "beat-schedule")],
                tmp / "beat.log", env, None))
            groups = {"gateway": gateway.pid, "worker": worker.pid, "beat": beat.pid,
                      **{f"engine {label}": e.proc.pid for label, e in engines.items()}}

            def direct_target(label: str) -> tuple[str, int, str, dict[str, str]]:
                return ("127.0.0.1", engines[label].port, label, {})

            direct = {"adder": direct_target("adder-v1"), "adder-stable": direct_target("adder-v1"),
                      "adder-next": direct_target("adder-v2")}
            through = {alias: ("127.0.0.1", port, alias, {"Authorization": f"Bearer {GATEWAY_KEY}"}) for alias in ALIASES}
            results: list[Result] = []
            common = {"clients": args.clients, "max_tokens": args.max_tokens, "stream_share": args.stream_share}
            asyncio.run(closed_loop(phase="warm", targets=through, seconds=5, into=[], seed=1, **common))
            if args.external:
                return run_external(args, port, models["adder-v1"].path, groups)
            print(f"warm-up done; {args.direct_s:.0f} s direct to the engines ...", flush=True)
            asyncio.run(closed_loop(phase="direct", targets=direct, seconds=args.direct_s, into=results, seed=2, **common))
            print(f"{args.duration:.0f} s through the gateway ...", flush=True)
            sampler = MemorySampler(groups, args.sample_s)
            sampler.start()
            load_started = time.monotonic()
            asyncio.run(closed_loop(phase="gateway", targets=through, seconds=args.duration, into=results, seed=3, **common))
            load_s = time.monotonic() - load_started
            sampler.stop()

            answered = {r.request_id for r in results if r.phase == "gateway" and r.request_id}
            deadline = time.monotonic() + 60
            written = 0
            while time.monotonic() < deadline:
                ids = list(answered)
                written = sum(RequestRecord.objects.filter(request_id__in=ids[i:i + 500]).count()
                              for i in range(0, len(ids), 500))
                if written >= len(answered):
                    break
                time.sleep(1)
            rollout.refresh_from_db()
            report(args, results, load_s, sampler, answered, written, rollout, ShadowPair.objects.count(), tmp)
            return 0 if written == len(answered) else 1
    finally:
        if scratch_db:
            _drop_database(scratch_db)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _served_by_gateway(port: int) -> int:
    """The gateway's platform_gateway_requests_total, all labels summed (its own count of what it answered)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("platform_gateway_requests_total{")))


def run_external(args: argparse.Namespace, port: int, tokenizer: Path, groups: dict[str, int]) -> int:
    """Run a load tool against the gateway; compare what the gateway served with the records written."""
    from serving.models import RequestRecord

    records = RequestRecord.objects
    env = {**os.environ, "LOAD_GATEWAY_URL": f"http://127.0.0.1:{port}", "LOAD_GATEWAY_KEY": GATEWAY_KEY,
           "LOAD_ALIASES": ",".join(ALIASES), "LOAD_TOKENIZER": str(tokenizer)}
    # The warm-up's last records may still be in the gateway's buffer: start counting once they are written.
    deadline = time.monotonic() + 30
    while records.count() < _served_by_gateway(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    served_before, written_before = _served_by_gateway(port), records.count()
    sampler = MemorySampler(groups, args.sample_s)
    sampler.start()
    print(f"running: {args.external}", flush=True)
    started = time.monotonic()
    code = subprocess.call(args.external, shell=True, env=env, cwd=REPO)
    took = time.monotonic() - started
    sampler.stop()
    served = _served_by_gateway(port) - served_before
    deadline, written = time.monotonic() + 60, 0
    while time.monotonic() < deadline:
        written = records.count() - written_before
        if written >= served:
            break
        time.sleep(1)
    print(f"\nthe command exited {code} after {took:.0f} s; the gateway served {served} requests meanwhile, "
          f"{written} records written, {served - written} missing")
    print_memory(sampler, args.sample_s)
    return 0 if code == 0 and written == served else 1


def print_memory(sampler: MemorySampler, every_s: float) -> None:
    samples = sampler.samples
    if len(samples) < 2:
        return
    span = samples[-1][0]
    window = 60.0 if span >= 150 else span / 3
    first = [s for t, s in samples if t <= window]
    last = [s for t, s in samples if t >= span - window]
    print(f"\nresident memory (process group), mean of the first vs the last {window:.0f} s of {span:.0f} s "
          f"({len(samples)} samples every {every_s:g} s):\n")
    print("| process         | first MB | last MB |  growth |")
    print("|-----------------|----------|---------|---------|")
    for name in samples[0][1]:
        a = statistics.mean(s[name] for s in first) / 1024
        b = statistics.mean(s[name] for s in last) / 1024
        print(f"| {name:15} | {a:8.1f} | {b:7.1f} | {b - a:+6.1f}  |")


def report(args: argparse.Namespace, results: list[Result], load_s: float, sampler: MemorySampler, answered: set[str],
           written: int, rollout: Rollout, shadow_pairs: int, tmp: Path) -> None:
    load = os.getloadavg()
    print(f"\n{args.clients} closed-loop clients, {args.max_tokens} output tokens (ignore_eos), "
          f"{args.stream_share:.0%} streamed, aliases {', '.join(ALIASES)}; {os.cpu_count()} CPUs, "
          f"load average at the end {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}\n")
    print("| phase   | alias        | requests | errors |  req/s | TTFT p50 | TTFT p99 |  E2E p50 |  E2E p99 |")
    print("|---------|--------------|----------|--------|--------|----------|----------|----------|----------|")
    seconds = {"direct": args.direct_s, "gateway": load_s}
    summary: dict[str, dict[str, float | None]] = {}
    for phase in ("direct", "gateway"):
        for alias in (*ALIASES, "all"):
            rows = [r for r in results if r.phase == phase and (alias == "all" or r.alias == alias)]
            if not rows:
                continue
            ttft = [r.ttft_ms for r in rows if r.ok and r.stream and r.ttft_ms is not None]
            e2e = [r.e2e_ms for r in rows if r.ok]
            errors = sum(not r.ok for r in rows)
            line = {"ttft50": _pct(ttft, 0.5), "ttft99": _pct(ttft, 0.99), "e2e50": _pct(e2e, 0.5), "e2e99": _pct(e2e, 0.99),
                    "rps": len(rows) / seconds[phase]}
            if alias == "all":
                summary[phase] = line
            print(f"| {phase:7} | {alias:12} | {len(rows):8} | {errors:6} | {line['rps']:6.1f} | {_ms(line['ttft50']):>8} | "
                  f"{_ms(line['ttft99']):>8} | {_ms(line['e2e50']):>8} | {_ms(line['e2e99']):>8} |")
    d, g = summary.get("direct", {}), summary.get("gateway", {})

    def added(key: str) -> str:
        a, b = g.get(key), d.get(key)
        return "-" if a is None or b is None else f"{a - b:+.1f} ms"

    print(f"\nadded by the gateway: TTFT p50 {added('ttft50')}, p99 {added('ttft99')}; E2E p50 {added('e2e50')}, "
          f"p99 {added('e2e99')}; throughput {(g.get('rps') or 0.0) / max(d.get('rps') or 0.0, 1e-9):.2f}x direct")
    print(f"records: {len(answered)} requests answered by the gateway, {written} records written, "
          f"{len(answered) - written} missing")
    print(f"rollout {rollout.pk}: {rollout.state} at step {rollout.step_index + 1} ({rollout.state_reason or 'running'}); "
          f"{shadow_pairs} shadow pairs stored")

    print_memory(sampler, args.sample_s)
    print(f"\nlogs: {tmp} (--keep to keep them)")


if __name__ == "__main__":
    sys.exit(main())
