"""Gateway overhead: closed-loop streaming load against one vLLM engine directly, through this gateway
(standalone uvicorn process, and mounted in the combined `config.asgi` server), and through LiteLLM's
proxy in front of the same engine, in many short interleaved rounds.

    .venv/bin/python benchmarks/gateway.py                      # 16 clients, 16 tokens, 8 rounds of 8 s
    .venv/bin/python benchmarks/gateway.py --targets direct,gateway --rounds 12
    .venv/bin/python benchmarks/gateway.py --targets direct,gateway --variant held:GATEWAY_RECORD_FLUSH_S=600
    .venv/bin/python benchmarks/gateway.py --targets direct,gateway --engine-variant mp:VLLM_ENABLE_V1_MULTIPROCESSING=1
    .venv/bin/python benchmarks/gateway.py --targets direct,gateway,gateway+features --features-redis redis://127.0.0.1:6379/15
    .venv/bin/python benchmarks/gateway.py --mode overhead      # vs LiteLLM on a stand-in engine, 1 and 64 clients
    .venv/bin/python benchmarks/gateway.py --mode overhead --targets direct,gateway --client-counts 1 --before HEAD~1
    .venv/bin/python benchmarks/gateway.py --help

`gateway+features` is the standalone gateway on an alias with every request mirrored to a shadow candidate
(handed to Celery through Redis, not consumed while measuring: the engine's own work stays the same),
stored prompts (redacted in the gateway's thread) and a key whose rate limits are checked in Redis on every
request (set high enough never to refuse).

`--mode overhead` puts a stand-in engine that streams 16 tokens with no compute (benchmarks/standin_engine.py)
behind one gateway process and one LiteLLM proxy process, each on a CPU of its own, and measures what each
adds: requests/s per process, the proxy's CPU per request, and the added p50/p99 end-to-end latency against
the stand-in called directly, at 1 and at 64 concurrent clients, in interleaved rounds.

On a machine as small as this one the engine's own throughput moves by a factor of two or more from one
8-second stretch to the next, so a target is only ever compared with the direct run of the same round:
the order of the targets is reversed every other round (so a slow drift favours none), and the ratios
printed are medians of the per-round ratios, with their range.

LiteLLM is installed into its own virtual environment (var/bench-venv, created on first use), never into
.venv. The engine takes one engine slot (tests/support/engines.py). Everything else (the database, the
broker) lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.http1 import Http1Connection  # noqa: E402
from config.env import cpu_set_parse  # noqa: E402
from serving.demo_models.build import ENGINE_ARGS as DEMO_ENGINE_ARGS  # noqa: E402
from serving.engines.drivers import cpus_check  # noqa: E402
from serving.gateway.meter import StreamMeter  # noqa: E402
from tests.support.engines import RunningEngine, free_port, running_engine  # noqa: E402
from tests.support.processes import server_flags  # noqa: E402

VENV_BIN = Path(sys.executable).parent
BENCH_VENV = REPO / "var" / "bench-venv"
LITELLM_KEY = "sk-bench-" + "0123456789abcdef" * 2
GATEWAY_KEY = "gw_bench_" + "0123456789abcdef" * 2
LIMITED_KEY = "gw_bench_limited_" + "0123456789abcdef" * 2
ALIAS = "bench"
FEATURES_ALIAS = "bench-features"


# --- the load --------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    path: str
    model: str
    headers: dict[str, str]
    pid: int | None = None


@dataclass
class Samples:
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    rounds_rps: list[float] = field(default_factory=list)
    rounds_ttft_p50: list[float] = field(default_factory=list)
    rounds_e2e_p50: list[float] = field(default_factory=list)
    rounds_e2e_p99: list[float] = field(default_factory=list)
    rounds_cpu_ms: list[float] = field(default_factory=list)
    rounds_wakeups: list[float] = field(default_factory=list)
    client_lag_max_ms: float = 0.0
    client_stalls: int = 0

    def pid_measured(self) -> bool:
        return self.cpu_s > 0.0


def request_body(target: Target, max_tokens: int, n: int) -> bytes:
    a, b = 10 + n % 90, 10 + (n * 7) % 90
    return json.dumps({
        "model": target.model, "messages": [{"role": "user", "content": f"{a}+{b}"}], "max_tokens": max_tokens,
        "ignore_eos": True, "stream": True, "temperature": 0,
    }).encode()


async def closed_loop(target: Target, *, clients: int, seconds: float, max_tokens: int, into: Samples | None) -> int:
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json", **target.headers}
    done = 0

    async def client(index: int) -> None:
        nonlocal done
        connection = Http1Connection("127.0.0.1", target.port)
        n = index * 100000
        while time.perf_counter() < deadline:
            n += 1
            sent = time.perf_counter()
            meter = StreamMeter(sent_at=sent)
            def on_body(chunk: bytes, meter: StreamMeter = meter) -> None:
                meter.feed(chunk, time.perf_counter())

            try:
                status, _ = await connection.post(target.path, request_body(target, max_tokens, n), headers, on_body)
                meter.finish(time.perf_counter())
            except Exception:
                status = 0
            ok = status == 200 and meter.done_at is not None and meter.first_token_at is not None and meter.error is None
            if into is not None:
                if ok:
                    assert meter.first_token_at is not None and meter.done_at is not None
                    into.ttft_ms.append((meter.first_token_at - sent) * 1000)
                    into.e2e_ms.append((meter.done_at - sent) * 1000)
                else:
                    into.errors += 1
            if ok:
                done += 1
        connection.close()

    async def lag_probe() -> None:
        # The load generator itself must keep up: a stalled client loop delays every stream it reads.
        while time.perf_counter() < deadline:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lag = time.perf_counter() - before - 0.005
            if into is not None:
                into.client_lag_max_ms = max(into.client_lag_max_ms, lag * 1000)
                if lag > 0.1:
                    into.client_stalls += 1

    await asyncio.gather(lag_probe(), *(client(i) for i in range(clients)))
    return done


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and its children (reaped and alive), from /proc."""
    if pid is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
    return total


def wakeups(pid: int | None) -> int:
    """Times the process's threads went to sleep (voluntary context switches: each is a wake-up to come), from
    /proc. On a shared machine each wake-up waits for a CPU, so fewer per request is less latency under load."""
    if pid is None:
        return 0
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as DESIGN.md's metric definitions say."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


# --- the systems under test ------------------------------------------------------------------------


def bench_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PLATFORM_VAR_DIR": str(tmp / "var"),
        # BENCH_DATABASE_URL measures on another database (e.g. an empty PostgreSQL one); SQLite by default.
        "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{tmp / 'bench.sqlite3'}",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "WARNING",
    })
    return env


def database_prepare(env: dict[str, str], model_dir: str, served: str, family: str,
                     routes: dict[str, tuple[str, str | list[str]]], *, features_url: str | None = None) -> None:
    """Migrate a fresh SQLite database and route each alias to its engine, as versions of model `family` (in a child,
    whose settings come from the benchmark's environment rather than the caller's). `routes`: alias ->
    (version, engine URL or URLs: one replica each). With `features_url`, also FEATURES_ALIAS on that engine: every request mirrored to a
    candidate (the same engine), prompts stored, and LIMITED_KEY with limits it never reaches."""
    script = f"""
import django; django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from serving.engines.services import engine_claim, engine_ready, engine_start_begin
from serving.services import RouteSplit, engine_worker_create, gateway_key_create, model_version_register, route_set
for alias, (version, urls) in {routes!r}.items():
    mv = model_version_register(name={family!r}, version=version, artifact={model_dir!r}, served_model_name={served!r})
    for url in ([urls] if isinstance(urls, str) else urls):
        w = engine_worker_create(model_version=mv, driver="static", base_url=url)
        engine_claim(worker_id=w.id, agent="bench", ttl_s=86400)
        engine_start_begin(worker_id=w.id, agent="bench", port=None, base_url=url)
        assert engine_ready(worker_id=w.id, agent="bench") is not None
    route_set(alias_name=alias, split=RouteSplit(baseline=mv, candidate=None, candidate_weight=0.0, shadow_rate=0.0,
              rollout_id=None))
gateway_key_create(name="bench", raw={GATEWAY_KEY!r})
features_url = {features_url!r}
if features_url:
    from serving.models import Alias
    from serving.services import KeyLimits, alias_options_set
    versions = []
    for version in ("features-base", "features-cand"):
        mv = model_version_register(name={family!r}, version=version, artifact={model_dir!r}, served_model_name={served!r})
        w = engine_worker_create(model_version=mv, driver="static", base_url=features_url)
        engine_claim(worker_id=w.id, agent="bench", ttl_s=86400)
        engine_start_begin(worker_id=w.id, agent="bench", port=None, base_url=features_url)
        assert engine_ready(worker_id=w.id, agent="bench") is not None
        versions.append(mv)
    route_set(alias_name={FEATURES_ALIAS!r}, split=RouteSplit(baseline=versions[0], candidate=versions[1],
              candidate_weight=0.0, shadow_rate=1.0, rollout_id=None))
    alias_options_set(alias=Alias.objects.get(name={FEATURES_ALIAS!r}), store_prompts=True, ttfb_timeout_s=None)
    gateway_key_create(name="bench-limited", raw={LIMITED_KEY!r},
                       limits=KeyLimits(rpm_limit=10_000_000, tpm_limit=1_000_000_000, max_concurrency=100_000))
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True)


@contextmanager
def process(args: list[str], *, env: dict[str, str], log: Path, ready_url: str, timeout_s: float = 180,
            cpus: frozenset[int] | None = None, cwd: Path = REPO) -> Iterator[int]:
    """A child process (its own session) until it answers `ready_url`; on `cpus` (it and its threads) when given."""
    import httpx

    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with open(log, "wb") as handle:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=pin)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=2, trust_env=False).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args[0]} not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def litellm_ready() -> Path:
    litellm = BENCH_VENV / "bin" / "litellm"
    if not litellm.exists():
        print("installing litellm[proxy] into", BENCH_VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"], check=True)
    return litellm


def demo_model(name: str) -> str:
    """The demo model's directory, built (or found cached) by the demo-model builder in a child process."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom serving.demo_models import DEMO_RECIPES, build_demo_models\n"
        "recipes = [r for r in DEMO_RECIPES if r.name == sys.argv[2]]\n"
        "built = build_demo_models(Path(sys.argv[1]), recipes=recipes, log=lambda m: print(m, file=sys.stderr))\n"
        "print(built[0].path)\n"
    )
    out_dir = os.environ.get("DEMO_MODELS_DIR") or str(REPO / "var" / "demo-models")
    done = subprocess.run([sys.executable, "-c", script, out_dir, name], cwd=REPO, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


# --- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per target per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each run")
    parser.add_argument("--targets", default="direct,gateway,combined,litellm")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                        help="one more standalone gateway with these settings in its environment, measured in the "
                             "same rounds (e.g. held:GATEWAY_RECORD_FLUSH_S=600,GATEWAY_RECORD_BATCH=100000)")
    parser.add_argument("--engine-variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                        help="one more engine with these settings in its environment, measured in the same rounds "
                             "directly (direct@NAME, against direct) and through the gateway (gateway@NAME, against "
                             "direct@NAME), e.g. mp:VLLM_ENABLE_V1_MULTIPROCESSING=1")
    parser.add_argument("--model", default="adder-v1", help="demo model to serve")
    parser.add_argument("--model-dir", default=None, help="serve this directory instead of a demo model")
    parser.add_argument("--engine-cpus", default=None, metavar="LIST",
                        help="run the engine (all its processes) on these CPUs, e.g. 0, as ENGINE_CPUS does, and the "
                             "load generator and the proxies on the others")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--engine-url", default=None,
                        help="use an engine that is already running (serving --model) instead of starting one")
    parser.add_argument("--features-redis", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"),
                        help="Redis for the gateway+features target (shadow hand-offs and shared limits); "
                             "BENCH_REDIS_URL, or db 15 on this machine's Redis")
    parser.add_argument("--mode", choices=("engine", "overhead"), default="engine",
                        help="engine: a real vLLM engine (default); overhead: a stand-in engine with no compute, "
                             "the gateway against LiteLLM per process")
    parser.add_argument("--client-counts", default="1,64", help="overhead mode: concurrent clients to measure at")
    parser.add_argument("--no-pin", action="store_true",
                        help="overhead mode: leave every process free to run on any CPU (on a machine others load, "
                             "a proxy pinned to one CPU waits for that CPU at every wake-up)")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="overhead mode: also measure the gateway as it was at git revision REV (target "
                             "`before`, its own process on the same CPU, in the same rounds)")
    args = parser.parse_args()
    if args.mode == "overhead":
        overhead_main(args)
        return
    targets_wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    engine_cpus: frozenset[int] | None = None
    if args.engine_cpus:
        if args.engine_url:
            parser.error("--engine-cpus pins an engine the benchmark starts; it cannot pin one at --engine-url")
        try:
            engine_cpus = cpu_set_parse(args.engine_cpus)
            cpus_check(engine_cpus)
        except ValueError as exc:
            parser.error(f"--engine-cpus: {exc}")
        other_cpus = os.sched_getaffinity(0) - engine_cpus
        if not other_cpus:
            parser.error(f"--engine-cpus {args.engine_cpus}: leave the load generator and the proxies a CPU")

    engine_variants = [variant_parse(text, option="--engine-variant") for text in args.engine_variant]
    if engine_variants and args.engine_url:
        parser.error("--engine-variant starts engines; it cannot be used with --engine-url")
    model_dir = args.model_dir or (args.engine_url and "-") or demo_model(args.model)
    # Serve a demo model with the flags its model version is registered with (what `make run` serves).
    engine_args = None if args.model_dir else list(DEMO_ENGINE_ARGS)
    served = args.model
    tmp = Path(tempfile.mkdtemp(prefix="ramp-bench-gateway-"))
    env = bench_env(tmp)
    logs = tmp / "logs"
    logs.mkdir(parents=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    with ExitStack() as stack:
        if args.engine_url:
            engine_url = args.engine_url.rstrip("/")
            engine_port = int(engine_url.rsplit(":", 1)[1])
        else:
            engine = stack.enter_context(running_engine(model_dir=model_dir, served_name=served, log_dir=logs,
                                                        engine_args=engine_args, cpus=engine_cpus))
            engine_url, engine_port = engine.base_url, engine.port
        variant_engines: dict[str, RunningEngine] = {}
        for name, extra_env in engine_variants:
            variant_engines[name] = stack.enter_context(running_engine(
                model_dir=model_dir, served_name=served, log_dir=logs / name, engine_args=engine_args,
                cpus=engine_cpus, env_overrides=extra_env))
            print(f"engine {served} ({name}: {extra_env}) ready at {variant_engines[name].base_url}", flush=True)
        if engine_cpus is not None:
            os.sched_setaffinity(0, other_cpus)  # inherited by the proxies started below
        print(f"engine {served} ready at {engine_url}", flush=True)
        family, version = served.rsplit("-", 1)
        features = "gateway+features" in targets_wanted
        database_prepare(env, model_dir, served, family, {ALIAS: (version, engine_url)} | {
            f"{ALIAS}-{name}": (f"{version}-{name}", e.base_url) for name, e in variant_engines.items()},
            features_url=engine_url if features else None)
        targets: dict[str, Target] = {}
        if "direct" in targets_wanted or variant_engines:
            targets["direct"] = Target("direct", engine_port, "/v1/chat/completions", served, {}, pid=None)
        for name, e in variant_engines.items():
            targets[f"direct@{name}"] = Target(f"direct@{name}", e.port, "/v1/chat/completions", served, {}, pid=None)
        gateways: list[tuple[str, dict[str, str]]] = [("gateway", {})] if "gateway" in targets_wanted else []
        gateways += [variant_parse(text) for text in args.variant]
        for name, extra_env in gateways:
            port = free_port()
            pid = stack.enter_context(process(
                [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--port", str(port), *server_flags()],
                env={**env, **extra_env}, log=logs / f"{name}.log", ready_url=f"http://127.0.0.1:{port}/healthz"))
            targets[name] = Target(name, port, "/v1/chat/completions", ALIAS,
                                   {"Authorization": f"Bearer {GATEWAY_KEY}"}, pid=pid)
            if name == "gateway":
                for variant in variant_engines:
                    targets[f"gateway@{variant}"] = Target(f"gateway@{variant}", port, "/v1/chat/completions",
                                                           f"{ALIAS}-{variant}", targets[name].headers, pid=pid)
        if features:
            redis_env = {"CELERY_BROKER_URL": args.features_redis, "GATEWAY_LIMITS_REDIS_URL": args.features_redis}
            port = free_port()
            pid = stack.enter_context(process(
                [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--port", str(port), *server_flags()],
                env={**env, **redis_env}, log=logs / "gateway+features.log",
                ready_url=f"http://127.0.0.1:{port}/healthz"))
            targets["gateway+features"] = Target("gateway+features", port, "/v1/chat/completions", FEATURES_ALIAS,
                                                 {"Authorization": f"Bearer {LIMITED_KEY}"}, pid=pid)
            stack.callback(shadow_backlog_clear, args.features_redis)
        if "combined" in targets_wanted:
            port = free_port()
            pid = stack.enter_context(process(
                [str(VENV_BIN / "uvicorn"), "config.asgi:application", "--port", str(port), *server_flags()],
                env=env, log=logs / "combined.log", ready_url=f"http://127.0.0.1:{port}/healthz"))
            targets["combined"] = Target("combined", port, "/v1/chat/completions", ALIAS,
                                         {"Authorization": f"Bearer {GATEWAY_KEY}"}, pid=pid)
        if "litellm" in targets_wanted:
            litellm = litellm_ready()
            port = free_port()
            config = litellm_config(tmp, served, engine_url)
            litellm_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL",)}
            litellm_env["LITELLM_LOG"] = "ERROR"
            pid = stack.enter_context(process(
                [str(litellm), "--config", str(config), "--port", str(port), "--num_workers", "1"],
                env=litellm_env, log=logs / "litellm.log", ready_url=f"http://127.0.0.1:{port}/health/liveliness",
                timeout_s=300))
            targets["litellm"] = Target("litellm", port, "/v1/chat/completions", ALIAS,
                                        {"Authorization": f"Bearer {LITELLM_KEY}"}, pid=pid)

        samples = {name: Samples() for name in targets}
        names = list(targets)
        for round_index in range(args.rounds):
            # ABBA order: a drift in the engine's speed over the run weighs on no target more than another.
            order = names if round_index % 2 == 0 else names[::-1]
            line = []
            for name in order:
                target, into = targets[name], samples[name]
                asyncio.run(closed_loop(target, clients=args.clients, seconds=args.warmup, max_tokens=args.max_tokens, into=None))
                cpu_before = cpu_seconds(target.pid)
                ttft_before = len(into.ttft_ms)
                started = time.perf_counter()
                done = asyncio.run(closed_loop(target, clients=args.clients, seconds=args.duration,
                                               max_tokens=args.max_tokens, into=into))
                elapsed = time.perf_counter() - started
                into.seconds += elapsed
                into.cpu_s += cpu_seconds(target.pid) - cpu_before
                into.rounds_rps.append(done / elapsed)
                into.rounds_ttft_p50.append(percentile(into.ttft_ms[ttft_before:], 50))
                line.append(f"{name} {done / elapsed:.1f}")
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(line) + " req/s", flush=True)

        report(samples, args)
    if args.keep:
        print(f"logs and database kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def shadow_backlog_clear(redis_url: str) -> None:
    """The mirrors gateway+features handed over were never meant to run: drop them and say how many."""
    import redis

    from config.queues import SHADOW

    client = redis.Redis.from_url(redis_url)
    print(f"gateway+features handed {client.llen(SHADOW)} shadow mirrors to the broker (dropped now)")
    client.delete(SHADOW)


def litellm_config(tmp: Path, served: str, engine_url: str) -> Path:
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {ALIAS}\n"
        "    litellm_params:\n"
        f"      model: hosted_vllm/{served}\n"
        f"      api_base: {engine_url}/v1\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )
    return config


def variant_parse(text: str, option: str = "--variant") -> tuple[str, dict[str, str]]:
    """`NAME:VAR=VALUE,VAR=VALUE` -> (NAME, {VAR: VALUE})."""
    name, _, assignments = text.partition(":")
    extra: dict[str, str] = {}
    for item in filter(None, assignments.split(",")):
        var, sep, value = item.partition("=")
        if not sep or not var:
            raise SystemExit(f"{option} {text!r}: {item!r} is not VAR=VALUE")
        extra[var] = value
    if not name or "@" in name or name in ("direct", "gateway", "combined", "litellm") or not extra:
        raise SystemExit(f"{option} {text!r}: give it a name of its own (no @) and at least one VAR=VALUE")
    return name, extra


def baseline_of(name: str) -> str:
    """What a target is compared with: its own engine's direct run; an engine variant's direct run, with the
    first engine's."""
    target, _, variant = name.partition("@")
    return f"direct@{variant}" if variant and target != "direct" else "direct"


def report(samples: dict[str, Samples], args: argparse.Namespace) -> None:
    print()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.clients} concurrent streaming clients, {args.max_tokens} output tokens (ignore_eos), "
          f"{args.rounds} interleaved round(s) of {args.duration:.0f} s per target; {os.cpu_count()} CPUs, "
          f"load average at the end {load}"
          + (f"; engine pinned to CPUs {args.engine_cpus}, the rest elsewhere" if args.engine_cpus else "; nothing pinned"))
    print("x direct and +TTFT p50: the median over rounds of each round's figure against that round's direct run "
          "[lowest, highest]" + ("; NAME@V against direct@V, direct@V against direct" if args.engine_variant else ""))
    print()
    width = max(9, *(len(name) for name in samples))
    header = (f"| {'target':{width}s} | {'requests':>8s} | {'errors':>6s} | {'req/s':>7s} | {'x direct':>20s} | "
              f"{'TTFT p50':>8s} | {'TTFT p99':>8s} | {'E2E p50':>8s} | {'E2E p99':>8s} | {'+TTFT p50':>28s} | "
              f"{'proxy CPU/req':>13s} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, s in samples.items():
        rps = len(s.e2e_ms) / s.seconds if s.seconds else 0.0
        ratio = added = "-"
        direct = samples.get(baseline_of(name))
        if direct is not None and name != "direct":
            ratios = [r / d for r, d in zip(s.rounds_rps, direct.rounds_rps, strict=True) if d]
            deltas = [t - d for t, d in zip(s.rounds_ttft_p50, direct.rounds_ttft_p50, strict=True)]
            ratio = f"{median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
            added = f"{median(deltas):+.1f} ms [{min(deltas):+.1f}, {max(deltas):+.1f}]"
        elif name == "direct":
            ratio = "1.00x"
        cpu = f"{1000 * s.cpu_s / len(s.e2e_ms):.2f} ms" if s.cpu_s and s.e2e_ms else "-"
        print(f"| {name:{width}s} | {len(s.e2e_ms):8d} | {s.errors:6d} | {rps:7.1f} | {ratio:>20s} | "
              f"{percentile(s.ttft_ms, 50):6.1f}ms | {percentile(s.ttft_ms, 99):6.1f}ms | "
              f"{percentile(s.e2e_ms, 50):6.1f}ms | {percentile(s.e2e_ms, 99):6.1f}ms | {added:>28s} | {cpu:>13s} |")
    print()
    print("per round req/s: " + "; ".join(f"{n} " + ", ".join(f"{r:.1f}" for r in s.rounds_rps) for n, s in samples.items()))
    print("load generator's event loop, longest lag and lags over 100 ms: " + "; ".join(
        f"{n} {s.client_lag_max_ms:.0f} ms, {s.client_stalls}" for n, s in samples.items()))


# --- overhead mode ---------------------------------------------------------------------------------


def overhead_main(args: argparse.Namespace) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    # The proxy measured gets a CPU of its own; the stand-in and the load generator share the rest.
    proxy_cpus = frozenset(cpus[-1:]) if len(cpus) > 1 and not args.no_pin else None
    if proxy_cpus:
        os.sched_setaffinity(0, set(cpus[:-1]))
    counts = [int(c) for c in args.client_counts.split(",") if c.strip()]
    targets_wanted = [t for t in ("direct", "gateway", "litellm") if t in args.targets.split(",")]
    if args.before:
        targets_wanted.insert(1, "before")
    tmp = Path(tempfile.mkdtemp(prefix="ramp-bench-overhead-"))
    env = bench_env(tmp)
    logs = tmp / "logs"
    logs.mkdir(parents=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with ExitStack() as stack:
        port = free_port()
        stack.enter_context(process(
            [sys.executable, str(REPO / "benchmarks" / "standin_engine.py"), "--port", str(port), "--tokens",
             str(args.max_tokens)], env=env, log=logs / "standin.log", ready_url=f"http://127.0.0.1:{port}/health"))
        standin_url = f"http://127.0.0.1:{port}"
        database_prepare(env, "-", "bench-v1", "bench", {ALIAS: ("v1", standin_url)})
        targets = {"direct": Target("direct", port, "/v1/chat/completions", "bench-v1", {}, pid=None)}
        if "gateway" in targets_wanted:
            gport = free_port()
            pid = stack.enter_context(process(
                [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--port", str(gport), *server_flags()],
                env=env, log=logs / "gateway.log", ready_url=f"http://127.0.0.1:{gport}/healthz", cpus=proxy_cpus))
            targets["gateway"] = Target("gateway", gport, "/v1/chat/completions", ALIAS,
                                        {"Authorization": f"Bearer {GATEWAY_KEY}"}, pid=pid)
        if "before" in targets_wanted:
            # The code at REV, unpacked beside the run: uvicorn imports the app from its working directory first.
            tree = tmp / "before"
            tree.mkdir()
            archive = subprocess.run(["git", "archive", args.before], cwd=REPO, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            bport = free_port()
            pid = stack.enter_context(process(
                [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--port", str(bport), *server_flags()],
                env=env, log=logs / "before.log", ready_url=f"http://127.0.0.1:{bport}/healthz", cpus=proxy_cpus,
                cwd=tree))
            targets["before"] = Target("before", bport, "/v1/chat/completions", ALIAS,
                                       {"Authorization": f"Bearer {GATEWAY_KEY}"}, pid=pid)
        if "litellm" in targets_wanted:
            litellm = litellm_ready()
            lport = free_port()
            litellm_env = {k: v for k, v in env.items() if k != "DATABASE_URL"} | {"LITELLM_LOG": "ERROR"}
            pid = stack.enter_context(process(
                [str(litellm), "--config", str(litellm_config(tmp, "bench-v1", standin_url)), "--port", str(lport),
                 "--num_workers", "1"], env=litellm_env, log=logs / "litellm.log",
                ready_url=f"http://127.0.0.1:{lport}/health/liveliness", timeout_s=300, cpus=proxy_cpus))
            targets["litellm"] = Target("litellm", lport, "/v1/chat/completions", ALIAS,
                                        {"Authorization": f"Bearer {LITELLM_KEY}"}, pid=pid)
        results: dict[int, dict[str, Samples]] = {}
        for clients in counts:
            samples = {name: Samples() for name in targets}
            names = list(targets)
            for round_index in range(args.rounds):
                order = names if round_index % 2 == 0 else names[::-1]
                line = []
                for name in order:
                    target, into = targets[name], samples[name]
                    asyncio.run(closed_loop(target, clients=clients, seconds=args.warmup, max_tokens=args.max_tokens,
                                            into=None))
                    cpu_before = cpu_seconds(target.pid)
                    wakeups_before = wakeups(target.pid)
                    first = len(into.e2e_ms)
                    started = time.perf_counter()
                    done = asyncio.run(closed_loop(target, clients=clients, seconds=args.duration,
                                                   max_tokens=args.max_tokens, into=into))
                    elapsed = time.perf_counter() - started
                    cpu = cpu_seconds(target.pid) - cpu_before
                    into.seconds += elapsed
                    into.cpu_s += cpu
                    into.rounds_rps.append(done / elapsed)
                    into.rounds_ttft_p50.append(percentile(into.ttft_ms[first:], 50))
                    into.rounds_e2e_p50.append(percentile(into.e2e_ms[first:], 50))
                    into.rounds_e2e_p99.append(percentile(into.e2e_ms[first:], 99))
                    into.rounds_cpu_ms.append(1000 * cpu / done if done else float("nan"))
                    into.rounds_wakeups.append((wakeups(target.pid) - wakeups_before) / done if done else float("nan"))
                    line.append(f"{name} {done / elapsed:.0f}")
                print(f"{clients} client(s), round {round_index + 1}/{args.rounds}: " + ", ".join(line) + " req/s; "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
            results[clients] = samples
        overhead_report(results, args, proxy_cpus)
    if args.keep:
        print(f"logs and database kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def overhead_report(results: dict[int, dict[str, Samples]], args: argparse.Namespace,
                    proxy_cpus: frozenset[int] | None) -> None:
    print()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    where = f"each proxy alone on CPU {min(proxy_cpus)}" if proxy_cpus else "nothing pinned"
    print(f"stand-in engine streaming {args.max_tokens} tokens with no compute; one proxy process each ({where}); "
          f"{args.rounds} interleaved round(s) of {args.duration:.0f} s per target; load average at the end {load}")
    print("medians over rounds [lowest, highest]; added latency is each round's p50 TTFT and p50 / p99 E2E against "
          "that round's direct run; CPU is the proxy process's own (user + system) per request served")
    for clients, samples in results.items():
        print()
        print(f"{clients} concurrent client(s):")
        header = (f"| {'target':8s} | {'requests':>8s} | {'errors':>6s} | {'req/s':>22s} | {'x LiteLLM':>9s} | "
                  f"{'CPU/req':>8s} | {'wake-ups/req':>12s} | {'E2E p50':>8s} | {'E2E p99':>8s} | {'+TTFT p50':>24s} | {'+E2E p50':>24s} | "
                  f"{'+E2E p99':>24s} |")
        print(header)
        print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
        litellm = samples.get("litellm")
        direct = samples["direct"]
        for name, s in samples.items():
            rps = f"{median(s.rounds_rps):.0f} [{min(s.rounds_rps):.0f}, {max(s.rounds_rps):.0f}]"
            times = "-"
            if litellm is not None and name != "direct":
                times = f"{median([a / b for a, b in zip(s.rounds_rps, litellm.rounds_rps, strict=True)]):.2f}x"
            cpu = f"{median(s.rounds_cpu_ms):.2f} ms" if s.pid_measured() else "-"
            woke = f"{median(s.rounds_wakeups):.1f}" if s.pid_measured() else "-"
            added_ttft = added50 = added99 = "-"
            if name != "direct":
                dt = [a - b for a, b in zip(s.rounds_ttft_p50, direct.rounds_ttft_p50, strict=True)]
                added_ttft = f"{median(dt):+.2f} ms [{min(dt):+.2f}, {max(dt):+.2f}]"
                d50 = [a - b for a, b in zip(s.rounds_e2e_p50, direct.rounds_e2e_p50, strict=True)]
                d99 = [a - b for a, b in zip(s.rounds_e2e_p99, direct.rounds_e2e_p99, strict=True)]
                added50 = f"{median(d50):+.2f} ms [{min(d50):+.2f}, {max(d50):+.2f}]"
                added99 = f"{median(d99):+.2f} ms [{min(d99):+.2f}, {max(d99):+.2f}]"
            print(f"| {name:8s} | {len(s.e2e_ms):8d} | {s.errors:6d} | {rps:>22s} | {times:>9s} | {cpu:>8s} | "
                  f"{woke:>12s} | {percentile(s.e2e_ms, 50):6.2f}ms | {percentile(s.e2e_ms, 99):6.2f}ms | {added_ttft:>24s} | "
                  f"{added50:>24s} | {added99:>24s} |")
        before, now = samples.get("before"), samples.get("gateway")
        if before is not None and now is not None:
            dt = [a - b for a, b in zip(now.rounds_ttft_p50, before.rounds_ttft_p50, strict=True)]
            de = [a - b for a, b in zip(now.rounds_e2e_p50, before.rounds_e2e_p50, strict=True)]
            dc = [a / b for a, b in zip(now.rounds_cpu_ms, before.rounds_cpu_ms, strict=True) if b]
            dw = [a - b for a, b in zip(now.rounds_wakeups, before.rounds_wakeups, strict=True)]
            print(f"gateway against before ({args.before}), medians of the rounds' differences [lowest, highest]: "
                  f"TTFT p50 {median(dt):+.3f} ms [{min(dt):+.3f}, {max(dt):+.3f}], E2E p50 {median(de):+.3f} ms "
                  f"[{min(de):+.3f}, {max(de):+.3f}], CPU/req {median(dc):.2f}x, wake-ups/req {median(dw):+.2f}")


if __name__ == "__main__":
    main()
