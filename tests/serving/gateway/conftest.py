"""Fixtures for the gateway tests: the gateway as a real uvicorn process on the test database, routes
registered through serving's services, and two real vLLM engines (started once per test session)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from serving.engines.services import engine_claim, engine_ready, engine_start_begin
from serving.models import EngineWorker, ModelVersion, RequestRecord
from serving.services import (
    RouteSplit,
    engine_worker_create,
    gateway_key_create,
    model_version_register,
    route_set,
)
from tests.support.engines import RunningEngine, free_port, running_engine
from tests.support.processes import REPO_ROOT, VENV_BIN, child_env, child_process

LOG_DIR = Path(settings.VAR_DIR) / "test-logs"
TEST_AGENT = "gateway-tests"


# --- routes, through serving's services -----------------------------------------------------------


def version_register(label: str, artifact: Path | str) -> ModelVersion:
    name, version = label.rsplit("-", 1)
    return model_version_register(name=name, version=version, artifact=str(artifact), served_model_name=label)


def static_worker_ready(version: ModelVersion, base_url: str) -> EngineWorker:
    """A static worker marked READY the way the engine agent does it (claim, start, ready), without an agent."""
    worker = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, base_url=base_url)
    assert engine_claim(worker_id=worker.id, agent=TEST_AGENT, ttl_s=3600) is not None
    assert engine_start_begin(worker_id=worker.id, agent=TEST_AGENT, port=None, base_url=base_url) is not None
    ready = engine_ready(worker_id=worker.id, agent=TEST_AGENT)
    assert ready is not None and ready.state == EngineWorker.State.READY
    return ready


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
                    "--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "5"]
            proc = stack.enter_context(child_process(
                args, log_path=log, env=child_env(**env), ready="Application startup complete", timeout_s=90,
            ))
            process = GatewayProcess(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
            stack.callback(lambda: [c.close() for c in process.clients])
            return process

        yield start


def records_wait(count: int, timeout_s: float = 15.0, **filters: object) -> list[RequestRecord]:
    """The gateway writes records in the background: wait until `count` of them are there."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(RequestRecord.objects.filter(**filters).order_by("created_at"))
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


# --- real engines ---------------------------------------------------------------------------------


_BUILD = """
import json, sys
from pathlib import Path
from serving.demo_models import DEMO_RECIPES, build_demo_models
wanted = [recipe for recipe in DEMO_RECIPES if recipe.name in ("adder-v1", "adder-v2")]
built = build_demo_models(Path(sys.argv[1]), recipes=wanted, log=lambda line: print(line, file=sys.stderr))
print(json.dumps({model.served_name: str(model.path) for model in built}))
"""


def demo_model_dirs() -> dict[str, Path]:
    """adder-v1 and adder-v2 from the demo-model builder (cached under DEMO_MODELS_DIR). In a child process:
    training is torch's business, and the test process stays small."""
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(settings.DEMO_MODELS_DIR)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the demo models failed:\n{done.stderr[-3000:]}")
    return {label: Path(path) for label, path in json.loads(done.stdout.strip().splitlines()[-1]).items()}


class EnginePair:
    """adder-v1 and adder-v2 through tests.support.engines (each holds an engine slot); one that a test
    killed is started again for the next test."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.engines: dict[str, RunningEngine] = {}
        self._contexts: dict[str, AbstractContextManager[RunningEngine]] = {}

    def start(self, *labels: str) -> None:
        def enter(label: str) -> RunningEngine:
            context = running_engine(model_dir=self.dirs[label], served_name=label, log_dir=LOG_DIR)
            engine = context.__enter__()
            self._contexts[label] = context
            return engine

        # Started side by side: two engines come up in about the time of one.
        with ThreadPoolExecutor(len(labels)) as pool:
            for label, engine in zip(labels, pool.map(enter, labels), strict=True):
                self.engines[label] = engine

    def ensure_alive(self) -> None:
        dead = [label for label, engine in self.engines.items() if engine.proc.poll() is not None]
        for label in dead:
            self._contexts.pop(label).__exit__(None, None, None)
        if dead:
            self.start(*dead)

    def close(self) -> None:
        for context in self._contexts.values():
            context.__exit__(None, None, None)
        self._contexts.clear()

    def __getitem__(self, label: str) -> RunningEngine:
        return self.engines[label]


@pytest.fixture(scope="session")
def engine_pair() -> Iterator[EnginePair]:
    pair = EnginePair(demo_model_dirs())
    try:
        pair.start("adder-v1", "adder-v2")
        yield pair
    finally:
        pair.close()


@pytest.fixture
def engines(engine_pair: EnginePair) -> EnginePair:
    engine_pair.ensure_alive()
    return engine_pair


@dataclass
class AdderRoutes:
    v1: ModelVersion
    v2: ModelVersion
    workers: dict[str, EngineWorker]
    key: str


@pytest.fixture
def adder_routes(engines: EnginePair, transactional_db: None) -> AdderRoutes:
    """Alias `adder`: baseline adder-v1, candidate adder-v2 at weight 0, both engines READY; a gateway key."""
    v1 = version_register("adder-v1", engines.dirs["adder-v1"])
    v2 = version_register("adder-v2", engines.dirs["adder-v2"])
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
