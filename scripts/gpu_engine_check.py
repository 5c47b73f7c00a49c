"""The measuring half of scripts/check_gpu_engine.sh (run it through that script).

On a scratch SQLite database under a temporary PLATFORM_VAR_DIR: builds the demo model (cached in
DEMO_MODELS_DIR), starts the platform's gateway and engine agent as their own processes, and for each
variant (`graphs`: the GPU default, CUDA graphs on; `eager`: --enforce-eager) registers a version, creates a
local worker and lets the agent start it as it starts every engine (GPU assignment, key, flags), then:

- start: seconds from the agent launching vLLM to the worker being READY (its readiness probe: /health,
  /v1/models, a 1-token completion);
- through the gateway: N streamed chat completions (ignore_eos, so every answer has max_tokens tokens),
  TTFT and TPOT as the gateway measures and records them (DESIGN.md's definitions), p50 and p90;
- then stops the worker (drained, SIGTERM) before the next variant, so both have the GPU to themselves.

Prints one table and, with both variants, the TPOT ratio; exits 1 if any request failed or a variant never
became ready."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
HOST = "gpu-check"
READY_TIMEOUT_S = 1200.0


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as DESIGN.md's metrics are read."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--model", choices=("adder-v1", "adder-v2", "adder-v2-slow"), default="adder-v2-slow")
    parser.add_argument("--variants", default="graphs,eager")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if args.build == "cpu" and "graphs" in variants:
        parser.error("--variants graphs: the CPU build runs every engine with --enforce-eager")

    work = Path(tempfile.mkdtemp(prefix="ramp-gpu-check-"))
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "config.settings", "PLATFORM_VAR_DIR": str(work), "ENGINE_BUILD": args.build,
        "ENGINE_AGENT_HOST": HOST, "ENGINE_LOG_DIR": str(work / "engines"), "ENGINE_HEALTH_INTERVAL_S": "1",
        "GATEWAY_RECORD_FLUSH_S": "0.2",
    })  # fmt: skip
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("CELERY_BROKER_URL", None)
    os.environ.setdefault("DEMO_MODELS_DIR", str(REPO / "var" / "demo-models"))
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command

    from serving.demo_models import DEMO_RECIPES, demo_model_build
    from serving.engines.drivers import free_port
    from serving.models import EngineWorker, RequestRecord, RouteGeneration
    from serving.services import (
        RouteSplit,
        engine_worker_create,
        engine_worker_set_desired,
        gateway_key_create,
        model_version_register,
        route_set,
    )

    call_command("migrate", verbosity=0)
    recipe = next(r for r in DEMO_RECIPES if r.name == args.model)
    model = demo_model_build(
        recipe, out_dir=Path(os.environ["DEMO_MODELS_DIR"]), log=lambda line: print(line, flush=True)
    )
    key = gateway_key_create(name="gpu-check").raw
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    port = free_port()
    gateway = _spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "serving.gateway.asgi:application",
            "--port",
            str(port),
            "--http",
            "config.http_server:HeadBoundedProtocol",
            "--no-access-log",
        ],
        work / "gateway.log",
        env,
    )
    agent = _spawn(
        [sys.executable, "manage.py", "engine_agent", "--host-name", HOST, "--interval", "0.5"],
        work / "agent.log",
        env,
    )
    rows: list[dict[str, object]] = []
    failed = False
    try:
        for variant in variants:
            engine_args = [*model.engine_args, *(["--enforce-eager"] if variant == "eager" else [])]
            version = model_version_register(
                name=f"check-{variant}",
                version=args.model.replace("adder-", ""),
                artifact=str(model.path),
                served_model_name=f"{args.model}-{variant}",
                engine_args=engine_args,
            )
            alias = f"check-{variant}"
            route_set(
                alias_name=alias,
                split=RouteSplit(
                    baseline=version, candidate=None, candidate_weight=0, shadow_rate=0, rollout_id=None
                ),
            )
            worker = engine_worker_create(model_version=version, host_name=HOST)
            print(f"{variant}: waiting for the agent to start {version.label} ...", flush=True)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                current = EngineWorker.objects.get(pk=worker.pk)
                if current.state == EngineWorker.State.READY:
                    break
                if current.state == EngineWorker.State.FAILED or time.monotonic() > deadline:
                    print(
                        f"{variant}: never ready: {current.state} ({current.state_reason})\n{current.log_tail[-3000:]}"
                    )
                    failed = True
                    break
                time.sleep(0.5)
            if current.state != EngineWorker.State.READY:
                continue
            assert current.started_at is not None and current.ready_at is not None
            start_s = (current.ready_at - current.started_at).total_seconds()
            print(
                f"{variant}: ready after {start_s:.1f} s on GPUs {current.gpu_ids or '(none: CPU build)'}",
                flush=True,
            )
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                timeout=300,
                trust_env=False,
                headers={"Authorization": f"Bearer {key}"},
            )
            # The alias is listed as soon as its route is set; its engine is routed only once the gateway has
            # rebuilt its table after the worker became READY (its next route poll). Until then every request
            # is refused at once (no ready engine), so wait for that table, not just for the alias.
            routed = RouteGeneration.objects.get(pk=1).generation
            deadline = time.monotonic() + 30
            while True:
                listed = [m["id"] for m in client.get("/v1/models").json().get("data", [])]
                generation = client.get("/readyz").json()["routes"]["generation"]
                if alias in listed and generation >= routed:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"the gateway did not route {alias} to its ready engine within 30 s "
                        f"(listed: {alias in listed}, route generation {generation}, the database's {routed})"
                    )
                time.sleep(0.2)

            def one(i: int, alias: str = alias, client: httpx.Client = client) -> int:
                body = {"model": alias, "stream": True, "max_tokens": args.max_tokens, "ignore_eos": True,
                        "stream_options": {"include_usage": True}, "temperature": 0,
                        "messages": [{"role": "user", "content": f"{10 + i % 80}+{(7 * i) % 90}"}],
                        "user": f"check-{i}"}  # fmt: skip
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    for _ in response.iter_bytes():
                        pass
                    return response.status_code

            for i in range(2):  # warm-up, not measured
                one(i)
            since = time.time()
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                statuses = list(pool.map(one, range(args.requests)))
            time.sleep(1.0)  # the gateway flushes its records every GATEWAY_RECORD_FLUSH_S
            records = list(
                RequestRecord.objects.filter(alias=alias, created_at__gte=datetime.fromtimestamp(since, UTC))
            )
            ttft = [r.ttft_ms for r in records if r.ttft_ms is not None]
            tpot = [r.tpot_ms for r in records if r.tpot_ms is not None]
            ok = sum(1 for s in statuses if s == 200)
            failed |= ok != args.requests or not ttft or not tpot
            rows.append(
                {
                    "variant": variant,
                    "start_s": start_s,
                    "ok": ok,
                    "records": len(records),
                    "ttft": (percentile(ttft, 0.5), percentile(ttft, 0.9)) if ttft else None,
                    "tpot": (percentile(tpot, 0.5), percentile(tpot, 0.9)) if tpot else None,
                }
            )
            client.close()
            engine_worker_set_desired(worker=current, desired=EngineWorker.Desired.STOPPED)
            deadline = time.monotonic() + 120
            while EngineWorker.objects.get(pk=worker.pk).state != EngineWorker.State.STOPPED:
                if time.monotonic() > deadline:
                    print(f"{variant}: did not stop in 120 s", flush=True)
                    break
                time.sleep(0.5)
    finally:
        _stop(agent)
        _stop(gateway)

    print(
        f"\nmodel {args.model}, build {args.build}, {args.requests} streamed requests x {args.max_tokens} tokens, "
        f"{args.concurrency} at once, through the gateway (its records)"
    )
    print(
        f"{'variant':<8} {'start s':>8} {'ok':>7} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'TPOT p50 ms':>12} "
        f"{'TPOT p90 ms':>12}"
    )
    for row in rows:
        ttft, tpot = row["ttft"] or (float("nan"),) * 2, row["tpot"] or (float("nan"),) * 2
        print(
            f"{row['variant']:<8} {row['start_s']:>8.1f} {row['ok']:>3}/{args.requests:<3} {ttft[0]:>12.1f} "  # type: ignore[index]
            f"{ttft[1]:>12.1f} {tpot[0]:>12.2f} {tpot[1]:>12.2f}"
        )  # type: ignore[index]
    by = {row["variant"]: row for row in rows}
    if "graphs" in by and "eager" in by and by["graphs"]["tpot"] and by["eager"]["tpot"]:
        ratio = by["eager"]["tpot"][0] / by["graphs"]["tpot"][0]  # type: ignore[index]
        print(f"TPOT p50 eager / graphs: {ratio:.2f}x")
    print(f"logs: {work}")
    return 1 if failed or len(rows) != len(variants) else 0


if __name__ == "__main__":
    sys.exit(main())
