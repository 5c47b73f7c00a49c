"""The demo models and their engines, shared by every test of a session.

Engines are the slow part of the suite (tens of seconds each to start), so one pool serves the gateway,
rollout, eval and fault tests: an engine is started on first use and kept until the pool needs its
place. The pool holds at most `POOL_CAPACITY` engines, leaving a machine-wide slot for tests that start
engines themselves through the engine agent."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from django.conf import settings

from serving.engines.services import engine_claim, engine_ready, engine_start_begin
from serving.models import EngineWorker, ModelVersion
from serving.services import engine_worker_create, model_version_register
from tests.support.engines import RunningEngine, running_engine
from tests.support.processes import REPO_ROOT

POOL_CAPACITY = 2
TEST_AGENT = "tests"
LOG_DIR_NAME = "test-logs"

# In a child process: training is torch's business, and the test process stays small.
_BUILD = """
import json, sys
from pathlib import Path
from serving.demo_models import DEMO_RECIPES, build_demo_models
wanted = [r for r in DEMO_RECIPES if r.name in sys.argv[2:]]
built = build_demo_models(Path(sys.argv[1]), recipes=wanted, log=lambda line: print(line, file=sys.stderr))
print(json.dumps({m.served_name: {"path": str(m.path), "engine_args": list(m.engine_args)} for m in built}))
"""


@dataclass(frozen=True)
class DemoModel:
    label: str
    path: Path
    engine_args: tuple[str, ...]


def demo_models(labels: Iterable[str]) -> dict[str, DemoModel]:
    """The demo models, built or found in the cache under DEMO_MODELS_DIR."""
    wanted = sorted(set(labels))
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(settings.DEMO_MODELS_DIR), *wanted], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the demo models failed:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        label: DemoModel(label=label, path=Path(info["path"]), engine_args=tuple(info["engine_args"]))
        for label, info in found.items()
    }


def version_register(model: DemoModel, *, price_in: float = 0.1, price_out: float = 0.2) -> ModelVersion:
    """The demo model as a model version, named like `build_demo_models` names it (adder / v2-slow)."""
    name, version = model.label.split("-", 1)
    return model_version_register(
        name=name, version=version, artifact=str(model.path), served_model_name=model.label,
        engine_args=list(model.engine_args), price_input_per_million=Decimal(str(price_in)),
        price_output_per_million=Decimal(str(price_out)),
    )


def static_worker_ready(version: ModelVersion, base_url: str, *, agent: str = TEST_AGENT, flavor: str = "vllm",
                        api_key: str = "") -> EngineWorker:
    """A static worker marked READY the way the engine agent does it (claim, start, ready), without an agent."""
    worker = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, base_url=base_url,
                                  flavor=flavor, api_key=api_key)
    assert engine_claim(worker_id=worker.pk, agent=agent, ttl_s=3600) is not None
    assert engine_start_begin(worker_id=worker.pk, agent=agent, port=None, base_url=base_url) is not None
    ready = engine_ready(worker_id=worker.pk, agent=agent)
    assert ready is not None and ready.state == EngineWorker.State.READY
    return ready


class EnginePool:
    """Demo engines started on demand and kept; the least recently used one is stopped to make room.

    An engine a test killed is noticed and started again on the next `get`."""

    def __init__(self, *, capacity: int = POOL_CAPACITY) -> None:
        self.capacity = capacity
        self.log_dir = Path(settings.VAR_DIR) / LOG_DIR_NAME
        self._models: dict[str, DemoModel] = {}
        self._running: OrderedDict[str, tuple[AbstractContextManager[RunningEngine], RunningEngine]] = OrderedDict()

    def model(self, label: str) -> DemoModel:
        if label not in self._models:
            self._models.update(demo_models([label]))
        return self._models[label]

    def get(self, label: str) -> RunningEngine:
        entry = self._running.get(label)
        if entry is not None and entry[1].proc.poll() is None:
            self._running.move_to_end(label)
            return entry[1]
        if entry is not None:
            self.stop(label)
        while len(self._running) >= self.capacity:
            self.stop(next(iter(self._running)))
        model = self.model(label)
        context = running_engine(model_dir=model.path, served_name=label, log_dir=self.log_dir,
                                 engine_args=list(model.engine_args))
        engine = context.__enter__()
        self._running[label] = (context, engine)
        return engine

    def stop(self, label: str) -> None:
        entry = self._running.pop(label, None)
        if entry is not None:
            entry[0].__exit__(None, None, None)

    def close(self) -> None:
        for label in list(self._running):
            self.stop(label)
