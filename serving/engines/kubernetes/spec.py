"""A model version's Kubernetes deployment settings (`ModelVersion.deployment`), checked (pure).

{"image": "vllm/vllm-openai:v0.11.0",     # default: ENGINE_KUBERNETES_IMAGE
 "gpus": 1,                               # per pod; default: the engine args' parallel sizes
 "model_source": "hub" | "pvc" | "node_path",
 "pvc": "models",                         # model_source pvc: the claim; the artifact is a path in it
 "hf_token_secret": "hf-token",           # a Secret with key "token", for gated hub models
 "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
 "runtime_class": "nvidia",
 "shm_size": "8Gi", "cpu": "8", "memory": "64Gi",
 "env": {"VLLM_LOGGING_LEVEL": "INFO"},
 "startup_timeout_s": 1200}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from serving.engines.command import artifact_is_local

MODEL_SOURCES = ("hub", "pvc", "node_path")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
# A label key or value, and a DNS-1123 name, as the API server checks them.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# The platform sets these itself; a version may not point them elsewhere.
RESERVED_ENV = ("VLLM_API_KEY", "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class SpecError(ValueError):
    """A deployment setting is wrong; `field` is its path, e.g. "deployment.gpus"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _label_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not all(DNS_NAME.match(p) for p in prefix.split("."))):
        return False
    return bool(name) and len(name) <= 63 and bool(LABEL_VALUE.match(name))


@dataclass(frozen=True)
class DeploymentSpec:
    image: str = ""
    gpus: int | None = None
    model_source: str = ""
    pvc: str = ""
    hf_token_secret: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    runtime_class: str = ""
    shm_size: str = "2Gi"
    cpu: str = ""
    memory: str = ""
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: int = 1200

    @classmethod
    def from_dict(cls, raw: Any, *, prefix: str = "deployment") -> DeploymentSpec:
        """Check every setting; raise SpecError naming the first wrong one."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise SpecError(prefix, "must be an object")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise SpecError(
                f"{prefix}.{unknown[0]}",
                f"unknown setting (known: {', '.join(sorted(cls.__dataclass_fields__))})",
            )

        def text(name: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
            value = raw.get(name, "")
            if value in (None, ""):
                return ""
            if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
                raise SpecError(f"{prefix}.{name}", f"must be {what or 'a string'}")
            return value

        image = text("image")
        if image and (any(c.isspace() for c in image) or len(image) > 500):
            raise SpecError(f"{prefix}.image", "must be an image reference without spaces")
        gpus = raw.get("gpus")
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or not 0 <= gpus <= 64):
            raise SpecError(f"{prefix}.gpus", "must be a whole number of GPUs from 0 to 64")
        source = text("model_source")
        if source and source not in MODEL_SOURCES:
            raise SpecError(f"{prefix}.model_source", f"must be one of {', '.join(MODEL_SOURCES)}")
        pvc = text("pvc", DNS_NAME, "a PersistentVolumeClaim name (lower-case DNS name)")
        if source == "pvc" and not pvc:
            raise SpecError(f"{prefix}.pvc", "model_source pvc needs the claim's name")
        if pvc and source not in ("", "pvc"):
            raise SpecError(f"{prefix}.pvc", f"only for model_source pvc, not {source}")
        secret = text("hf_token_secret", DNS_NAME, "a Secret name (lower-case DNS name)")
        node_selector = raw.get("node_selector") or {}
        if not isinstance(node_selector, dict) or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and _label_key(k)
            and LABEL_VALUE.match(v)
            and len(v) <= 63
            for k, v in node_selector.items()
        ):
            raise SpecError(f"{prefix}.node_selector", "must map label keys to label values")
        tolerations = raw.get("tolerations") or []
        if not isinstance(tolerations, list):
            raise SpecError(f"{prefix}.tolerations", "must be a list of tolerations")
        for index, toleration in enumerate(tolerations):
            where = f"{prefix}.tolerations[{index}]"
            if not isinstance(toleration, dict) or not toleration or set(toleration) - TOLERATION_KEYS:
                raise SpecError(where, f"must be an object with {', '.join(sorted(TOLERATION_KEYS))}")
            if toleration.get("operator", "Equal") not in ("Equal", "Exists"):
                raise SpecError(f"{where}.operator", "must be Equal or Exists")
            if toleration.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise SpecError(f"{where}.effect", "must be NoSchedule, PreferNoSchedule or NoExecute")
            seconds = toleration.get("tolerationSeconds")
            if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)):
                raise SpecError(f"{where}.tolerationSeconds", "must be a whole number of seconds")
            for key in ("key", "value"):
                if key in toleration and not isinstance(toleration[key], str):
                    raise SpecError(f"{where}.{key}", "must be a string")
        runtime_class = text("runtime_class", DNS_NAME, "a RuntimeClass name (lower-case DNS name)")
        quantities = {
            name: text(name, QUANTITY, "a Kubernetes quantity such as 8Gi or 500m")
            for name in ("shm_size", "cpu", "memory")
        }
        env = raw.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and ENV_NAME.match(k) and isinstance(v, str) for k, v in env.items()
        ):
            raise SpecError(f"{prefix}.env", "must map variable names to string values")
        reserved = sorted(set(env) & set(RESERVED_ENV))
        if reserved:
            raise SpecError(f"{prefix}.env", f"{reserved[0]} is set by the platform")
        timeout = raw.get("startup_timeout_s", 1200)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 10 <= timeout <= 86400:
            raise SpecError(
                f"{prefix}.startup_timeout_s", "must be a whole number of seconds from 10 to 86400"
            )
        return cls(
            image=image,
            gpus=gpus,
            model_source=source,
            pvc=pvc,
            hf_token_secret=secret,
            node_selector=dict(node_selector),
            tolerations=[dict(t) for t in tolerations],
            runtime_class=runtime_class,
            shm_size=quantities["shm_size"] or "2Gi",
            cpu=quantities["cpu"],
            memory=quantities["memory"],
            env=dict(env),
            startup_timeout_s=timeout,
        )

    def source_for(self, artifact: str) -> str:
        """Where the weights come from: as set, else a node path for a local-looking artifact, else the hub."""
        if self.model_source:
            return self.model_source
        return "node_path" if artifact_is_local(artifact) else "hub"
