"""The agent's reconcile loop, run in this process, on static workers: endpoints someone else runs.

The endpoints are real HTTP servers (a stub that answers like vLLM, or a port nobody listens on), so
readiness, health, the metrics scrape and the drain go over the wire exactly as for a real engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from serving.engines.agent import AgentConfig, EngineAgent
from serving.engines.drivers import free_port
from serving.models import EngineWorker, ModelVersion, RouteGeneration
from serving.services import engine_worker_create, engine_worker_set_desired
from tests.support.fake_engine import FakeEngine

State = EngineWorker.State
HOST = "static-tests"


@pytest.fixture
def version(db: None) -> ModelVersion:
    return ModelVersion.objects.create(name="adder", version="v1", artifact="/nowhere", served_model_name="adder-v1")


@pytest.fixture
def agent(db: None) -> Iterator[EngineAgent]:
    agent = EngineAgent(AgentConfig(host_name=HOST, interval_s=0.0, health_interval_s=0.0, unhealthy_after=2, drain_timeout_s=600,
                                    start_timeout_s=600))
    yield agent
    agent.shutdown()


@pytest.fixture
def stub() -> Iterator[FakeEngine]:
    engine = FakeEngine(served_name="adder-v1").start()
    yield engine
    engine.stop()


def passes(agent: EngineAgent, until: Callable[[EngineWorker], bool], worker: EngineWorker, limit: int = 20) -> EngineWorker:
    """Run reconcile passes (each waits for its probes) until `until` holds for the worker."""
    for _ in range(limit):
        agent.reconcile()
        agent.wait_for_jobs()
        agent.reconcile()
        current = EngineWorker.objects.get(pk=worker.pk)
        if until(current):
            return current
    raise AssertionError(f"worker stuck: {current.state} ({current.state_reason})")


def generation() -> int:
    row = RouteGeneration.objects.filter(pk=1).first()
    return row.generation if row else 0


def static(version: ModelVersion, base_url: str) -> EngineWorker:
    return engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, host_name=HOST,
                                base_url=base_url)


def test_a_static_endpoint_that_answers_becomes_ready_and_routable(
        agent: EngineAgent, version: ModelVersion, stub: FakeEngine) -> None:
    url, behaviour = stub.base_url, stub
    before = generation()
    worker = passes(agent, lambda w: w.state == State.READY, static(version, url))
    assert worker.ready_at is not None and worker.last_health_ok
    assert generation() == before + 1
    # Readiness really ran a completion, and the agent never touched a process.
    assert behaviour.seen.completions >= 1
    assert worker.pid is None and agent.engines == {}
    worker = passes(agent, lambda w: w.metrics_at is not None, worker)
    assert worker.metrics["vllm:num_requests_running"] == 0.0


def test_an_endpoint_nobody_listens_on_never_becomes_ready_and_says_why(
        agent: EngineAgent, version: ModelVersion) -> None:
    worker = static(version, f"http://127.0.0.1:{free_port()}")
    worker = passes(agent, lambda w: w.last_health_at is not None, worker)
    for _ in range(3):
        worker = passes(agent, lambda w: True, worker)
    assert worker.state == State.STARTING
    assert worker.state_reason.startswith("not ready yet: GET /health: cannot connect")
    assert worker.last_health_ok is False


def test_healthy_but_unable_to_complete_is_not_ready(
        agent: EngineAgent, version: ModelVersion, stub: FakeEngine) -> None:
    # On CPU an engine with an unsupported head size passes /health, lists its model, and dies on a request.
    url, behaviour = stub.base_url, stub
    behaviour.mode = "error"
    worker = passes(agent, lambda w: w.last_health_at is not None, static(version, url))
    assert worker.state == State.STARTING
    assert "1-token completion: 500" in worker.state_reason


def test_a_failing_health_check_takes_it_out_of_routing_and_recovery_brings_it_back(
        agent: EngineAgent, version: ModelVersion, stub: FakeEngine) -> None:
    url, behaviour = stub.base_url, stub
    worker = passes(agent, lambda w: w.state == State.READY, static(version, url))
    behaviour.health_status = 503
    before = generation()
    worker = passes(agent, lambda w: w.state == State.UNHEALTHY, worker)
    assert "GET /health: 503" in worker.state_reason
    assert generation() == before + 1
    behaviour.health_status = 200
    worker = passes(agent, lambda w: w.state == State.READY, worker)
    assert worker.state_reason == "healthy again"
    assert generation() == before + 2


def test_a_stopped_worker_drains_until_nothing_is_in_flight(
        agent: EngineAgent, version: ModelVersion, stub: FakeEngine) -> None:
    url, behaviour = stub.base_url, stub
    worker = passes(agent, lambda w: w.state == State.READY, static(version, url))
    behaviour.running, behaviour.waiting = 1, 2
    worker = engine_worker_set_desired(worker=worker, desired=EngineWorker.Desired.STOPPED)
    assert worker.state == State.DRAINING
    for _ in range(3):
        worker = passes(agent, lambda w: True, worker)
    assert worker.state == State.DRAINING
    behaviour.running, behaviour.waiting = 0, 0
    worker = passes(agent, lambda w: w.state == State.STOPPED, worker)
    assert worker.state_reason == "drained"
    assert worker.claimed_by == ""


def test_a_worker_of_another_host_is_left_alone(
        agent: EngineAgent, version: ModelVersion, stub: FakeEngine) -> None:
    url = stub.base_url
    other = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, host_name="elsewhere",
                                 base_url=url)
    for _ in range(3):
        agent.reconcile()
        agent.wait_for_jobs()
    other.refresh_from_db()
    assert (other.state, other.claimed_by) == (State.PENDING, "")


def test_a_base_url_given_with_its_v1_is_probed_at_the_right_paths(
        agent: EngineAgent, version: ModelVersion, stub: FakeEngine) -> None:
    url, behaviour = stub.base_url, stub
    worker = passes(agent, lambda w: w.state == State.READY, static(version, url + "/v1/"))
    assert worker.base_url == url
    assert behaviour.seen.paths and not any(path.startswith("/v1/v1") for path in behaviour.seen.paths)


def test_azure_openai_is_probed_with_its_key_header_and_no_completion_and_never_drained(
        agent: EngineAgent, version: ModelVersion) -> None:
    server = FakeEngine(served_name="some-base-model", api_key="az-key", key_header="api-key",
                        prefix="/openai").start()
    try:
        worker = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, host_name=HOST,
                                      base_url=server.base_url, api_key="az-key", flavor="azure-openai")
        assert worker.base_url == server.base_url + "/openai"
        worker = passes(agent, lambda w: w.state == State.READY, worker)
        assert server.seen.completions == 0  # a hosted API is not billed for a probe
        assert set(server.seen.paths) == {"/openai/v1/models"} and set(server.seen.keys) == {"az-key"}
        # The gateway sends the key the same way.
        from serving.selectors import engine_replicas_routable

        assert [row.headers for row in engine_replicas_routable()] == [("api-key: az-key",)]
        worker = engine_worker_set_desired(worker=worker, desired=EngineWorker.Desired.STOPPED)
        worker = passes(agent, lambda w: w.state == State.STOPPED, worker)
        assert worker.state_reason == "out of routing (azure-openai is a hosted API: never drained)"
    finally:
        server.stop()


def test_a_server_without_queue_metrics_is_drained_after_a_fixed_grace(db: None, version: ModelVersion) -> None:
    agent = EngineAgent(AgentConfig(host_name=HOST, interval_s=0.0, health_interval_s=0.0, drain_no_signal_s=0.5))
    server = FakeEngine(served_name="adder-v1").start()
    try:
        worker = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, host_name=HOST,
                                      base_url=server.base_url, flavor="ollama")
        worker = passes(agent, lambda w: w.state == State.READY, worker)
        assert "/api/version" in server.seen.paths and "/metrics" not in server.seen.paths
        worker = engine_worker_set_desired(worker=worker, desired=EngineWorker.Desired.STOPPED)
        agent.reconcile()
        agent.wait_for_jobs()
        agent.reconcile()
        assert EngineWorker.objects.get(pk=worker.pk).state == State.DRAINING  # the grace has not passed
        worker = passes(agent, lambda w: w.state == State.STOPPED, worker, limit=200)
        assert worker.state_reason == "drained (ollama exports no queue metrics: waited 0.5 s)"
    finally:
        agent.shutdown()
        server.stop()
