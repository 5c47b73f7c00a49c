"""Real vLLM engines for tests, at most three on this machine at once (about 3 GB of RAM each).

Every process that starts an engine — tests, helpers, benchmarks — takes one of three slot locks
(`flock` on files under /tmp), so parallel test runs wait instead of exhausting memory. The command
line, the environment and the readiness probe are the engine agent's own (`serving.engines`), so a test
engine is started and judged exactly as the platform does it."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.engines import command as engine_command
from serving.engines.drivers import free_port, spawn_engine
from serving.engines.probe import engine_client, probe_readiness

SLOT_DIR = Path(os.environ.get("ENGINE_SLOT_DIR", "/tmp/ramp-engine-slots"))
SLOTS = int(os.environ.get("ENGINE_SLOTS", "3"))
START_TIMEOUT_S = float(os.environ.get("ENGINE_START_TIMEOUT_S", "420"))

__all__ = ["RunningEngine", "engine_env", "engine_slot", "free_port", "running_engine", "vllm_command", "wait_ready"]


@contextmanager
def engine_slot(timeout_s: float = 1800.0) -> Iterator[int]:
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for index in range(SLOTS):
            handle = open(SLOT_DIR / f"slot-{index}", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() > deadline:
            raise TimeoutError("no free engine slot")
        time.sleep(1.0)


def vllm_command(*, model_dir: str, served_name: str, port: int, extra: list[str] | None = None) -> list[str]:
    return engine_command.vllm_command(model=model_dir, served_model_name=served_name, port=port,
                                       engine_args=extra or [])


def engine_env() -> dict[str, str]:
    return engine_command.engine_env()


def wait_ready(base_url: str, served_name: str, *, proc: subprocess.Popen[bytes] | None, log: Path,
               timeout_s: float = START_TIMEOUT_S) -> None:
    """DESIGN.md's readiness (the agent's probe): /health 200, /v1/models lists the name, and a 1-token
    completion succeeds."""
    deadline = time.monotonic() + timeout_s
    detail = "never probed"
    with engine_client(base_url, timeout_s=30) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"engine exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            result = probe_readiness(client, served_model_name=served_name)
            if result.ok:
                return
            detail = result.detail
            time.sleep(0.5)
    raise TimeoutError(
        f"engine {served_name} not ready after {timeout_s}s ({detail}):\n{log.read_text(errors='replace')[-4000:]}")


@dataclass
class RunningEngine:
    served_name: str
    base_url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)


def _spawn(command: list[str], log: Path, cpus: Collection[int] | None = None,
           env_overrides: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.unlink(missing_ok=True)
    # PDEATHSIG is tied to the forking thread: only from the main thread does it mean "dies with pytest".
    return spawn_engine(command, log_path=log, die_with_parent=threading.current_thread() is threading.main_thread(),
                        cpus=cpus, env_overrides=env_overrides)


@contextmanager
def running_engine(*, model_dir: Path | str, served_name: str, log_dir: Path,
                   engine_args: list[str] | None = None, cpus: Collection[int] | None = None,
                   env_overrides: Mapping[str, str] | None = None) -> Iterator[RunningEngine]:
    """One vLLM engine on a free port, ready, killed (its whole process group) on exit; on `cpus` when given,
    with `env_overrides` in its environment."""
    with engine_slot():
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"engine-{served_name}-{port}.log"
        proc = _spawn(vllm_command(model_dir=str(model_dir), served_name=served_name, port=port, extra=engine_args), log, cpus,
                      env_overrides)
        engine = RunningEngine(served_name=served_name, base_url=f"http://127.0.0.1:{port}", port=port, proc=proc, log=log)
        try:
            wait_ready(engine.base_url, served_name, proc=proc, log=log)
            yield engine
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the engine's group (vLLM takes its EngineCore down with it), SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        # An API server that died first leaves its EngineCore and workers in the group.
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=20)
