"""The local agent on a GPU host: each engine on GPUs of its own (CUDA_VISIBLE_DEVICES by its parallel
sizes), refused when it can never fit, waiting while its GPUs are held; no --enforce-eager on the CUDA
build; the hub reachable for a hub id; a key of its own per start.

The agent runs for real in this process; only the engine's command is swapped for a small Python process
that prints the environment and arguments it was given (no CUDA here), so what is checked is exactly what
vLLM would have received."""

from __future__ import annotations

import json
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
HOST = "gpu-host"
REPORT = ("import json, os, sys, time; print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) "
          "for k in ('CUDA_VISIBLE_DEVICES', 'VLLM_API_KEY', 'HF_HUB_OFFLINE')}}), flush=True); time.sleep(120)")


@pytest.fixture
def agent(db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineAgent]:
    real = drivers.vllm_command

    def reporting_command(**kwargs: object) -> list[str]:
        return [sys.executable, "-c", REPORT, *real(**kwargs)[3:]]  # the real flags, after the module

    monkeypatch.setattr(drivers, "vllm_command", reporting_command)
    found = EngineAgent(AgentConfig(host_name=HOST, interval_s=0.0, health_interval_s=0.0, build="cuda",
                                    gpus=("0", "1", "2"), log_dir=tmp_path, stop_grace_s=5, drain_timeout_s=0))
    yield found
    found.shutdown()


def version(tag: str, *args: str, artifact: str = "acme/model-7b") -> ModelVersion:
    return model_version_register(name="m", version=tag, artifact=artifact, served_model_name=f"m-{tag}",
                                  engine_args=list(args))


def launched(worker: EngineWorker, tmp_path: Path) -> dict[str, object]:
    log = tmp_path / f"engine-{worker.pk}.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if line.startswith("{")] if log.exists() else []
        if lines:
            return dict(json.loads(lines[-1]))
        time.sleep(0.1)
    raise AssertionError(f"engine {worker.pk} printed nothing")


def row(worker: EngineWorker) -> EngineWorker:
    return EngineWorker.objects.get(pk=worker.pk)


def test_engines_get_gpus_of_their_own_and_wait_or_are_refused_when_they_do_not_fit(
        agent: EngineAgent, tmp_path: Path) -> None:
    tp2 = engine_worker_create(model_version=version("tp2", "--tensor-parallel-size", "2"), host_name=HOST)
    one = engine_worker_create(model_version=version("one", artifact="/models/m-one"), host_name=HOST)
    waits = engine_worker_create(model_version=version("waits", "-tp", "2"), host_name=HOST)
    never = engine_worker_create(model_version=version("never", "--tensor-parallel-size", "4"), host_name=HOST)
    agent.reconcile()

    assert (row(tp2).state, row(tp2).gpu_ids, row(one).gpu_ids) == (State.STARTING, "0,1", "2")
    first, second = launched(tp2, tmp_path), launched(one, tmp_path)
    assert first["env"] == {"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_API_KEY": row(tp2).api_key, "HF_HUB_OFFLINE": None}
    assert second["env"] == {"CUDA_VISIBLE_DEVICES": "2", "VLLM_API_KEY": row(one).api_key, "HF_HUB_OFFLINE": "1"}
    assert row(tp2).api_key != row(one).api_key and len(row(tp2).api_key) >= 32
    for report in (first, second):
        argv = report["argv"]
        assert isinstance(argv, list) and "--enforce-eager" not in argv and row(tp2).api_key not in argv

    assert (row(waits).state, row(waits).state_reason) == (
        State.PENDING, f"waiting for 2 free GPUs (0 free; GPU 0: engine {tp2.pk}, GPU 1: engine {tp2.pk}, "
                       f"GPU 2: engine {one.pk})")
    assert row(never).state == State.FAILED
    assert row(never).state_reason == "cannot start: needs 4 GPUs, this host has 3 (0,1,2)"

    # The 2-GPU engine stops: its GPUs go to the one that waited.
    engine_worker_set_desired(worker=tp2, desired=EngineWorker.Desired.STOPPED)
    deadline = time.monotonic() + 60
    while row(waits).state != State.STARTING:
        assert time.monotonic() < deadline, (row(tp2).state, row(tp2).state_reason, row(waits).state_reason)
        agent.reconcile()
        agent.wait_for_jobs()
        time.sleep(0.1)
    assert row(tp2).state == State.STOPPED
    assert row(waits).gpu_ids == "0,1"
    assert launched(waits, tmp_path)["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # type: ignore[index]
