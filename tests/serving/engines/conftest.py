"""Helpers for tests that run the engine agent as a real process (`manage.py engine_agent`) on the test
database, with real vLLM engines on the demo models."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings

from serving.engines.command import SERVER_MODULE
from serving.models import EngineWorker, ModelVersion, RouteGeneration
from serving.services import model_version_register
from tests.support.processes import REPO_ROOT, child_env, child_process

LOG_DIR = Path(settings.VAR_DIR) / "test-logs" / "engine-agent"
# Engines on this 2-core machine have been seen to take 300 s to start while other work runs.
ENGINE_WAIT_S = 900.0


@pytest.fixture(scope="session")
def adder_v1_dir() -> Path:
    """The demo model adder-v1, built (or found in the cache) by serving.demo_models."""
    from serving.demo_models import DEMO_RECIPES, demo_model_build

    recipe = next(r for r in DEMO_RECIPES if r.name == "adder-v1")
    return demo_model_build(recipe, out_dir=Path(settings.DEMO_MODELS_DIR), log=lambda _: None).path


def unique_version(artifact: Path | str, prefix: str = "adder-v1") -> ModelVersion:
    """A version of the model served under a name no other test (or engineer) uses, so its processes can be
    found by command line."""
    tag = uuid.uuid4().hex[:8]
    return model_version_register(name=f"agent-{tag}", version="v1", artifact=str(artifact),
                                  served_model_name=f"{prefix}-{tag}")


def generation() -> int:
    row = RouteGeneration.objects.filter(pk=1).first()
    return row.generation if row else 0


def api_server_pids(served_name: str) -> list[int]:
    """Every vLLM API server on this machine serving `served_name`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if SERVER_MODULE in args and served_name in args:
            found.append(int(entry.name))
    return sorted(found)


def process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes in the group: an engine's API server, EngineCore and workers."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(worker: EngineWorker, until: Callable[[EngineWorker], bool], what: str, *, timeout_s: float = ENGINE_WAIT_S,
             logs: tuple[Path, ...] = ()) -> EngineWorker:
    """Poll the worker row until `until` holds; fail with its state, reason and the agents' logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = EngineWorker.objects.get(pk=worker.pk)
        if until(current):
            return current
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
            raise AssertionError(f"engine {worker.pk} never {what}: {current.state} ({current.state_reason})\n"
                                 f"engine log:\n{current.log_tail[-2000:]}\n{tails}")
        time.sleep(0.5)


def wait_gone(pids: Callable[[], list[int]], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pids():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still running: {pids()}")
        time.sleep(0.2)


@contextmanager
def agent_process(host: str, name: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`manage.py engine_agent` for `host` on the test database, fast restarts and health checks."""
    log = LOG_DIR / f"agent-{host}-{name}.log"
    settings_env = {
        "ENGINE_LOG_DIR": str(LOG_DIR / "engines"),
        "ENGINE_RESTART_BACKOFF_S": "0.5",
        "ENGINE_HEALTH_INTERVAL_S": "1",
        "ENGINE_STOP_GRACE_S": "10",
        "ENGINE_DRAIN_TIMEOUT_S": "20",
        **env,
    }
    args = [sys.executable, str(REPO_ROOT / "manage.py"), "engine_agent", "--host-name", host, "--interval", "0.5"]
    with child_process(args, log_path=log, env=child_env(**settings_env), ready=f"for host '{host}' started",
                       timeout_s=120) as proc:
        yield proc, log


