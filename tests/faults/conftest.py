"""The fault suite's parts: the platform's processes as children of the test (gateway, Celery worker and
beat, the engine agent), client traffic that remembers every request it sent, the demo engines of the
session's pool registered as the engine agent would have them, and the machine's own services (Redis,
PostgreSQL) stopped and started exactly as the machine starts them.

Every process a test starts is stopped when the test ends, whatever happens; a service a test stops is
started again in the test's `finally`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from django.conf import settings
from django.db import connection

from serving.models import EngineWorker, ModelVersion, RequestRecord
from serving.services import engine_worker_create, gateway_key_create
from tests.support.demo import EnginePool, static_worker_ready, version_register
from tests.support.engines import free_port
from tests.support.processes import (
    VENV_BIN,
    celery_queues,
    child_env,
    child_process,
    server_flags,
    wait_until,
)

LOG_DIR = Path(settings.VAR_DIR) / "test-logs" / "faults"

# Short intervals, so that every reaction a test waits for comes within seconds.
FAST = {
    "ROLLOUT_ANALYSIS_INTERVAL_S": "2",
    "ENGINE_HEALTH_INTERVAL_S": "1",
    "ENGINE_UNHEALTHY_AFTER": "2",
    "ENGINE_RESTART_BACKOFF_S": "1",
    "GATEWAY_RECORD_FLUSH_S": "0.2",
}

# How the machine starts its services (see .ci/run); a test that stops one starts it again the same way.
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
    "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


# --- processes ---------------------------------------------------------------------------------------


class Child:
    """One child process (its own process group) that a test may stop, kill and start again."""

    def __init__(self, name: str, args: Sequence[str], *, env: dict[str, str], ready: str | None,
                 timeout_s: float = 120.0, stop_grace_s: float = 10.0) -> None:
        self.name, self.args, self.env, self.ready, self.timeout_s = name, list(args), env, ready, timeout_s
        self.stop_grace_s = stop_grace_s
        self.log = LOG_DIR / f"{name}.log"
        self._stack: ExitStack | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Child:
        assert self._stack is None, f"{self.name} is running"
        self.starts += 1
        self.log = LOG_DIR / f"{self.name}-{self.starts}.log"
        stack = ExitStack()
        self.proc = stack.enter_context(child_process(
            self.args, log_path=self.log, env=self.env, ready=self.ready, timeout_s=self.timeout_s,
            stop_grace_s=self.stop_grace_s,
        ))  # fmt: skip
        self._stack = stack
        return self

    def stop(self) -> None:
        """SIGTERM to the group (a clean shutdown), SIGKILL if it does not go."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def kill(self) -> None:
        """SIGKILL to the whole group: nothing gets to clean up."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.stop()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Platform:
    """The platform's processes for one test, all on the test database and the configured broker."""

    def __init__(self, stack: ExitStack, tag: str) -> None:
        self.stack = stack
        self.tag = tag
        self.pause_dir = LOG_DIR / f"pauses-{tag}"
        shutil.rmtree(self.pause_dir, ignore_errors=True)
        self.pause_dir.mkdir(parents=True)

    def _child(self, name: str, args: Sequence[str], *, ready: str | None, env: dict[str, str],
               stop_grace_s: float = 10.0) -> Child:
        child = Child(f"{self.tag}-{name}", args, env=child_env(**{**FAST, **env}), ready=ready, stop_grace_s=stop_grace_s)
        self.stack.callback(child.stop)
        return child.start()

    def gateway(self, *, combined: bool = False, port: int | None = None, graceful_shutdown_s: int = 10,
                **env: str) -> Gateway:
        """The gateway on its own (`serving.gateway.asgi`), or the combined server (`config.asgi`: web, API,
        /readyz and the gateway in one process). `graceful_shutdown_s`: how long a stop waits for requests in
        flight (the test's own stop waits a little longer before it kills)."""
        port = port or free_port()
        app = "config.asgi:application" if combined else "serving.gateway.asgi:application"
        # A longer graceful stop than the default: the restart tests keep streams in flight across it.
        args = [str(VENV_BIN / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port),
                *server_flags(graceful_shutdown_s=graceful_shutdown_s)]
        # "Uvicorn running on" comes once the socket listens ("startup complete" a moment before it).
        child = self._child(f"gateway-{port}", args, ready="Uvicorn running on", env=env,
                            stop_grace_s=graceful_shutdown_s + 10)
        return Gateway(url=f"http://127.0.0.1:{port}", port=port, child=child)

    def worker(self, name: str, *, concurrency: int = 1, pause: Sequence[str] = (), queues: str | None = None,
               **env: str) -> Child:
        """A Celery worker consuming `queues` (a -Q argument; by default every queue)."""
        args = [
            str(VENV_BIN / "celery"), "-A", "tests.faults.paused_celery", "worker", "--loglevel", "INFO",
            "--concurrency", str(concurrency), "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{self.tag}-{name}-{os.getpid()}@%h", "-Q", queues or celery_queues(),
        ]  # fmt: skip
        extra = {"FAULTS_PAUSE_AT": ",".join(pause), "FAULTS_PAUSE_DIR": str(self.pause_dir), **env}
        return self._child(f"worker-{name}", args, ready="ready.", env=extra)

    def beat(self, **env: str) -> Child:
        schedule = LOG_DIR / f"{self.tag}-beat-schedule-{time.monotonic_ns()}"
        args = [str(VENV_BIN / "celery"), "-A", "config", "beat", "--loglevel", "INFO", "-s", str(schedule)]
        return self._child("beat", args, ready=None, env=env)

    def agent(self, host: str, **env: str) -> Child:
        args = [str(VENV_BIN / "python"), "manage.py", "engine_agent", "--host-name", host, "--interval", "0.5"]
        return self._child(f"agent-{host}", args, ready="started", env=env)

    # -- the pause points of tests/faults/paused_celery.py --

    def paused(self, point: str) -> list[Path]:
        return [p for p in self.pause_dir.glob(f"{point}.*") if not p.name.endswith(".go")]

    def release(self, point: str) -> None:
        (self.pause_dir / f"{point}.go").write_text("go")


@pytest.fixture
def platform(request: pytest.FixtureRequest) -> Iterator[Platform]:
    with ExitStack() as stack:
        yield Platform(stack, request.node.name[:40].replace("[", "-").replace("]", ""))


@dataclass
class Gateway:
    url: str
    port: int
    child: Child

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout, trust_env=False)

    def metric(self, name: str, **labels: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            head, _, value = line.rpartition(" ")
            if head == name or (head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items())):
                return float(value)
        return 0.0

    def wait_for_routes(self, timeout_s: float = 10.0) -> None:
        """Until the gateway has loaded the routes as they are in the database now (a rollout just created
        its alias: traffic sent before the next poll would be refused as an unknown model)."""
        from serving.gateway.table import route_version_read

        generation = route_version_read()[0]
        wait_until(lambda: self.metric("platform_gateway_route_generation") >= generation, timeout_s=timeout_s,
                   what=f"the gateway to load route generation {generation}")


# --- client traffic ------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One request as the client saw it."""

    alias: str
    started: float  # time.monotonic()
    ended: float
    stream: bool
    status: int = 0  # 0: no HTTP answer at all (connection refused or cut before the headers)
    arm: str = ""
    request_id: str = ""
    completed: bool = False  # a whole answer: a 200 JSON body, or a stream that reached [DONE]
    error_event: bool = False  # a stream that ended with an error event
    error: str = ""  # the error body or the client's exception


class Traffic:
    """Clients that send chat completions to an alias in a closed loop, each as a new user, until stopped
    (or `limit_s` passes), and keep what each request got."""

    def __init__(self, url: str, key: str, aliases: Sequence[str], *, clients: int = 2, stream: bool | None = None,
                 max_tokens: int = 8, pause_s: float = 0.05, limit_s: float = 300.0, timeout_s: float = 60.0) -> None:
        self.url, self.key, self.aliases = url, key, list(aliases)
        self.clients, self.stream, self.max_tokens, self.pause_s = clients, stream, max_tokens, pause_s
        self.limit_s, self.timeout_s = limit_s, timeout_s
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Traffic:
        deadline = time.monotonic() + self.limit_s
        for index in range(self.clients):
            thread = threading.Thread(target=self._loop, args=(index, deadline), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 10)

    def _loop(self, index: int, deadline: float) -> None:
        alias = self.aliases[index % len(self.aliases)]
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout_s, trust_env=False) as client:
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                n += 1
                stream = self.stream if self.stream is not None else n % 2 == 0
                sent = self._one(client, alias, f"c{index}-u{n}-{os.getpid()}", stream)
                with self._lock:
                    self.sent.append(sent)
                time.sleep(self.pause_s)

    def _one(self, client: httpx.Client, alias: str, user: str, stream: bool) -> Sent:
        a, b = (len(user) * 7) % 50 + 10, (len(user) * 13) % 40 + 10
        body: dict[str, object] = {
            "model": alias, "messages": [{"role": "user", "content": f"{a}+{b}"}], "max_tokens": self.max_tokens,
            "user": user, "stream": stream, "ignore_eos": True,
        }  # fmt: skip
        sent = Sent(alias=alias, started=time.monotonic(), ended=0.0, stream=stream)
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                sent.status = response.status_code
                sent.arm = response.headers.get("x-rollout-arm", "")
                sent.request_id = response.headers.get("x-request-id", "")
                text = response.read().decode("utf-8", "replace")
            if sent.status != 200:
                sent.error = text[:500]
            elif stream:
                events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
                sent.error_event = any(e.startswith('{"error"') for e in events)
                sent.completed = bool(events) and events[-1] == "[DONE]" and not sent.error_event
                if sent.error_event:
                    sent.error = next(e for e in events if e.startswith('{"error"'))[:500]
            else:
                sent.completed = bool(json.loads(text).get("choices"))
        except httpx.HTTPError as exc:
            sent.error = f"{type(exc).__name__}: {exc}"
        sent.ended = time.monotonic()
        return sent

    def snapshot(self) -> list[Sent]:
        with self._lock:
            return list(self.sent)

    def wait_for(self, condition: Callable[[list[Sent]], bool], *, timeout_s: float, what: str) -> None:
        wait_until(lambda: condition(self.snapshot()), timeout_s=timeout_s, what=what, every_s=0.05)


def answered(sent: Sequence[Sent]) -> set[str]:
    """Request ids of every request the gateway answered (it names each in X-Request-Id)."""
    return {s.request_id for s in sent if s.request_id}


def records_for(request_ids: set[str], *, timeout_s: float = 30.0) -> set[str]:
    """Which of these requests have their final record (the answer's), waiting for the gateways' flushers."""
    found: set[str] = set()

    def all_there() -> bool:
        missing = list(request_ids - found)
        for start in range(0, len(missing), 500):
            found.update(RequestRecord.objects.filter(request_id__in=missing[start:start + 500], final=True)
                         .values_list("request_id", flat=True))
        return found >= request_ids

    try:
        wait_until(all_there, timeout_s=timeout_s, what="the request records", every_s=0.3)
    except AssertionError:
        pass
    return found


# --- engines -------------------------------------------------------------------------------------------


@dataclass
class Adder:
    v1: ModelVersion
    v2: ModelVersion
    key: str


def adder_static(pool: EnginePool, *, agent: str = "faults") -> Adder:
    """adder-v1 and adder-v2 from the pool, each a static worker marked READY (claimed, no agent probing)."""
    v1 = version_register(pool.model("adder-v1"))
    v2 = version_register(pool.model("adder-v2"))
    static_worker_ready(v1, pool.get("adder-v1").base_url, agent=agent)
    static_worker_ready(v2, pool.get("adder-v2").base_url, agent=agent)
    return Adder(v1=v1, v2=v2, key=gateway_key_create(name="faults").raw)


def adder_agent_workers(pool: EnginePool, host: str) -> Adder:
    """adder-v1 and adder-v2 from the pool as static workers of `host`, for an engine agent of that host to
    claim, probe and health-check (it marks them ready, and unhealthy when they stop answering)."""
    v1 = version_register(pool.model("adder-v1"))
    v2 = version_register(pool.model("adder-v2"))
    for version in (v1, v2):
        engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, host_name=host,
                             base_url=pool.get(version.served_model_name).base_url)
    return Adder(v1=v1, v2=v2, key=gateway_key_create(name="faults").raw)


def workers_ready(host: str) -> bool:
    workers = EngineWorker.objects.filter(host_name=host)
    return workers.exists() and all(w.state == EngineWorker.State.READY for w in workers)


# --- the machine's services ----------------------------------------------------------------------------


def broker_is_local_redis() -> bool:
    parts = urlsplit(settings.CELERY_BROKER_URL)
    return parts.scheme == "redis" and parts.hostname in ("127.0.0.1", "localhost") and (parts.port or 6379) == 6379


def redis_up() -> bool:
    done = subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip() == "PONG"


def redis_stop() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=30)
    wait_until(lambda: not redis_up(), timeout_s=30, what="Redis to stop")


def redis_start() -> None:
    if redis_up():
        return
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    subprocess.run(REDIS_START, check=True, timeout=30)
    wait_until(redis_up, timeout_s=30, what="Redis to start")


def database_is_local_postgres() -> bool:
    db = connection.settings_dict
    return connection.vendor == "postgresql" and (db.get("HOST") or "127.0.0.1") in ("127.0.0.1", "localhost", "")


def postgres_cluster() -> str:
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        raise RuntimeError("no PostgreSQL cluster under /etc/postgresql")
    return versions[0]


def postgres_ctl(action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", postgres_cluster(), "main", action],
                   check=True, capture_output=True, timeout=120)


def postgres_up() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], timeout=10).returncode == 0
