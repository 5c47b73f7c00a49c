"""`manage.py engine_agent` as a process, without engines: signals, --once, bad arguments."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from serving.models import EngineWorker, ModelVersion
from serving.services import engine_worker_create
from tests.serving.engines.conftest import agent_process
from tests.support.fake_engine import FakeEngine
from tests.support.processes import REPO_ROOT, child_env

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_idle_agent_exits_cleanly_on_a_signal(sig: signal.Signals) -> None:
    with agent_process("agents-idle", sig.name) as (agent, log):
        agent.send_signal(sig)
        assert agent.wait(timeout=15) == 0
    assert f"{sig.name} received" in log.read_text()


def test_once_probes_a_static_endpoint_and_exits() -> None:
    version = ModelVersion.objects.create(name="adder", version="v1", artifact="/nowhere", served_model_name="adder-v1")
    engine = FakeEngine(served_name="adder-v1").start()
    try:
        worker = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC,
                                      host_name="agents-once", base_url=engine.base_url)
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "manage.py"), "engine_agent", "--host-name", "agents-once", "--once"],
            env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    finally:
        engine.stop()
    assert done.returncode == 0, done.stderr
    worker.refresh_from_db()
    assert worker.state == EngineWorker.State.READY
    # It let go of the worker on the way out, so the host's long-running agent picks it up at once.
    assert worker.claimed_by == ""
    assert engine.seen.completions == 1


def test_a_non_positive_interval_is_refused() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "manage.py"), "engine_agent", "--interval", "0"],
                          env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--interval: must be a positive number of seconds" in done.stderr


def test_engine_cpus_the_host_does_not_offer_are_refused_at_start() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "manage.py"), "engine_agent", "--once"],
                          env=child_env(ENGINE_CPUS="4000-4001"), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "ENGINE_CPUS names CPUs this host does not offer: [4000, 4001]" in done.stderr
