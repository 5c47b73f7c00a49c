"""Pods and EndpointSlices, as the kubelet and the controllers write them, read into what a person can act
on (pure: API objects as dicts in, plain values out).

A pod's reason is the most telling thing its status says: unschedulable for lack of GPUs, an image that
cannot be pulled, a crash loop (the reconciler adds the last log lines), OOMKilled, a node that is gone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.engines.kubernetes.manifests import CONTAINER, GPU_RESOURCE, PORT

IMAGE_PULL = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")


@dataclass(frozen=True)
class PodView:
    name: str
    ip: str
    node: str
    created: str
    # The kubelet's Ready condition, and the EndpointSlice controller's ready flag for the pod's address.
    ready: bool
    in_endpoints: bool
    terminating: bool
    restarts: int
    crash_looping: bool
    oom_killed: bool
    reason: str

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{PORT}" if self.ip else ""

    @property
    def serving(self) -> bool:
        """Ready by the kubelet and listed ready in the Service's EndpointSlices."""
        return self.ready and self.in_endpoints and not self.terminating and bool(self.ip)


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in status.get("conditions") or []}


def _unschedulable(message: str, gpus: int) -> str:
    # The scheduler says "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: ...".
    if f"Insufficient {GPU_RESOURCE}" in message:
        return f"unschedulable: no node has {gpus} free {GPU_RESOURCE} ({message.strip()})"
    return f"unschedulable: {message.strip() or 'no node fits'}"


def pod_view(pod: Mapping[str, Any], *, ready_addresses: Iterable[str] = (), gpus: int = 1) -> PodView:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    conditions = _conditions(status)
    containers = [c for c in status.get("containerStatuses") or [] if c.get("name") == CONTAINER] or list(
        status.get("containerStatuses") or []
    )
    container = containers[0] if containers else {}
    state = container.get("state") or {}
    last = (container.get("lastState") or {}).get("terminated") or {}
    waiting = state.get("waiting") or {}
    terminated = state.get("terminated") or {}
    restarts = int(container.get("restartCount") or 0)
    ip = status.get("podIP") or ""
    ready = (conditions.get("Ready") or {}).get("status") == "True"
    terminating = bool(meta.get("deletionTimestamp"))
    crash_looping = waiting.get("reason") == "CrashLoopBackOff"
    oom = last.get("reason") == "OOMKilled" or terminated.get("reason") == "OOMKilled"
    image = next((c.get("image", "") for c in spec.get("containers") or [] if c.get("name") == CONTAINER), "")
    disruption = conditions.get("DisruptionTarget") or {}
    scheduled = conditions.get("PodScheduled") or {}

    if terminating:
        reason = "terminating" + (
            f": {disruption.get('message')}" if disruption.get("status") == "True" else ""
        )
    elif disruption.get("status") == "True":
        reason = f"being removed: {disruption.get('message') or disruption.get('reason')}"
    elif scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        reason = _unschedulable(scheduled.get("message", ""), gpus)
    elif waiting.get("reason") in IMAGE_PULL:
        detail = (waiting.get("message") or "").strip()
        reason = (
            f"image {image} cannot be pulled ({waiting['reason']}" + (f": {detail}" if detail else "") + ")"
        )
    elif crash_looping or (terminated and not ready):
        source = last or terminated
        how = source.get("reason") or "Error"
        reason = (
            f"crash-looping: {restarts} restarts, last exit {how} (code {source.get('exitCode', '?')})"
            if crash_looping
            else f"container exited: {how} (code {source.get('exitCode', '?')})"
        )
        if how == "OOMKilled":
            reason += (
                ": out of memory; give the version a larger deployment.memory or a smaller --max-model-len"
            )
    elif status.get("phase") == "Pending":
        reason = f"starting: {waiting.get('reason') or 'waiting for the node'}"
        if not meta.get("name") or not spec.get("nodeName"):
            reason = "waiting to be scheduled"
    elif ready:
        reason = "ready" + (" (was OOMKilled before)" if oom else "")
    elif (conditions.get("Ready") or {}).get("reason") in ("NodeLost", "NodeNotReady") or (
        (conditions.get("Ready") or {}).get("message") or ""
    ).startswith("node"):
        reason = f"node {spec.get('nodeName', '?')} is not ready ({(conditions.get('Ready') or {}).get('message', '')})"
    elif container.get("started") is False:
        reason = "loading the model (startup probe not passed yet)"
    else:
        reason = "not ready (readiness probe failing)"
    return PodView(
        name=meta.get("name", ""), ip=ip, node=spec.get("nodeName", ""), created=meta.get("creationTimestamp", ""),
        ready=ready, in_endpoints=ip in set(ready_addresses), terminating=terminating, restarts=restarts,
        crash_looping=crash_looping, oom_killed=oom, reason=reason,
    )  # fmt: skip


def ready_addresses(slices: Iterable[Mapping[str, Any]]) -> set[str]:
    """Addresses the EndpointSlice controller lists as ready (and not terminating) for the Service."""
    found: set[str] = set()
    for slice_ in slices:
        for endpoint in slice_.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            # An unset `ready` means ready (the API's documented reading).
            if conditions.get("ready", True) is not False and not conditions.get("terminating"):
                found.update(endpoint.get("addresses") or [])
    return found


def pods_summary(pods: Iterable[PodView], *, serving: int, wanted: int) -> str:
    """One line for the worker: how many pods serve, and the most telling reason of the others."""
    others = [pod for pod in pods if not pod.serving]
    head = f"{serving}/{wanted} pods ready"
    if not others:
        return head
    # Problems a person must fix first; a pod merely loading its weights last.
    order = (
        "unschedulable",
        "image",
        "crash-looping",
        "container exited",
        "node",
        "being removed",
        "not ready",
        "loading",
        "starting",
        "waiting",
        "terminating",
    )

    def rank(pod: PodView) -> int:
        return next((index for index, word in enumerate(order) if pod.reason.startswith(word)), len(order))

    worst = min(others, key=rank)
    more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
    return f"{head}; pod {worst.name}: {worst.reason}{more}"
