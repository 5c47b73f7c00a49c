"""The engine agent as a real process with real vLLM engines on the demo model adder-v1.

Each test holds one engine slot (tests/support/engines.py) for the engine the agent starts; at most one
engine of a worker runs at a time, which is one of the things checked."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from serving.models import EngineWorker
from serving.services import engine_worker_create, engine_worker_set_desired
from tests.serving.engines.conftest import (
    agent_process,
    api_server_pids,
    generation,
    parent_of,
    process_group,
    unique_version,
    wait_for,
    wait_gone,
)
from tests.support.engines import engine_slot

State = EngineWorker.State

pytestmark = [pytest.mark.engines, pytest.mark.django_db(transaction=True)]


def completes(worker: EngineWorker, served_name: str) -> str:
    """A completion straight from the engine, with the key the agent gave it (without it: 401)."""
    body = {"model": served_name, "prompt": "12+30=", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{worker.base_url}/v1/completions", timeout=60, json=body).status_code == 401
    response = httpx.post(f"{worker.base_url}/v1/completions", timeout=60, json=body,
                          headers={"Authorization": f"Bearer {worker.api_key}"})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


@pytest.mark.timeout(2400)
def test_two_agents_start_one_engine_that_is_restarted_after_a_crash_and_drained_on_stop(adder_v1_dir: Path) -> None:
    host = "agents-race"
    with engine_slot():
        version = unique_version(adder_v1_dir)
        served = version.served_model_name
        worker = engine_worker_create(model_version=version, host_name=host)
        before = generation()
        with agent_process(host, "a") as (agent_a, log_a), agent_process(host, "b") as (agent_b, log_b):
            logs = (log_a, log_b)
            ready = wait_for(worker, lambda w: w.state == State.READY, "became ready", logs=logs)
            # Routable, and gateways were told.
            assert generation() > before
            assert ready.ready_at is not None and ready.base_url.startswith("http://127.0.0.1:")
            # One engine, started by the agent that holds the one claim.
            assert api_server_pids(served) == [ready.pid]
            owner = parent_of(ready.pid)
            assert owner in (agent_a.pid, agent_b.pid)
            assert f"/{owner}/" in ready.claimed_by
            completes(ready, served)
            # The agent scrapes the engine's metrics.
            scraped = wait_for(worker, lambda w: w.metrics_at is not None, "was scraped", timeout_s=60, logs=logs)
            assert scraped.metrics["vllm:num_requests_running"] == 0.0
            assert scraped.metrics["vllm:request_success_total"] >= 1

            # A static worker pointing at that engine (with its key) becomes ready the same way, and drains
            # without a process.
            static = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, host_name=host,
                                          base_url=ready.base_url, api_key=ready.api_key)
            wait_for(static, lambda w: w.state == State.READY, "became ready", timeout_s=120, logs=logs)
            engine_worker_set_desired(worker=static, desired=EngineWorker.Desired.STOPPED)
            stopped_static = wait_for(static, lambda w: w.state == State.STOPPED, "stopped", timeout_s=60, logs=logs)
            assert stopped_static.state_reason == "drained"
            assert api_server_pids(served) == [ready.pid]  # the engine it pointed at still runs

            # A crash: the agent cleans up what the engine left and starts it again.
            crashed_pid = ready.pid
            os.kill(crashed_pid, signal.SIGKILL)
            back = wait_for(worker, lambda w: w.state == State.READY and w.pid != crashed_pid, "came back", logs=logs)
            assert back.restarts == 1
            assert process_group(crashed_pid) == []
            assert api_server_pids(served) == [back.pid]
            assert completes(back, served)

            # Stop: out of routing first, then the process goes.
            routed = generation()
            engine_worker_set_desired(worker=back, desired=EngineWorker.Desired.STOPPED)
            assert generation() == routed + 1
            stopped = wait_for(worker, lambda w: w.state == State.STOPPED, "stopped", timeout_s=120, logs=logs)
            assert stopped.pid is None and stopped.claimed_by == ""
            wait_gone(lambda: process_group(back.pid), "the stopped engine's processes")
            assert api_server_pids(served) == []
            assert agent_a.poll() is None and agent_b.poll() is None


@pytest.mark.timeout(2400)
def test_engines_die_with_their_agent_and_the_next_agent_takes_over(adder_v1_dir: Path) -> None:
    host = "agents-takeover"
    with engine_slot():
        version = unique_version(adder_v1_dir)
        served = version.served_model_name
        worker = engine_worker_create(model_version=version, host_name=host)
        with agent_process(host, "first") as (first, log_first):
            ready = wait_for(worker, lambda w: w.state == State.READY, "became ready", logs=(log_first,))
            # However the agent dies (here SIGKILL, as a supervisor does after its grace period) its engine goes.
            first.kill()
            first.wait(timeout=10)
            wait_gone(lambda: process_group(ready.pid), "the dead agent's engine")

        with agent_process(host, "second") as (second, log_second):
            # The claim's holder is gone from this machine: taken over at once, not after the claim expires.
            again = wait_for(worker, lambda w: w.state == State.READY and w.pid != ready.pid, "restarted",
                             logs=(log_second,))
            assert f"/{second.pid}/" in again.claimed_by
            assert api_server_pids(served) == [again.pid]
            routed = generation()

            # SIGTERM (Ctrl-C under honcho): the agent stops its engine and exits cleanly within 5 s.
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=8) == 0
        assert process_group(again.pid) == []
        assert api_server_pids(served) == []
        handed_back = EngineWorker.objects.get(pk=worker.pk)
        assert (handed_back.state, handed_back.claimed_by, handed_back.pid) == (State.PENDING, "", None)
        assert generation() > routed
        assert "engine agent stopped" in handed_back.state_reason


@pytest.mark.timeout(1200)
def test_an_engine_that_cannot_start_is_retried_then_fails_saying_why(tmp_path: Path) -> None:
    host = "agents-crashloop"
    with engine_slot():
        version = unique_version(tmp_path / "no-such-model")
        worker = engine_worker_create(model_version=version, host_name=host)
        with agent_process(host, "loop", ENGINE_MAX_CONSECUTIVE_FAILURES="2") as (_, log):
            failed = wait_for(worker, lambda w: w.state == State.FAILED, "failed", timeout_s=600, logs=(log,))
        assert failed.consecutive_failures == 2 and failed.restarts == 1
        assert failed.state_reason.startswith("gave up after 2 failures in a row; last: exited with exit code")
        assert "no-such-model" in failed.log_tail
        assert api_server_pids(version.served_model_name) == []


