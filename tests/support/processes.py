"""Real child processes for tests: a Celery worker on the configured broker and the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def test_database_url() -> str:
    """A DATABASE_URL for a child process that must see the test database pytest-django created."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"] or "")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"])
    host = db["HOST"] or "127.0.0.1"
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgres://{auth}@{host}{port}/{db['NAME']}"


# How the Procfile and docker-compose.yml run uvicorn, besides the app and the address: tests that start a
# server start it the same way (the head-bounded protocol included).
def server_flags(*, graceful_shutdown_s: int = 5) -> list[str]:
    return ["--http", "config.http_server:HeadBoundedProtocol", "--no-access-log",
            "--timeout-graceful-shutdown", str(graceful_shutdown_s)]


SERVER_FLAGS = server_flags()


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = test_database_url()
    env["SECRET_KEY"] = settings.SECRET_KEY
    env["PLATFORM_VAR_DIR"] = str(settings.VAR_DIR)
    env["CELERY_BROKER_URL"] = settings.CELERY_BROKER_URL
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextmanager
def child_process(
    args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None, ready: str | None = None,
    timeout_s: float = 60.0, stop_grace_s: float = 10.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process in its own session; wait for `ready` in its log; on exit SIGTERM its whole group,
    and SIGKILL it if it has not gone within `stop_grace_s`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(args), cwd=REPO_ROOT, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if ready is not None:
            deadline = time.monotonic() + timeout_s
            while ready not in log_path.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{args[0]} not ready after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
        yield proc
    finally:
        stop_process_group(proc, grace_s=stop_grace_s)


def stop_process_group(proc: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def celery_queues(*names: str) -> str:
    """The -Q argument for these queues (config/queues.py) as this test process names them; none: all."""
    from config import queues

    suffix = getattr(settings, "CELERY_QUEUE_SUFFIX", "")
    return ",".join(queue + suffix for queue in names) if names else ",".join(queues.all_queues(suffix))


@contextmanager
def celery_worker(
    *, name: str = "test", concurrency: int = 1, queues: str | None = None, pool: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker consuming `queues` (a -Q argument; by default every queue of this test process)."""
    args = [
        str(VENV_BIN / "celery"), "-A", "config", "worker", "--loglevel", "INFO", "--concurrency", str(concurrency),
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{name}-{os.getpid()}@%h",
        "-Q", queues or celery_queues(),
    ]
    if pool:
        args += ["--pool", pool]
    log_path = Path(settings.VAR_DIR) / "test-logs" / f"celery-{name}.log"
    with child_process(args, log_path=log_path, ready="ready.") as proc:
        yield proc


def wait_until(condition: Callable[[], object], *, timeout_s: float, what: str, every_s: float = 0.2) -> None:
    """Poll until `condition()` is truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)
