"""Engine agent figures: start-to-ready time of a local vLLM engine through the agent, the agent's own
memory and CPU while it watches a ready engine, and how long a SIGTERM takes to stop it all.

    python benchmarks/engine_agent.py                    # demo model adder-v1 (built if missing)
    python benchmarks/engine_agent.py --model DIR --watch 60

Runs on a scratch SQLite database in a temporary directory, with one engine slot held
(tests/support/engines.py). Prints its figures; asserts nothing."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A model directory (default: the demo model adder-v1).")
    parser.add_argument("--watch", type=float, default=30.0, help="Seconds to watch the agent with a ready engine.")
    parser.add_argument("--runs", type=int, default=1, help="Engine starts to time.")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="ramp-agent-bench-"))
    os.environ.update({"PLATFORM_VAR_DIR": str(scratch), "DJANGO_SETTINGS_MODULE": "config.settings"})
    os.environ.pop("DATABASE_URL", None)
    os.environ.setdefault("DEMO_MODELS_DIR", str(REPO / "var" / "demo-models"))
    subprocess.run([sys.executable, str(REPO / "manage.py"), "migrate", "-v0"], check=True, cwd=REPO)

    import django

    django.setup()
    from serving.models import EngineWorker
    from serving.services import engine_worker_create, engine_worker_set_desired, model_version_register
    from tests.support.engines import engine_slot

    if args.model:
        model = Path(args.model)
    else:
        from django.conf import settings

        from serving.demo_models import DEMO_RECIPES, demo_model_build

        recipe = next(r for r in DEMO_RECIPES if r.name == "adder-v1")
        model = demo_model_build(recipe, out_dir=Path(settings.DEMO_MODELS_DIR), log=print).path
    version = model_version_register(name="bench", version="v1", artifact=str(model), served_model_name="bench-v1")
    worker = engine_worker_create(model_version=version, host_name="bench")

    with engine_slot():
        log = (scratch / "agent.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), "engine_agent", "--host-name", "bench"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "ENGINE_RESTART_BACKOFF_S": "0", "ENGINE_HEALTH_INTERVAL_S": "5"})
        try:
            peak = 0.0
            for run in range(1, args.runs + 1):
                created = time.monotonic()
                while True:
                    peak = max(peak, rss_mib(agent.pid))
                    row = EngineWorker.objects.get(pk=worker.pk)
                    if row.state == EngineWorker.State.READY:
                        break
                    if row.state == EngineWorker.State.FAILED or agent.poll() is not None:
                        raise SystemExit(f"engine did not start: {row.state_reason}\n{row.log_tail}")
                    time.sleep(0.25)
                observed = time.monotonic() - created
                assert row.started_at is not None and row.ready_at is not None
                launch_to_ready = (row.ready_at - row.started_at).total_seconds()
                print(f"run {run}: worker created -> READY {observed:.1f} s "
                      f"(process launch -> READY {launch_to_ready:.1f} s, by the agent's clock)")
                if run < args.runs:
                    os.kill(row.pid or 0, signal.SIGKILL)  # the agent restarts it: the next timed start
                    while EngineWorker.objects.get(pk=worker.pk).state == EngineWorker.State.READY:
                        time.sleep(0.1)

            cpu_before, started = cpu_seconds(agent.pid), time.monotonic()
            samples = []
            while time.monotonic() - started < args.watch:
                samples.append(rss_mib(agent.pid))
                time.sleep(1.0)
            cpu_share = (cpu_seconds(agent.pid) - cpu_before) / (time.monotonic() - started)
            peak = max(peak, *samples)
            print(f"agent memory: {samples[-1]:.0f} MiB RSS while watching one ready engine, {peak:.0f} MiB peak")
            print(f"agent CPU: {100 * cpu_share:.1f} % of one core over {args.watch:.0f} s "
                  "(health check + metrics scrape every 5 s)")

            engine_pid = EngineWorker.objects.get(pk=worker.pk).pid
            stop_started = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=30)
            print(f"SIGTERM -> agent exited ({code}) with its engine stopped in {time.monotonic() - stop_started:.1f} s; "
                  f"engine pid {engine_pid} left: {Path(f'/proc/{engine_pid}').exists()}")
        finally:
            if agent.poll() is None:
                agent.kill()
            engine_worker_set_desired(worker=worker, desired=EngineWorker.Desired.STOPPED)


if __name__ == "__main__":
    main()
