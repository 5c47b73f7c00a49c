"""Fixtures for the gateway tests: the gateway as a real uvicorn process on the test database, routes
registered through serving's services, and two real vLLM engines (started once per test session)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from serving.models import EngineWorker, ModelVersion, RequestRecord
from serving.services import (
    RouteSplit,
    gateway_key_create,
    model_version_register,
    route_set,
)
from tests.support.demo import DemoModel, EnginePool, static_worker_ready
from tests.support.demo import version_register as demo_version_register
from tests.support.engines import RunningEngine, free_port
from tests.support.fake_engine import FakeEngine
from tests.support.processes import SERVER_FLAGS, VENV_BIN, child_env, child_process

LOG_DIR = Path(settings.VAR_DIR) / "test-logs"
TEST_AGENT = "gateway-tests"


# --- routes, through serving's services -----------------------------------------------------------


def version_register(label: str, artifact: Path | str) -> ModelVersion:
    name, version = label.rsplit("-", 1)
    return model_version_register(name=name, version=version, artifact=str(artifact), served_model_name=label)


def split(baseline: ModelVersion, candidate: ModelVersion | None = None, *, weight: float = 0.0,
          shadow: float = 0.0, rollout_id: int | None = 1, failover: bool = False) -> RouteSplit:
    return RouteSplit(baseline=baseline, candidate=candidate, candidate_weight=weight, shadow_rate=shadow,
                      rollout_id=rollout_id, failover_to_candidate=failover)


# --- the gateway process --------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    key: str = ""
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, *, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        chosen = self.key if key is None else key
        headers = {"Authorization": f"Bearer {chosen}"} if chosen else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)
        self.clients.append(client)
        return client

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10, trust_env=False).text
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head == name and not labels:
                return float(value)
            if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
        return 0.0

    def wait_for_generation(self, generation: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.metric("platform_gateway_route_generation") < generation:
            assert time.monotonic() < deadline, f"gateway never loaded generation {generation}"
            time.sleep(0.05)


@pytest.fixture
def gateway_process(transactional_db: None) -> Iterator[Callable[..., GatewayProcess]]:
    """Start the standalone gateway (after the test has written its routes); stopped at the test's end."""
    with ExitStack() as stack:

        def start(**env: str) -> GatewayProcess:
            port = free_port()
            log = LOG_DIR / f"gateway-{port}.log"
            args = [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--host", "127.0.0.1",
                    "--port", str(port), *SERVER_FLAGS]
            proc = stack.enter_context(child_process(
                args, log_path=log, env=child_env(**env), ready="Uvicorn running on", timeout_s=90,
            ))
            process = GatewayProcess(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
            stack.callback(lambda: [c.close() for c in process.clients])
            return process

        yield start


def records_wait(count: int, timeout_s: float = 15.0, **filters: object) -> list[RequestRecord]:
    """The gateway writes records in the background: wait until `count` of them are there."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(RequestRecord.objects.filter(**filters).order_by("created_at", "attempt"))
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


# --- real engines ---------------------------------------------------------------------------------


class AdderEngines:
    """adder-v1 and adder-v2 from the session's engine pool; one that a test killed is started again."""

    LABELS = ("adder-v1", "adder-v2")

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    def model(self, label: str) -> DemoModel:
        return self.pool.model(label)

    def __getitem__(self, label: str) -> RunningEngine:
        return self.pool.get(label)


@pytest.fixture
def engines(demo_engines: EnginePool) -> AdderEngines:
    adder = AdderEngines(demo_engines)
    for label in AdderEngines.LABELS:
        adder[label]
    return adder


@dataclass
class AdderRoutes:
    v1: ModelVersion
    v2: ModelVersion
    workers: dict[str, EngineWorker]
    key: str


@pytest.fixture
def adder_routes(engines: AdderEngines, transactional_db: None) -> AdderRoutes:
    """Alias `adder`: baseline adder-v1, candidate adder-v2 at weight 0, both engines READY; a gateway key."""
    v1 = demo_version_register(engines.model("adder-v1"))
    v2 = demo_version_register(engines.model("adder-v2"))
    workers = {
        "adder-v1": static_worker_ready(v1, engines["adder-v1"].base_url),
        "adder-v2": static_worker_ready(v2, engines["adder-v2"].base_url),
    }
    route_set(alias_name="adder", split=split(v1, v2, weight=0.0))
    key = gateway_key_create(name="tests").raw
    return AdderRoutes(v1=v1, v2=v2, workers=workers, key=key)


def route_generation() -> int:
    from serving.models import RouteGeneration

    row = RouteGeneration.objects.filter(pk=1).first()
    return row.generation if row else 0


REQUEST_ID = re.compile(r"^[0-9a-f]{24}$")


@pytest.fixture
def standin_engine() -> Iterator[Callable[..., FakeEngine]]:
    """Start loopback stand-ins for engines (tests/support/fake_engine.py) in a given mode; stopped at the end."""
    started: list[FakeEngine] = []

    def start(mode: str = "ok") -> FakeEngine:
        fake = FakeEngine(mode).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()
