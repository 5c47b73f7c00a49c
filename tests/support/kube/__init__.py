"""A stand-in Kubernetes cluster for the `kubernetes` driver's tests: a real HTTP API server speaking the
Kubernetes REST protocol (`api`), with controllers, a scheduler and a kubelet behind it (`cluster`).

    with kube_standin(nodes={"gpu-a": 1, "gpu-b": 1}) as kube:
        kube.images["vllm/vllm-openai:test"] = EngineImage()
        cluster = Cluster(namespace="engines", config=kube.config)   # the driver's own client
        ...
        assert kube.store.rejected == []   # everything the driver sent fit the OpenAPI schema
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from lightkube import KubeConfig
from lightkube.config.models import Cluster as ClusterConfig
from lightkube.config.models import User

from tests.support.kube.api import Store, api_server_start, api_server_stop
from tests.support.kube.cluster import Cluster, CrashingImage, EngineImage, ProcessImage

__all__ = ["CrashingImage", "EngineImage", "KubeStandin", "ProcessImage", "kube_standin"]

T = TypeVar("T")


@dataclass
class KubeStandin:
    url: str
    store: Store
    cluster: Cluster

    @property
    def images(self) -> dict[str, Any]:
        return self.cluster.images

    @property
    def config(self) -> KubeConfig:
        """What a service account's kubeconfig says: the server and a bearer token."""
        return KubeConfig.from_one(cluster=ClusterConfig(server=self.url), user=User(token=self.store.token))

    def pods(self, namespace: str, **labels: str) -> list[dict[str, Any]]:
        return self.store.list(
            "Pod",
            namespace,
            lambda p: all((p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items()),
        )

    def wait(
        self,
        check: Callable[[], T],
        what: str,
        *,
        timeout_s: float = 20.0,
        step: Callable[[], None] | None = None,
    ) -> T:
        """Until `check()` is truthy (running `step` between tries, e.g. a reconcile pass); its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            if step is not None:
                step()
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; controller errors: {self.cluster.errors[-1:]}"
                )
            time.sleep(0.05)


@contextmanager
def kube_standin(*, nodes: dict[str, int]) -> Iterator[KubeStandin]:
    store = Store()
    cluster = Cluster(store, nodes=nodes)
    server, url = api_server_start(store, cluster.logs)
    cluster.start()
    try:
        yield KubeStandin(url=url, store=store, cluster=cluster)
    finally:
        cluster.stop()
        api_server_stop(server)
    assert not cluster.errors, cluster.errors[-1]
