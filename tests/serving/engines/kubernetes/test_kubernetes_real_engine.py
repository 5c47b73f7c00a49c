"""The `kubernetes` driver with a real engine: the stand-in's kubelet runs the Deployment's own command line
(the vLLM OpenAI server, CPU build here, the demo model from a node path, the key from the Secret), and the
real gateway process routes to the pod's address with that key."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings

from serving.demo_models.build import ENGINE_ARGS
from serving.engines.kubernetes.cluster import Cluster
from serving.engines.kubernetes.reconciler import KubernetesReconciler, ReconcilerConfig
from serving.models import EngineWorker
from serving.services import (
    RouteSplit,
    engine_worker_create,
    gateway_key_create,
    model_version_register,
    route_set,
)
from tests.serving.engines.kubernetes.conftest import HOST, NAMESPACE
from tests.serving.gateway.conftest import GatewayProcess, gateway_process  # noqa: F401  (a fixture)
from tests.support.engines import engine_slot
from tests.support.kube import KubeStandin, ProcessImage, kube_standin

pytestmark = [pytest.mark.engines, pytest.mark.django_db(transaction=True)]
IMAGE = "vllm/vllm-openai:cpu-test"


@pytest.fixture
def kube() -> Iterator[KubeStandin]:
    with engine_slot(), kube_standin(nodes={"cpu-a": 1}) as standin:
        standin.images[IMAGE] = ProcessImage(log_dir=Path(settings.VAR_DIR) / "test-logs" / "kube-pods")
        yield standin
        assert standin.store.rejected == []


@pytest.mark.timeout(1200)
def test_a_pod_of_the_vllm_image_serves_through_the_gateway(
    kube: KubeStandin, adder_v1_dir: Path, gateway_process: Callable[..., GatewayProcess]  # noqa: F811
) -> None:
    version = model_version_register(
        name="adder",
        version="v1",
        artifact=str(adder_v1_dir),
        served_model_name="adder-v1",
        engine_args=[*ENGINE_ARGS, "--enforce-eager"],  # the CPU build's flag, asked for by the version
        deployment={
            "image": IMAGE,
            "gpus": 0,
            "model_source": "node_path",
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        },
    )
    worker = engine_worker_create(
        model_version=version, driver=EngineWorker.Driver.KUBERNETES, host_name=HOST
    )
    cluster = Cluster(namespace=NAMESPACE, config=kube.config)
    reconciler = KubernetesReconciler(
        ReconcilerConfig(host_name=HOST, namespace=NAMESPACE, default_image=IMAGE, probe_timeout_s=60),
        cluster,
    )
    try:

        def ready() -> EngineWorker | None:
            row = EngineWorker.objects.get(pk=worker.pk)
            return row if row.ready_replicas == 1 else None

        ready_worker = kube.wait(ready, "the vLLM pod ready", timeout_s=900, step=reconciler.reconcile)
        pod = ready_worker.pods[0]
        assert (
            pod["routable"] and pod["url"].endswith(":8000") and not pod["url"].startswith("http://127.0.0.1")
        )

        route_set(
            alias_name="adder",
            split=RouteSplit(
                baseline=version, candidate=None, candidate_weight=0, shadow_rate=0, rollout_id=None
            ),
        )
        key = gateway_key_create(name="kube-test").raw
        gateway = gateway_process()
        gateway.key = key
        reply = gateway.client().post(
            "/v1/chat/completions",
            json={
                "model": "adder",
                "messages": [{"role": "user", "content": "37+48"}],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-model-version"] == "adder-v1"
        assert reply.json()["choices"][0]["message"]["content"].strip() != ""
        from serving.models import RequestRecord

        kube.wait(
            lambda: RequestRecord.objects.filter(
                alias="adder", engine_worker_id=worker.pk, outcome="ok"
            ).exists(),
            "the gateway's record of the pod's answer",
            timeout_s=30,
        )
    finally:
        reconciler.shutdown()
        cluster.close()
