"""What the reconciler asks of the API server, against what deploy/kubernetes grants it: every request of a
worker's whole life (deploy, watch, read pods and logs, scale down with a drain, stop) is allowed by the
Role, in the engine namespace only."""

from __future__ import annotations

import threading
from pathlib import Path

import yaml

from serving.engines.kubernetes.reconciler import KubernetesReconciler
from serving.models import EngineWorker
from serving.services import engine_worker_set_desired
from tests.serving.engines.kubernetes.conftest import NAMESPACE, kube_worker, until, version
from tests.support.kube import CrashingImage, KubeStandin
from tests.support.kube.api import parse_path

ROLE = Path(__file__).resolve().parents[4] / "deploy" / "kubernetes" / "base" / "reconciler.yaml"
VERBS = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}


def test_every_request_of_a_workers_life_is_granted_by_the_role(
    kube: KubeStandin, reconciler: KubernetesReconciler
) -> None:
    events = []
    stop = threading.Event()
    reconciler.cluster.watch_changes(("Pod", "EndpointSlice", "Deployment"), lambda: events.append(1), stop)
    try:
        worker = until(
            kube, reconciler, kube_worker(version(), replicas=2), lambda w: w.ready_replicas == 2, "ready"
        )
        EngineWorker.objects.filter(pk=worker.pk).update(replicas=1)
        until(kube, reconciler, worker, lambda w: len(w.pods) == 1, "scaled down", timeout_s=30)
        engine_worker_set_desired(worker=worker, desired=EngineWorker.Desired.STOPPED)
        until(
            kube, reconciler, worker, lambda w: w.state == EngineWorker.State.STOPPED, "stopped", timeout_s=30
        )
        kube.images["acme/vllm:broken"] = CrashingImage(lines=["boom"])
        broken = kube_worker(version("broken", image="acme/vllm:broken"))
        until(
            kube,
            reconciler,
            broken,
            lambda w: "last log lines: boom" in w.state_reason,
            "a crash loop's log read",
        )
    finally:
        stop.set()
    assert events, "the watches saw no change"

    role = next(doc for doc in yaml.safe_load_all(ROLE.read_text()) if doc["kind"] == "Role")
    granted = {
        (resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]
    }
    used = set()
    for method, path, watch in kube.store.requests:
        target = parse_path(path)
        assert target.namespace == NAMESPACE, path
        resource = target.resource.plural + (f"/{target.subresource}" if target.subresource else "")
        if method == "GET":
            verb = "get" if target.name else ("watch" if watch else "list")
        else:
            verb = VERBS[method]
        used.add((resource, verb))
    assert used - granted == set()
    assert {
        ("deployments", "create"),
        ("pods", "patch"),
        ("pods/log", "get"),
        ("endpointslices", "watch"),
    } <= used
