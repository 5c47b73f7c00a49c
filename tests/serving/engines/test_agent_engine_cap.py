"""ENGINE_MAX_LOCAL_ENGINES: an agent runs at most that many local engine processes at once; a worker past
it waits, pending, saying why, and the oldest waiting one starts when a running engine has stopped (how
`make run` keeps its demo to three engines of about 3 GB each).

The agent runs for real in this process; only the engine's command is swapped for a small Python process
that sleeps (no vLLM needed to count processes)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.engines import drivers
from serving.engines.agent import AgentConfig, EngineAgent
from serving.models import EngineWorker, ModelVersion
from serving.services import engine_worker_create, engine_worker_set_desired, model_version_register

State = EngineWorker.State
HOST = "small-host"


@pytest.fixture
def agent(db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineAgent]:
    monkeypatch.setattr(drivers, "vllm_command", lambda **kwargs: [sys.executable, "-c", "import time; time.sleep(120)"])
    found = EngineAgent(AgentConfig(host_name=HOST, interval_s=0.0, health_interval_s=0.0, build="cpu",
                                    log_dir=tmp_path, stop_grace_s=5, drain_timeout_s=0, max_local_engines=2))
    yield found
    found.shutdown()


def version(tag: str) -> ModelVersion:
    return model_version_register(name="m", version=tag, artifact=f"/models/m-{tag}", served_model_name=f"m-{tag}")


def row(worker: EngineWorker) -> EngineWorker:
    return EngineWorker.objects.get(pk=worker.pk)


def test_past_the_cap_a_worker_waits_and_the_oldest_waiting_starts_when_an_engine_stops(agent: EngineAgent) -> None:
    first, second, third, fourth = (engine_worker_create(model_version=version(t), host_name=HOST)
                                    for t in ("a", "b", "c", "d"))
    agent.reconcile()
    assert [row(w).state for w in (first, second, third, fourth)] == [State.STARTING, State.STARTING,
                                                                       State.PENDING, State.PENDING]
    assert row(third).state_reason == "waiting for a free slot: 2 local engines run on this host (ENGINE_MAX_LOCAL_ENGINES=2)"
    assert len(agent.engines) == 2

    engine_worker_set_desired(worker=first, desired=EngineWorker.Desired.STOPPED)
    deadline = time.monotonic() + 60
    while row(third).state != State.STARTING:
        assert time.monotonic() < deadline, (row(first).state, row(first).state_reason, row(third).state_reason)
        agent.reconcile()
        agent.wait_for_jobs()
        time.sleep(0.1)
    assert row(first).state == State.STOPPED
    assert row(fourth).state == State.PENDING and len(agent.engines) == 2
