"""Scenarios of the `kubernetes` driver: ready, crash loop, image pull failure, no free GPU, a node gone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from serving.engines.kubernetes.manifests import GPU_RESOURCE, MANAGED_BY, WORKER_LABEL
from serving.engines.kubernetes.reconciler import KubernetesReconciler
from serving.gateway.routing import route_table_build
from serving.gateway.table import route_rows_load
from serving.models import EngineWorker
from serving.services import RouteSplit, engine_worker_set_desired, route_set
from tests.serving.engines.kubernetes.conftest import NAMESPACE, kube_worker, until, version
from tests.support.kube import CrashingImage, KubeStandin, kube_standin

State = EngineWorker.State


def test_a_worker_becomes_ready_and_its_pods_are_the_gateways_replicas(
    kube: KubeStandin, reconciler: KubernetesReconciler
) -> None:
    adder = version()
    worker = kube_worker(adder, replicas=2)
    ready = until(
        kube, reconciler, worker, lambda w: w.state == State.READY and w.ready_replicas == 2, "two ready pods"
    )

    assert ready.state_reason == "2/2 pods ready"
    assert ready.base_url == f"http://ramp-engine-{worker.pk}.{NAMESPACE}.svc:8000"
    deployment = kube.store.get("Deployment", NAMESPACE, f"ramp-engine-{worker.pk}")
    assert deployment is not None and deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"][GPU_RESOURCE] == "1"
    assert "--enforce-eager" not in container["args"]  # a GPU build: CUDA graphs on
    assert container["args"][:2] == ["--model", "acme/adder-7b"]
    # The key lives in a Secret the pod reads, never in the Deployment.
    assert ready.api_key and ready.api_key not in str(deployment)
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == f"ramp-engine-{worker.pk}-key"
    assert "HF_HUB_OFFLINE" not in env  # a hub id must be able to download
    assert {obj["kind"] for obj in kube.store.received} >= {"Secret", "Deployment", "Service"}
    assert all(obj["metadata"]["labels"][MANAGED_BY] == "ramp" for obj in kube.store.received)

    # Every pod passed one real 1-token completion, sent with the engine's key.
    pods = kube.pods(NAMESPACE, **{WORKER_LABEL: str(worker.pk)})
    assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {"gpu-a", "gpu-b"}
    for pod in pods:
        stub = kube.cluster.stub_of(pod["metadata"]["name"], NAMESPACE)
        assert stub.seen.completions >= 1 and set(stub.seen.keys) == {f"Bearer {ready.api_key}"}

    # The gateway's route table has one replica per pod, at the pod's address, with the key.
    route_set(
        alias_name="adder",
        split=RouteSplit(baseline=adder, candidate=None, candidate_weight=0, shadow_rate=0, rollout_id=None),
    )
    table = route_table_build(route_rows_load())
    replicas = table.aliases["adder"].baseline.replicas
    assert sorted(r.base_url for r in replicas) == sorted(f"http://{p['status']['podIP']}:8000" for p in pods)
    assert {r.worker_id for r in replicas} == {worker.pk}
    assert all(f"Authorization: Bearer {ready.api_key}" in r.headers for r in replicas)


def test_a_crash_looping_pod_says_why_with_its_last_log_lines_and_gives_up_its_gpu(
    kube: KubeStandin, reconciler: KubernetesReconciler
) -> None:
    kube.images["acme/vllm:broken"] = CrashingImage(
        lines=[
            "INFO 11-30 loading weights",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ]
    )
    worker = kube_worker(version(image="acme/vllm:broken"))
    looping = until(
        kube, reconciler, worker, lambda w: "crash-looping" in w.state_reason, "a crash loop reported"
    )
    assert looping.state == State.STARTING
    assert (
        "last log lines: INFO 11-30 loading weights | torch.OutOfMemoryError: CUDA out of memory"
        in looping.state_reason
    )

    failed = until(kube, reconciler, worker, lambda w: w.state == State.FAILED, "given up on")
    assert "crash-looping: 3 restarts" in failed.state_reason and "CUDA out of memory" in failed.state_reason
    deployment = kube.store.get("Deployment", NAMESPACE, f"ramp-engine-{worker.pk}")
    assert deployment is not None and deployment["spec"]["replicas"] == 0  # no GPU held by a crash loop
    kube.wait(lambda: not kube.pods(NAMESPACE, **{WORKER_LABEL: str(worker.pk)}), "the pod gone")

    # Stopping the failed worker cleans its objects up.
    engine_worker_set_desired(worker=failed, desired=EngineWorker.Desired.STOPPED)
    until(kube, reconciler, worker, lambda w: w.state == State.STOPPED, "stopped and cleaned up")
    assert kube.store.get("Deployment", NAMESPACE, f"ramp-engine-{worker.pk}") is None
    assert kube.store.get("Secret", NAMESPACE, f"ramp-engine-{worker.pk}-key") is None


def test_an_oom_killed_engine_says_so(kube: KubeStandin, reconciler: KubernetesReconciler) -> None:
    kube.images["acme/vllm:hungry"] = CrashingImage(lines=["INFO loading"], exit_code=137, reason="OOMKilled")
    worker = kube_worker(version(image="acme/vllm:hungry", memory="16Gi"))
    found = until(kube, reconciler, worker, lambda w: "OOMKilled" in w.state_reason, "an OOM kill reported")
    assert "out of memory; give the version a larger deployment.memory" in found.state_reason


def test_an_image_that_cannot_be_pulled_is_named(kube: KubeStandin, reconciler: KubernetesReconciler) -> None:
    worker = kube_worker(version(image="acme/vllm:typo"))
    found = until(
        kube, reconciler, worker, lambda w: "ImagePullBackOff" in w.state_reason, "the pull failure reported"
    )
    assert found.state == State.STARTING
    assert (
        "image acme/vllm:typo cannot be pulled (ImagePullBackOff: Back-off pulling image"
        in found.state_reason
    )


def test_a_pod_without_a_free_gpu_is_unschedulable_and_says_so(
    kube: KubeStandin, reconciler: KubernetesReconciler, viewer: Any
) -> None:
    worker = kube_worker(version(), replicas=3)  # two nodes of one GPU each
    found = until(
        kube,
        reconciler,
        worker,
        # The worker is ready with its first pod; the second may still be starting (on a loaded machine a pass
        # sees 1/3 first), so wait for the state the test is about.
        lambda w: w.state == State.READY and w.ready_replicas == 2 and "unschedulable" in w.state_reason,
        "2 of 3 pods ready, the third unschedulable",
    )
    assert found.state_reason.startswith("2/3 pods ready; pod ramp-engine-")
    assert (
        "unschedulable: no node has 1 free nvidia.com/gpu (0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
        in found.state_reason
    )

    client = Client()
    client.force_login(viewer.user)
    page = client.get(f"/engines/{worker.pk}").content.decode()
    assert "2 of 3 ready" in page and "Pods" in page and "no node has 1 free nvidia.com/gpu" in page

    big = kube_worker(version("big", gpus=2))
    waiting = until(
        kube,
        reconciler,
        big,
        lambda w: "no node has 2 free nvidia.com/gpu" in w.state_reason,
        "a 2-GPU pod reported unschedulable",
    )
    assert waiting.state == State.STARTING and waiting.ready_replicas == 0


def test_when_a_node_disappears_its_pod_leaves_routing_and_is_replaced_where_there_is_room(
    kube: KubeStandin, reconciler: KubernetesReconciler
) -> None:
    adder = version()
    worker = kube_worker(adder, replicas=2)
    until(kube, reconciler, worker, lambda w: w.ready_replicas == 2, "two ready pods")
    route_set(
        alias_name="adder",
        split=RouteSplit(baseline=adder, candidate=None, candidate_weight=0, shadow_rate=0, rollout_id=None),
    )
    lost = next(p for p in kube.pods(NAMESPACE) if p["spec"]["nodeName"] == "gpu-a")

    kube.cluster.node_remove("gpu-a")
    found = until(
        kube,
        reconciler,
        worker,
        lambda w: w.ready_replicas == 1 and "unschedulable" in w.state_reason,
        "one pod left, its replacement unschedulable",
    )
    assert found.state == State.READY
    replicas = route_table_build(route_rows_load()).aliases["adder"].baseline.replicas
    assert [r.base_url for r in replicas] == [pod["url"] for pod in found.pods if pod["routable"]]
    assert f"http://{lost['status']['podIP']}:8000" not in [r.base_url for r in replicas]

    kube.cluster.node_add("gpu-c", gpus=1)
    back = until(
        kube, reconciler, worker, lambda w: w.ready_replicas == 2, "the replacement ready on the new node"
    )
    assert {pod["node"] for pod in back.pods} == {"gpu-b", "gpu-c"}
    assert len(route_table_build(route_rows_load()).aliases["adder"].baseline.replicas) == 2


def test_a_process_pod_ends_with_the_stand_in(tmp_path: Path) -> None:
    """A ProcessImage pod runs as a process of this machine; the stand-in's end is its node's end, so that
    process ends too (a real vLLM pod left behind holds some 3 GB)."""
    from tests.support.kube import ProcessImage

    with kube_standin(nodes={"cpu-a": 1}) as standin:
        standin.images["acme/sleeper"] = ProcessImage(log_dir=tmp_path)
        standin.store.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "sleeper", "namespace": NAMESPACE},
            "spec": {"nodeName": "cpu-a", "containers": [{
                "name": "main", "image": "acme/sleeper",
                "command": ["python3", "-c", "import time; time.sleep(300)"],
            }]},
        }, check=False)  # fmt: skip

        def running() -> int | None:
            runtimes = [r for r in standin.cluster.runtimes.values() if r.process is not None]
            return runtimes[0].process.pid if runtimes and runtimes[0].process else None

        pid = standin.wait(running, "the pod's process", timeout_s=20)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
