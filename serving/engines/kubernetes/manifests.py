"""The objects the `kubernetes` driver owns for one worker, as the API server takes them (pure).

A Secret holding the engine's API key, a Deployment of the vLLM OpenAI server and a ClusterIP Service in
front of its pods. All three carry the platform's labels, so the reconciler lists exactly what it owns and a
person can `kubectl get all -l app.kubernetes.io/managed-by=ramp`."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from serving.engines.command import SERVER_MODULE, gpu_count
from serving.engines.kubernetes.spec import DeploymentSpec

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "ramp"
WORKER_LABEL = "ramp.platform/worker"
VERSION_LABEL = "ramp.platform/model-version"
CONTAINER = "engine"
PORT = 8000
GPU_RESOURCE = "nvidia.com/gpu"
MODELS_MOUNT = "/models"
# The ReplicaSet controller removes the pods of lowest cost first when a Deployment shrinks: a drained
# pod gets this, so the scale-down takes the pod that was drained and not one still serving.
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
DRAINED_COST = "-1000000"


def engine_name(worker_id: int) -> str:
    return f"ramp-engine-{worker_id}"


def key_secret_name(worker_id: int) -> str:
    return f"ramp-engine-{worker_id}-key"


def worker_labels(worker_id: int) -> dict[str, str]:
    return {
        MANAGED_BY: MANAGER,
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/component": "engine",
        WORKER_LABEL: str(worker_id),
    }


def _label_value(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:63].strip("-_.")
    return cleaned or "unnamed"


@dataclass(frozen=True)
class EngineObject:
    """What one worker's Deployment runs."""

    worker_id: int
    namespace: str
    version_label: str
    artifact: str
    served_model_name: str
    engine_args: Sequence[str]
    spec: DeploymentSpec
    default_image: str
    replicas: int

    @property
    def name(self) -> str:
        return engine_name(self.worker_id)

    @property
    def gpus(self) -> int:
        return self.spec.gpus if self.spec.gpus is not None else gpu_count(self.engine_args)

    def _meta(self, name: str) -> dict[str, Any]:
        labels = {**worker_labels(self.worker_id), VERSION_LABEL: _label_value(self.version_label)}
        return {"name": name, "namespace": self.namespace, "labels": labels}

    def secret(self, api_key: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": self._meta(key_secret_name(self.worker_id)),
            "type": "Opaque",
            "stringData": {"api-key": api_key},
        }

    def service(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Service", "metadata": self._meta(self.name),
            "spec": {"type": "ClusterIP", "selector": {WORKER_LABEL: str(self.worker_id)},
                     "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
        }  # fmt: skip

    def _model_and_volumes(
        self,
    ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """--model's value, the volumes and mounts for the weights, and the env that goes with them."""
        source = self.spec.source_for(self.artifact)
        if source == "hub":
            # Downloaded into the pod; a cache volume keeps a container restart from downloading again.
            env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/cache/huggingface"}]
            if self.spec.hf_token_secret:
                env.append(
                    {
                        "name": "HF_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": self.spec.hf_token_secret, "key": "token"}},
                    }
                )
            return (
                self.artifact,
                [{"name": "hf-cache", "emptyDir": {}}],
                [{"name": "hf-cache", "mountPath": "/cache"}],
                env,
            )
        offline = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TRANSFORMERS_OFFLINE", "value": "1"}]
        if source == "pvc":
            path = posixpath.join(MODELS_MOUNT, self.artifact.lstrip("/"))
            return (
                path,
                [{"name": "models", "persistentVolumeClaim": {"claimName": self.spec.pvc, "readOnly": True}}],
                [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}],
                offline,
            )
        path = posixpath.join(MODELS_MOUNT, "model")
        return (
            path,
            [{"name": "models", "hostPath": {"path": self.artifact, "type": "Directory"}}],
            [{"name": "models", "mountPath": path, "readOnly": True}],
            offline,
        )

    def deployment(self) -> dict[str, Any]:
        spec = self.spec
        model, volumes, mounts, env = self._model_and_volumes()
        args = [
            "--model",
            model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            "0.0.0.0",
            "--port",
            str(PORT),
            "--disable-uvicorn-access-log",
            *self.engine_args,
        ]
        env = [
            {
                "name": "VLLM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": key_secret_name(self.worker_id), "key": "api-key"}},
            },
            *env,
            *({"name": name, "value": value} for name, value in sorted(spec.env.items())),
        ]
        limits: dict[str, str] = {}
        requests: dict[str, str] = {}
        if self.gpus:
            limits[GPU_RESOURCE] = requests[GPU_RESOURCE] = str(self.gpus)
        if spec.memory:
            limits["memory"] = requests["memory"] = spec.memory
        if spec.cpu:
            requests["cpu"] = spec.cpu
        volumes = [*volumes, {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
        mounts = [*mounts, {"name": "shm", "mountPath": "/dev/shm"}]
        health = {"httpGet": {"path": "/health", "port": "http"}}
        pod_spec: dict[str, Any] = {
            "enableServiceLinks": False,
            # The reconciler drains a pod before it goes; SIGTERM then lets vLLM finish what is left.
            "terminationGracePeriodSeconds": 60,
            "containers": [{
                "name": CONTAINER,
                "image": spec.image or self.default_image,
                "command": ["python3", "-m", SERVER_MODULE],
                "args": args,
                "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                "env": env,
                "resources": {"limits": limits, "requests": requests},
                # Loading weights takes minutes: the startup probe allows for it, then readiness takes over.
                "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": max(1, spec.startup_timeout_s // 10)},
                "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 2},
                "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }  # fmt: skip
        if spec.node_selector:
            pod_spec["nodeSelector"] = dict(spec.node_selector)
        if spec.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
        if spec.runtime_class:
            pod_spec["runtimeClassName"] = spec.runtime_class
        labels = worker_labels(self.worker_id)
        return {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": self._meta(self.name),
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": {WORKER_LABEL: str(self.worker_id)}},
                # No spare GPU is assumed: a changed pod template replaces pods one at a time, never adding one.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        }  # fmt: skip
