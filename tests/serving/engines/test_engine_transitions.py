"""The agent's state transitions on the worker row: claims, the start reservation, readiness and the
route generation, crash accounting. No engines: these are the rules the agent relies on."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import close_old_connections
from django.utils import timezone

from serving.engines import services as engine_services
from serving.models import EngineWorker, ModelVersion, RouteGeneration
from serving.selectors import engine_workers_failed_since
from serving.services import engine_worker_create, engine_worker_set_desired

State = EngineWorker.State
A, B = "host/vm/100/aaaa", "host/vm/200/bbbb"


def generation() -> int:
    row = RouteGeneration.objects.filter(pk=1).first()
    return row.generation if row else 0


@pytest.fixture
def version(db: None) -> ModelVersion:
    return ModelVersion.objects.create(name="adder", version="v1", artifact="/models/adder-v1",
                                       served_model_name="adder-v1")


@pytest.fixture
def worker(version: ModelVersion) -> EngineWorker:
    return engine_worker_create(model_version=version)


def ready(worker: EngineWorker, agent: str = A) -> EngineWorker:
    assert engine_services.engine_claim(worker_id=worker.pk, agent=agent, ttl_s=30) is not None
    assert engine_services.engine_start_begin(worker_id=worker.pk, agent=agent, port=8001,
                                              base_url="http://127.0.0.1:8001") is not None
    assert engine_services.engine_pid_set(worker_id=worker.pk, agent=agent, pid=4242) is not None
    result = engine_services.engine_ready(worker_id=worker.pk, agent=agent)
    assert result is not None
    return result


def test_a_claim_held_by_a_live_agent_cannot_be_taken(worker: EngineWorker) -> None:
    assert engine_services.engine_claim(worker_id=worker.pk, agent=A, ttl_s=30) is not None
    assert engine_services.engine_claim(worker_id=worker.pk, agent=B, ttl_s=30) is None
    assert EngineWorker.objects.get(pk=worker.pk).claimed_by == A
    # Renewing is claiming again.
    assert engine_services.engine_claim(worker_id=worker.pk, agent=A, ttl_s=30) is not None


def test_an_expired_claim_is_taken_over_and_the_dead_agents_engine_restarted(worker: EngineWorker) -> None:
    ready(worker)
    before = generation()
    EngineWorker.objects.filter(pk=worker.pk).update(claim_expires_at=timezone.now() - timedelta(seconds=1))
    claimed = engine_services.engine_claim(worker_id=worker.pk, agent=B, ttl_s=30)
    assert claimed is not None
    assert (claimed.previous_claim, claimed.previous_pid, claimed.previous_port) == (A, 4242, 8001)
    row = EngineWorker.objects.get(pk=worker.pk)
    assert (row.claimed_by, row.state, row.pid) == (B, State.PENDING, None)
    assert A in row.state_reason
    # It was routable and is not any more: gateways must rebuild.
    assert generation() == before + 1


def test_a_claim_of_an_agent_known_to_be_dead_is_taken_before_it_expires(worker: EngineWorker) -> None:
    assert engine_services.engine_claim(worker_id=worker.pk, agent=A, ttl_s=3600) is not None
    assert engine_services.engine_claim(worker_id=worker.pk, agent=B, ttl_s=30, dead_claims=[A]) is not None
    assert EngineWorker.objects.get(pk=worker.pk).claimed_by == B


def test_the_start_is_reserved_once_so_a_second_pass_launches_nothing(worker: EngineWorker) -> None:
    engine_services.engine_claim(worker_id=worker.pk, agent=A, ttl_s=30)
    first = engine_services.engine_start_begin(worker_id=worker.pk, agent=A, port=8001, base_url="http://x:8001")
    second = engine_services.engine_start_begin(worker_id=worker.pk, agent=A, port=8002, base_url="http://x:8002")
    assert first is not None and first.state == State.STARTING
    assert second is None
    assert EngineWorker.objects.get(pk=worker.pk).port == 8001


def test_an_agent_without_the_claim_changes_nothing(worker: EngineWorker) -> None:
    engine_services.engine_claim(worker_id=worker.pk, agent=A, ttl_s=30)
    assert engine_services.engine_start_begin(worker_id=worker.pk, agent=B, port=1, base_url="http://x:1") is None
    assert engine_services.engine_stopped(worker_id=worker.pk, agent=B, reason="x") is None
    assert not engine_services.engine_metrics_record(worker_id=worker.pk, agent=B, metrics={"a": 1})
    assert EngineWorker.objects.get(pk=worker.pk).state == State.PENDING


@pytest.mark.django_db(transaction=True)
def test_two_agents_racing_for_one_worker_start_it_once(version: ModelVersion) -> None:
    worker = engine_worker_create(model_version=version)
    barrier = threading.Barrier(8)
    starts: list[str] = []

    def agent(name: str) -> None:
        try:
            barrier.wait()
            if engine_services.engine_claim(worker_id=worker.pk, agent=name, ttl_s=30) is None:
                return
            if engine_services.engine_start_begin(worker_id=worker.pk, agent=name, port=1, base_url="http://x:1"):
                starts.append(name)
        finally:
            close_old_connections()

    threads = [threading.Thread(target=agent, args=(f"h/vm/{i}/n",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = EngineWorker.objects.get(pk=worker.pk)
    assert len(starts) == 1
    assert row.claimed_by == starts[0]
    assert row.state == State.STARTING


def test_becoming_routable_and_stopping_being_routable_bump_the_route_generation(worker: EngineWorker) -> None:
    start = generation()
    ready(worker)
    assert generation() == start + 1
    engine_services.engine_health_record(worker_id=worker.pk, agent=A, ok=True, detail="ok")
    assert generation() == start + 1  # a health record changes nothing a gateway sees
    assert engine_services.engine_unhealthy(worker_id=worker.pk, agent=A, detail="GET /health: timed out")
    assert generation() == start + 2
    again = engine_services.engine_ready(worker_id=worker.pk, agent=A)
    assert again is not None and again.state_reason == "healthy again"
    assert generation() == start + 3


def test_a_stop_request_takes_a_ready_worker_out_of_routing_at_once(worker: EngineWorker) -> None:
    ready(worker)
    start = generation()
    stopped = engine_worker_set_desired(worker=worker, desired=EngineWorker.Desired.STOPPED)
    assert stopped.state == State.DRAINING
    assert generation() == start + 1


def test_failures_back_off_and_then_the_worker_fails_visibly(worker: EngineWorker) -> None:
    earlier = timezone.now() - timedelta(seconds=1)
    ready(worker)
    policy = {"backoff_base_s": 5.0, "backoff_max_s": 300.0, "max_failures": 3}
    crashed = engine_services.engine_failed_start(worker_id=worker.pk, agent=A, reason="exited with signal SIGKILL",
                                                  **policy)
    assert crashed is not None
    assert crashed.state == State.CRASHED and crashed.consecutive_failures == 1 and crashed.pid is None
    assert crashed.next_start_at is not None
    assert 4 <= (crashed.next_start_at - timezone.now()).total_seconds() <= 5
    # Not before the backoff has passed.
    assert engine_services.engine_restart_due(worker_id=worker.pk, agent=A) is None
    EngineWorker.objects.filter(pk=worker.pk).update(next_start_at=timezone.now())
    assert engine_services.engine_restart_due(worker_id=worker.pk, agent=A) is not None
    restarted = engine_services.engine_start_begin(worker_id=worker.pk, agent=A, port=8002, base_url="http://x:8002")
    assert restarted is not None and restarted.restarts == 1
    second = engine_services.engine_failed_start(worker_id=worker.pk, agent=A, reason="exited with exit code 1",
                                                 **policy)
    assert second is not None and second.state == State.CRASHED
    assert second.next_start_at is not None
    assert 9 <= (second.next_start_at - timezone.now()).total_seconds() <= 10
    EngineWorker.objects.filter(pk=worker.pk).update(next_start_at=timezone.now())
    engine_services.engine_restart_due(worker_id=worker.pk, agent=A)
    engine_services.engine_start_begin(worker_id=worker.pk, agent=A, port=8003, base_url="http://x:8003")
    failed = engine_services.engine_failed_start(worker_id=worker.pk, agent=A,
                                                 reason="exited with exit code 1: ValueError: head size 16", **policy)
    assert failed is not None
    assert failed.state == State.FAILED
    assert failed.state_reason == "gave up after 3 failures in a row; last: exited with exit code 1: ValueError: head size 16"
    assert failed.claimed_by == ""
    assert list(engine_workers_failed_since(since=earlier)) == [failed]
    assert not engine_workers_failed_since(since=timezone.now()).exists()


def test_asking_a_failed_worker_to_run_again_retries_it(worker: EngineWorker) -> None:
    EngineWorker.objects.filter(pk=worker.pk).update(state=State.FAILED, consecutive_failures=5)
    retried = engine_worker_set_desired(worker=EngineWorker.objects.get(pk=worker.pk),
                                        desired=EngineWorker.Desired.RUNNING)
    assert retried.state == State.PENDING
    assert retried.consecutive_failures == 0


def test_an_exiting_agent_hands_its_workers_back_unclaimed(worker: EngineWorker) -> None:
    ready(worker)
    start = generation()
    engine_services.engine_drain_begin(worker_id=worker.pk, agent=A, reason="engine agent stopping")
    left = engine_services.engine_agent_left(worker_id=worker.pk, agent=A, reason="engine agent stopped")
    assert left is not None
    assert (left.state, left.claimed_by, left.pid) == (State.PENDING, "", None)
    assert generation() == start + 1
