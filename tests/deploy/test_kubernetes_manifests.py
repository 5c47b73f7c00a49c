"""deploy/kubernetes as `kubectl kustomize` renders it: every object valid for the Kubernetes OpenAPI schema
(kubernetes-validate, strict), and the pieces the platform needs wired to each other."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (`make kubectl` installs Debian's kubernetes-client)"
)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(REPO / "deploy" / "kubernetes")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(rendered: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in rendered if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def test_every_rendered_object_fits_the_kubernetes_schema(rendered: list[dict[str, Any]]) -> None:
    assert len(rendered) >= 15
    for doc in rendered:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_platforms_processes_and_the_gateways_autoscaler(rendered: list[dict[str, Any]]) -> None:
    names = ("ramp-web", "ramp-gateway", "ramp-worker", "ramp-worker-shadow", "ramp-worker-evals", "ramp-beat",
             "ramp-engine-reconciler")
    commands = {
        name: find(rendered, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["command"] for name in names
    }
    assert commands["ramp-web"][:2] == ["uvicorn", "config.asgi:application"]
    assert commands["ramp-gateway"][:2] == ["uvicorn", "serving.gateway.asgi:application"]
    # One worker per kind of work (config/queues.py), as docker-compose.yml runs them.
    queues = {name: commands[name][commands[name].index("-Q") + 1] for name in names if name.startswith("ramp-worker")}
    assert queues == {"ramp-worker": "analysis,notifications,celery", "ramp-worker-shadow": "shadow",
                      "ramp-worker-evals": "evals"}
    assert commands["ramp-engine-reconciler"][:5] == [
        "python",
        "manage.py",
        "engine_agent",
        "--driver",
        "kubernetes",
    ]
    beat = find(rendered, "Deployment", "ramp-beat")["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    hpa = find(rendered, "HorizontalPodAutoscaler", "ramp-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ramp-gateway"}
    assert hpa["minReplicas"] >= 2
    migrate = find(rendered, "Job", "ramp-migrate")
    assert migrate["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["migrate", "--no-input"]
    for service, port in (("ramp-web", 8000), ("ramp-gateway", 8080)):
        assert find(rendered, "Service", service)["spec"]["ports"][0]["port"] == port


def test_settings_come_from_the_configmap_and_secrets_from_a_secret_reference(
    rendered: list[dict[str, Any]],
) -> None:
    config = find(rendered, "ConfigMap", "ramp-config")["data"]
    assert (
        config["ENGINE_KUBERNETES_NAMESPACE"] == "ramp-engines" and config["ENGINE_AGENT_HOST"] == "cluster"
    )
    assert config["ENGINE_KUBERNETES_IMAGE"].startswith(
        "vllm/vllm-openai:"
    )  # the GPU overlay's engine default
    assert not [doc for doc in rendered if doc["kind"] == "Secret"]  # referenced, never shipped
    for doc in rendered:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            refs = {(next(iter(ref)), next(iter(ref.values()))["name"]) for ref in container["envFrom"]}
            assert refs == {("configMapRef", "ramp-config"), ("secretRef", "ramp-secrets")}, doc["metadata"][
                "name"
            ]


def test_the_reconciler_may_do_what_the_driver_does_in_the_engine_namespace_only(
    rendered: list[dict[str, Any]],
) -> None:
    role = find(rendered, "Role", "ramp-engine-reconciler")
    assert role["metadata"]["namespace"] == "ramp-engines"
    binding = find(rendered, "RoleBinding", "ramp-engine-reconciler")
    assert binding["metadata"]["namespace"] == "ramp-engines"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ramp-engine-reconciler", "namespace": "ramp"}
    ]
    reconciler = find(rendered, "Deployment", "ramp-engine-reconciler")["spec"]["template"]["spec"]
    assert reconciler["serviceAccountName"] == "ramp-engine-reconciler"
    assert not [doc for doc in rendered if doc["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    granted = {
        (resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]
    }
    assert ("pods/log", "get") in granted and ("endpointslices", "watch") in granted
    assert ("pods", "delete") not in granted  # it scales Deployments; it never deletes a pod itself


def test_the_gpu_overlay_adds_the_runtime_class_and_a_gpu_quota_for_the_engines(
    rendered: list[dict[str, Any]],
) -> None:
    assert find(rendered, "RuntimeClass", "nvidia")["handler"] == "nvidia"
    quota = find(rendered, "ResourceQuota", "engine-gpus")
    assert (
        quota["metadata"]["namespace"] == "ramp-engines"
        and "requests.nvidia.com/gpu" in quota["spec"]["hard"]
    )
