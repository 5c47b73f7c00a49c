"""The Kubernetes API calls of the `kubernetes` driver, through lightkube.

Why lightkube: it is small (httpx underneath, like the rest of the platform's HTTP), typed with models
generated from the Kubernetes OpenAPI schema of each release, and has what the reconciler needs and no
more: create, get, merge-patch, delete, list with label selectors, watch that reconnects by itself, pod
logs, in-cluster service-account and kubeconfig loading. The official `kubernetes` package is a large
generated client on urllib3 with its own threading; kr8s is friendly but async-first and less typed.

Objects go in and come out as plain dicts (the manifests and the status readers are pure), converted at
this edge. Every call raises `ClusterError` with the API server's own message."""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2
from lightkube import ApiError, Client, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ConfigError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod, PodLog, Secret, Service
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import PatchType

from serving.engines.kubernetes.manifests import MANAGED_BY, MANAGER

logger = logging.getLogger("serving.engines.kubernetes")

KINDS: dict[str, Any] = {
    "Deployment": Deployment,
    "Service": Service,
    "Secret": Secret,
    "Pod": Pod,
    "EndpointSlice": EndpointSlice,
}


class ClusterError(Exception):
    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _error(exc: ApiError) -> ClusterError:
    status = exc.status
    return ClusterError(f"{status.code} {status.reason}: {status.message}", status=int(status.code or 0))


def kube_config(kubeconfig: str = "") -> KubeConfig:
    """A kubeconfig file when given, else the pod's service account, else $KUBECONFIG or ~/.kube/config."""
    try:
        if kubeconfig:
            return KubeConfig.from_file(kubeconfig)
        return KubeConfig.from_env()
    except ConfigError as exc:
        raise ClusterError(f"no Kubernetes configuration: {exc}") from exc


class Cluster:
    """One namespace of one cluster, as the reconciler uses it."""

    def __init__(self, *, namespace: str, config: KubeConfig, timeout_s: float = 15.0) -> None:
        self.namespace = namespace
        self.client = Client(
            config=config, namespace=namespace, timeout=httpx2.Timeout(timeout_s), field_manager=MANAGER
        )

    def close(self) -> None:
        self.client.close()

    # --- objects ------------------------------------------------------------------------------------

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the object, or bring an existing one to the manifest (a JSON merge patch)."""
        obj = from_dict(manifest)
        try:
            return self.client.create(obj).to_dict()  # type: ignore[union-attr]
        except ApiError as exc:
            if exc.status.code != 409:
                raise _error(exc) from exc
        kind = KINDS[manifest["kind"]]
        try:
            return self.client.patch(
                kind, manifest["metadata"]["name"], manifest, patch_type=PatchType.MERGE
            ).to_dict()
        except ApiError as exc:
            raise _error(exc) from exc

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return self.client.get(KINDS[kind], name).to_dict()
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise _error(exc) from exc

    def list(self, kind: str, labels: dict[str, str]) -> builtins.list[dict[str, Any]]:
        try:
            return [obj.to_dict() for obj in self.client.list(KINDS[kind], labels=dict(labels.items()))]  # type: ignore[arg-type]
        except ApiError as exc:
            raise _error(exc) from exc

    def patch(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.client.patch(KINDS[kind], name, patch, patch_type=PatchType.MERGE).to_dict()
        except ApiError as exc:
            raise _error(exc) from exc

    def delete(self, kind: str, name: str) -> bool:
        """False when it was already gone."""
        try:
            self.client.delete(KINDS[kind], name)
        except ApiError as exc:
            if exc.status.code == 404:
                return False
            raise _error(exc) from exc
        return True

    def pod_log(self, name: str, *, container: str, previous: bool, tail_lines: int) -> str:
        """The last lines a container wrote; `previous`: of the run before the last restart (a crash loop's
        current container is waiting and has none). lightkube's `log()` has no `previous`, so the request is
        built with its generic client."""
        generic = self.client._client
        request = generic.prepare_request(
            "get",
            PodLog,
            name=name,
            namespace=self.namespace,
            params={
                "container": container,
                "previous": "true" if previous else None,
                "tailLines": tail_lines,
            },
        )
        response = generic.send(generic.build_adapter_request(request))
        if response.status_code != 200:
            raise ClusterError(f"{response.status_code}: {response.text[:300]}", status=response.status_code)
        return response.text

    # --- watching -------------------------------------------------------------------------------------

    def watch_changes(
        self, kinds: tuple[str, ...], on_change: Callable[[], None], stop: threading.Event
    ) -> builtins.list[threading.Thread]:
        """One daemon thread per kind watching the platform's objects; each event calls `on_change` (the
        reconciler's wake-up). A broken watch is opened again after a pause."""
        threads = []
        for kind in kinds:
            thread = threading.Thread(
                target=self._watch_loop, args=(kind, on_change, stop), daemon=True, name=f"watch-{kind}"
            )
            thread.start()
            threads.append(thread)
        return threads

    def _watch_loop(self, kind: str, on_change: Callable[[], None], stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for _event, _obj in self.client.watch(
                    KINDS[kind], labels={MANAGED_BY: MANAGER}, server_timeout=60
                ):
                    on_change()
                    if stop.is_set():
                        return
            except Exception as exc:  # a dropped connection, the API server restarting
                if stop.is_set():
                    return
                logger.info("watch of %s broke (%s); watching again", kind, exc)
                stop.wait(2.0)
            else:
                time.sleep(0.1)
