"""The `kubernetes` driver against the stand-in cluster (tests/support/kube): the reconciler runs in this
process with its own lightkube client over real HTTP; the pods are stand-in engines (tests/support/fake_engine.py) on their own addresses."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from serving.engines.kubernetes.cluster import Cluster
from serving.engines.kubernetes.reconciler import KubernetesReconciler, ReconcilerConfig
from serving.models import EngineWorker, ModelVersion
from serving.services import engine_worker_create, model_version_register
from tests.support.kube import EngineImage, KubeStandin, kube_standin

NAMESPACE = "engines"
HOST = "cluster-1"
IMAGE = "vllm/vllm-openai:v0.11.0"
# How long a drained pod is kept after leaving routing before its in-flight count is trusted (the
# gateways here are the route table the tests build; production waits 2 s).
PROPAGATION_S = 0.5


@pytest.fixture
def kube() -> Iterator[KubeStandin]:
    with kube_standin(nodes={"gpu-a": 1, "gpu-b": 1}) as standin:
        standin.images[IMAGE] = EngineImage()
        yield standin
        # Everything the driver sent fitted the Kubernetes OpenAPI schema.
        assert standin.store.rejected == []


@pytest.fixture
def reconciler(kube: KubeStandin, db: None) -> Iterator[KubernetesReconciler]:
    cluster = Cluster(namespace=NAMESPACE, config=kube.config)
    config = ReconcilerConfig(
        host_name=HOST,
        namespace=NAMESPACE,
        default_image=IMAGE,
        drain_timeout_s=30,
        max_restarts=3,
        probe_timeout_s=5,
    )
    found = KubernetesReconciler(config, cluster)
    yield found
    found.shutdown()
    cluster.close()


def version(
    name: str = "adder", tag: str = "v1", *, image: str = IMAGE, gpus: int = 1, **deployment: object
) -> ModelVersion:
    return model_version_register(
        name=name,
        version=tag,
        artifact="acme/adder-7b",
        served_model_name=f"{name}-{tag}",
        deployment={"image": image, "gpus": gpus, **deployment},
    )


def kube_worker(model_version: ModelVersion, replicas: int = 1) -> EngineWorker:
    return engine_worker_create(
        model_version=model_version, driver=EngineWorker.Driver.KUBERNETES, host_name=HOST, replicas=replicas
    )


def until(
    kube: KubeStandin,
    reconciler: KubernetesReconciler,
    worker: EngineWorker,
    check: Callable[[EngineWorker], bool],
    what: str,
    timeout_s: float = 20.0,
) -> EngineWorker:
    """Reconcile passes until the worker row satisfies `check`."""

    def current() -> EngineWorker | None:
        row = EngineWorker.objects.get(pk=worker.pk)
        return row if check(row) else None

    try:
        return kube.wait(current, what, timeout_s=timeout_s, step=reconciler.reconcile)
    except AssertionError as exc:
        row = EngineWorker.objects.get(pk=worker.pk)
        raise AssertionError(f"{exc}: worker is {row.state} ({row.state_reason}); pods {row.pods}") from None
