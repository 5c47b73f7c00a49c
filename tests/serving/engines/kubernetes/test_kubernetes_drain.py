"""Draining pods of the `kubernetes` driver with requests in flight: a scale-down and a stop."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx

from serving.engines.kubernetes.manifests import DELETION_COST, WORKER_LABEL
from serving.engines.kubernetes.reconciler import KubernetesReconciler
from serving.gateway.routing import route_table_build
from serving.gateway.table import route_rows_load
from serving.models import EngineWorker
from serving.services import RouteSplit, engine_worker_set_desired, route_set
from tests.serving.engines.kubernetes.conftest import NAMESPACE, PROPAGATION_S, kube_worker, until, version
from tests.support.fake_engine import FakeEngine
from tests.support.kube import KubeStandin

State = EngineWorker.State
REQUESTS_PER_POD = 3


def _in_flight(
    worker: EngineWorker, kube: KubeStandin
) -> tuple[dict[str, FakeEngine], list[threading.Thread], list[int]]:
    """Requests held open on every pod, as the gateway sent them before any drain began."""
    stubs: dict[str, FakeEngine] = {}
    threads: list[threading.Thread] = []
    statuses: list[int] = []
    for pod in worker.pods:
        stub = kube.cluster.stub_of(pod["name"], NAMESPACE)
        stub.hold.clear()
        stubs[pod["name"]] = stub

        def call(url: str = pod["url"]) -> None:
            response = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=60,
                trust_env=False,
                headers={"Authorization": f"Bearer {worker.api_key}"},
                json={"model": "adder-v1", "messages": [{"role": "user", "content": "1+1"}]},
            )
            statuses.append(response.status_code)

        for _ in range(REQUESTS_PER_POD):
            threads.append(threading.Thread(target=call, daemon=True))
            threads[-1].start()
    kube.wait(
        lambda: all(stub.running == REQUESTS_PER_POD for stub in stubs.values()),
        "requests in flight on every pod",
    )
    return stubs, threads, statuses


def _routed(alias: str = "adder") -> list[str]:
    return sorted(r.base_url for r in route_table_build(route_rows_load()).aliases[alias].baseline.replicas)


def test_the_worker_shows_its_pods_requests_and_counters_added_up(
    kube: KubeStandin, reconciler: KubernetesReconciler
) -> None:
    reconciler.config = dataclasses.replace(reconciler.config, metrics_interval_s=0.0)
    worker = until(
        kube, reconciler, kube_worker(version(), replicas=2), lambda w: w.ready_replicas == 2, "two ready pods"
    )
    stubs, threads, _ = _in_flight(worker, kube)
    reconciler.reconcile()
    metrics = EngineWorker.objects.get(pk=worker.pk).metrics
    assert metrics["replicas_scraped"] == 2
    assert metrics["vllm:num_requests_running"] == 2 * REQUESTS_PER_POD
    # Each pod answered its 1-token readiness completion: two in all.
    assert metrics["vllm:request_success_total"] == 2
    for stub in stubs.values():
        stub.hold.set()
    for thread in threads:
        thread.join(timeout=30)
    reconciler.reconcile()
    assert EngineWorker.objects.get(pk=worker.pk).metrics["vllm:num_requests_running"] == 0


def test_a_scale_down_takes_a_pod_out_of_routing_waits_for_its_requests_then_removes_that_pod(
    kube: KubeStandin, reconciler: KubernetesReconciler
) -> None:
    adder = version()
    worker = until(
        kube, reconciler, kube_worker(adder, replicas=2), lambda w: w.ready_replicas == 2, "two ready pods"
    )
    route_set(
        alias_name="adder",
        split=RouteSplit(baseline=adder, candidate=None, candidate_weight=0, shadow_rate=0, rollout_id=None),
    )
    stubs, threads, statuses = _in_flight(worker, kube)

    EngineWorker.objects.filter(pk=worker.pk).update(replicas=1)  # what the GPU-budget service does
    reconciler.reconcile()
    draining = [pod for pod in EngineWorker.objects.get(pk=worker.pk).pods if pod["draining"]]
    assert len(draining) == 1
    victim = draining[0]
    kept = next(pod for pod in worker.pods if pod["name"] != victim["name"])
    assert _routed() == [kept["url"]]  # out of routing at once

    # Past the time a route change takes to reach the gateways, its requests still hold it.
    time.sleep(PROPAGATION_S + 0.3)
    reconciler.reconcile()
    deployment = kube.store.get("Deployment", NAMESPACE, f"ramp-engine-{worker.pk}")
    assert deployment is not None and deployment["spec"]["replicas"] == 2
    still = kube.store.get("Pod", NAMESPACE, victim["name"])
    assert still is not None and not still["metadata"].get("deletionTimestamp")

    stubs[victim["name"]].hold.set()  # its requests finish
    kube.wait(
        lambda: kube.store.get("Pod", NAMESPACE, victim["name"]) is None,
        "the drained pod removed",
        step=reconciler.reconcile,
    )
    deployment = kube.store.get("Deployment", NAMESPACE, f"ramp-engine-{worker.pk}")
    assert deployment is not None and deployment["spec"]["replicas"] == 1
    remaining = kube.pods(NAMESPACE, **{WORKER_LABEL: str(worker.pk)})
    assert [p["metadata"]["name"] for p in remaining] == [kept["name"]]  # the serving pod was never touched
    assert DELETION_COST not in (remaining[0]["metadata"].get("annotations") or {})

    stubs[kept["name"]].hold.set()
    for thread in threads:
        thread.join(timeout=30)
    assert statuses == [200] * (2 * REQUESTS_PER_POD)  # nothing in flight was cut
    final = until(
        kube, reconciler, worker, lambda w: w.ready_replicas == 1 and len(w.pods) == 1, "one pod left"
    )
    assert final.state == State.READY and final.state_reason == "1/1 pods ready"


def test_stopping_a_worker_drains_every_pod_then_deletes_its_objects(
    kube: KubeStandin, reconciler: KubernetesReconciler
) -> None:
    adder = version()
    worker = until(
        kube, reconciler, kube_worker(adder, replicas=2), lambda w: w.ready_replicas == 2, "two ready pods"
    )
    stubs, threads, statuses = _in_flight(worker, kube)

    engine_worker_set_desired(worker=worker, desired=EngineWorker.Desired.STOPPED)
    assert EngineWorker.objects.get(pk=worker.pk).state == State.DRAINING
    time.sleep(PROPAGATION_S + 0.3)
    reconciler.reconcile()
    assert kube.store.get("Deployment", NAMESPACE, f"ramp-engine-{worker.pk}") is not None

    for stub in stubs.values():
        stub.hold.set()
    stopped = until(kube, reconciler, worker, lambda w: w.state == State.STOPPED, "stopped", timeout_s=30)
    assert stopped.state_reason == f"stopped: ramp-engine-{worker.pk} deleted"
    assert stopped.pods == [] and stopped.ready_replicas == 0
    for kind in ("Deployment", "Service", "Secret"):
        name = f"ramp-engine-{worker.pk}" + ("-key" if kind == "Secret" else "")
        assert kube.store.get(kind, NAMESPACE, name) is None, kind
    assert not kube.pods(NAMESPACE, **{WORKER_LABEL: str(worker.pk)})
    for thread in threads:
        thread.join(timeout=30)
    assert statuses == [200] * (2 * REQUESTS_PER_POD)
