"""Real vLLM engines for tests, at most three on this machine at once (about 3 GB of RAM each).

Every process that starts an engine — tests, helpers, benchmarks — takes one of three slot locks
(`flock` on files under /tmp), so parallel test runs wait instead of exhausting memory."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

SLOT_DIR = Path(os.environ.get("ENGINE_SLOT_DIR", "/tmp/ramp-engine-slots"))
SLOTS = int(os.environ.get("ENGINE_SLOTS", "3"))
START_TIMEOUT_S = float(os.environ.get("ENGINE_START_TIMEOUT_S", "240"))


@contextmanager
def engine_slot(timeout_s: float = 1800.0) -> Iterator[int]:
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for index in range(SLOTS):
            handle = open(SLOT_DIR / f"slot-{index}", "w")  # noqa: SIM115 (held for the with-block)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_command(*, model_dir: str, served_name: str, port: int, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
        *(extra or []),
    ]


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def wait_ready(base_url: str, served_name: str, *, proc: subprocess.Popen[bytes] | None, log: Path,
               timeout_s: float = START_TIMEOUT_S) -> None:
    """DESIGN.md's readiness: /health 200, /v1/models lists the name, and a 1-token completion succeeds."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"engine exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if client.get("/health").status_code == 200:
                    names = [m["id"] for m in client.get("/v1/models").json()["data"]]
                    if served_name in names:
                        probe = client.post("/v1/completions", json={"model": served_name, "prompt": "1+1=", "max_tokens": 1})
                        if probe.status_code == 200:
                            return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"engine {served_name} not ready after {timeout_s}s:\n{log.read_text(errors='replace')[-4000:]}")


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


@contextmanager
def running_engine(*, model_dir: Path | str, served_name: str, log_dir: Path) -> Iterator[RunningEngine]:
    """One vLLM engine on a free port, ready, killed (its whole process group) on exit."""
    with engine_slot():
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"engine-{served_name}-{port}.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                vllm_command(model_dir=str(model_dir), served_name=served_name, port=port),
                stdout=handle, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True,
            )
        engine = RunningEngine(served_name=served_name, base_url=f"http://127.0.0.1:{port}", port=port, proc=proc, log=log)
        try:
            wait_ready(engine.base_url, served_name, proc=proc, log=log)
            yield engine
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=20)
