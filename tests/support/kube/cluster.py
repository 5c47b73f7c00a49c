"""The stand-in cluster's controllers, scheduler and kubelet, writing status the way the real ones do.

One thread ticks every few tens of milliseconds through what a cluster's control plane does:

- the Deployment controller keeps one ReplicaSet per pod template (`<name>-<hash>`, owned by the
  Deployment) and writes the Deployment's status (replicas, readyReplicas, availableReplicas,
  conditions Available/Progressing, observedGeneration);
- the ReplicaSet controller creates pods (`<rs>-<5 chars>`) and, scaling down, deletes them in the real
  controller's order: unscheduled, pending, not ready, lowest `controller.kubernetes.io/pod-deletion-cost`,
  most restarts, newest;
- the scheduler binds a pod to a node that has the `nvidia.com/gpu` it requests free, matches its
  nodeSelector and whose taints it tolerates, or sets PodScheduled=False/Unschedulable with the
  scheduler's message ("0/2 nodes are available: 2 Insufficient nvidia.com/gpu. ...");
- the kubelet gives a bound pod an address (127.N.x.y: every pod its own loopback address, port 8000
  for all, as pod IPs are), pulls its image (an unknown one is ErrImagePull, then ImagePullBackOff),
  runs its container, probes its startup and readiness probes over HTTP, restarts a crashing container
  with a growing back-off (CrashLoopBackOff, lastState.terminated, restartCount), keeps each run's log,
  and stops a deleted pod before it goes;
- the EndpointSlice controller lists every Service's pods with their ready/serving/terminating
  conditions (labels copied from the Service, `kubernetes.io/service-name`);
- the pod garbage collector removes pods whose node is gone (condition DisruptionTarget, reason
  DeletionByPodGC), and the garbage collector removes what a deleted owner owned.

A container is what its image says: `EngineImage` runs the vLLM-like stand-in engine
(tests/support/fake_engine.py) on the pod's address with the pod's VLLM_API_KEY (read from its Secret
like the kubelet does), `CrashingImage` prints its lines and exits."""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import http.client
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.fake_engine import FakeEngine
from tests.support.kube.api import ApiFailure, Store, now_rfc3339, selector_match

GPU = "nvidia.com/gpu"
TICK_S = 0.03
PROBE_EVERY_S = 0.1
BACKOFF_S, BACKOFF_MAX_S = 0.3, 1.5


@dataclass
class EngineImage:
    """Serves like vLLM after `load_s` (its /health is 503 until then)."""

    load_s: float = 0.0


@dataclass
class CrashingImage:
    """Prints `lines`, then exits with `exit_code` (`reason` OOMKilled for an out-of-memory kill)."""

    lines: list[str]
    exit_code: int = 1
    reason: str = "Error"


@dataclass
class ProcessImage:
    """Runs the container's own command line as a process of this machine: `python3` is this Python, a
    hostPath mount is its path on this machine, `--host` is the pod's address. So a pod of the vLLM image
    runs the real vLLM OpenAI server (on the CPU build here), exactly as the Deployment says."""

    log_dir: Path


Image = EngineImage | CrashingImage | ProcessImage


@dataclass
class Runtime:
    """The kubelet's own record of a pod's container (not in the API)."""

    ip: str
    runs: list[list[str]] = field(default_factory=list)
    server: FakeEngine | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    last_probe: float = 0.0
    ready_failures: int = 0
    started: bool = False
    ready: bool = False
    pull_tries: int = 0


def _template_hash(template: dict[str, Any]) -> str:
    digest = hashlib.sha256(repr(sorted(str(template).split())).encode()).hexdigest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(alphabet[int(digest[i : i + 2], 16) % len(alphabet)] for i in range(0, 20, 2))


def _condition(
    kind: str, status: bool, reason: str = "", message: str = "", previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    value = "True" if status else "False"
    stamp = (previous or {}).get("lastTransitionTime") if (previous or {}).get("status") == value else None
    condition = {"type": kind, "status": value, "lastTransitionTime": stamp or now_rfc3339()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def _owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return any(
        ref.get("uid") == owner["metadata"]["uid"] for ref in obj["metadata"].get("ownerReferences") or []
    )


def _gpus(pod: dict[str, Any]) -> int:
    total = 0
    for container in pod["spec"].get("containers") or []:
        resources = container.get("resources") or {}
        wanted = (resources.get("requests") or {}).get(GPU) or (resources.get("limits") or {}).get(GPU) or 0
        total += int(wanted)
    return total


def _pod_ready(pod: dict[str, Any]) -> bool:
    return _conditions(pod).get("Ready", {}).get("status") == "True"


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args else ""


class Cluster:
    def __init__(self, store: Store, *, nodes: dict[str, int]) -> None:
        self.store = store
        self.images: dict[str, Image] = {}
        self.runtimes: dict[str, Runtime] = {}  # pod uid ->
        # Pod addresses come from a loopback /16 of this cluster's own (several test processes may run
        # stand-ins at once); an address found taken is skipped, as an IPAM skips a leased one.
        self._subnet = random.randrange(20, 250)
        self._next_ip = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kube-controllers")
        self.errors: list[str] = []
        for name, gpus in nodes.items():
            self.node_add(name, gpus=gpus)

    # --- what a test does to the cluster ---------------------------------------------------------------

    def node_add(self, name: str, *, gpus: int, labels: dict[str, str] | None = None) -> None:
        self.store.create({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "status": {
                "capacity": {GPU: str(gpus), "cpu": "32", "memory": "256Gi", "pods": "110"},
                "allocatable": {GPU: str(gpus), "cpu": "32", "memory": "250Gi", "pods": "110"},
                "conditions": [_condition("Ready", True, "KubeletReady", "kubelet is posting ready status")],
                "addresses": [{"type": "InternalIP", "address": f"10.0.0.{len(self.store.list('Node')) + 1}"},
                              {"type": "Hostname", "address": name}],
            },
        })  # fmt: skip

    def node_remove(self, name: str) -> None:
        """The node disappears (deleted, as a cloud's node controller does for a vanished VM)."""
        self.store.remove("Node", "", name)

    def stub_of(self, pod_name: str, namespace: str) -> FakeEngine:
        pod = self.store.get("Pod", namespace, pod_name)
        assert pod is not None, f"no pod {pod_name}"
        runtime = self.runtimes[pod["metadata"]["uid"]]
        assert runtime.server is not None, f"pod {pod_name} runs no engine"
        return runtime.server

    def logs(self, namespace: str, name: str, container: str, previous: bool, tail: int | None) -> str:
        pod = self.store.get("Pod", namespace, name)
        if pod is None:
            raise ApiFailure(404, "NotFound", f'pods "{name}" not found')
        runtime = self.runtimes.get(pod["metadata"]["uid"])
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        waiting = (statuses[0].get("state") or {}).get("waiting")
        if runtime is None or not runtime.runs:
            reason = (waiting or {}).get("reason", "ContainerCreating")
            raise ApiFailure(
                400,
                "BadRequest",
                f'container "{container or "engine"}" in pod "{name}" is waiting to start: {reason}',
            )
        if previous:
            if len(runtime.runs) < 2 and not (waiting and waiting.get("reason") == "CrashLoopBackOff"):
                raise ApiFailure(
                    400,
                    "BadRequest",
                    f'previous terminated container "{container}" in pod "{name}" not found',
                )
            lines = runtime.runs[-1] if waiting else runtime.runs[-2]
        else:
            if waiting:
                raise ApiFailure(
                    400,
                    "BadRequest",
                    f'container "{container}" in pod "{name}" is waiting to start: {waiting.get("reason")}',
                )
            lines = runtime.runs[-1]
        shown = lines[-tail:] if tail else lines
        return "".join(line + "\n" for line in shown)

    # --- the loop ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """The node goes away, and its containers with it: a ProcessImage pod's process (a real vLLM server,
        some 3 GB) would otherwise outlive the test that started it."""
        self._stop.set()
        self._thread.join(timeout=10)
        for runtime in self.runtimes.values():
            if runtime.server is not None:
                runtime.server.stop()
            if runtime.process is not None:
                _stop_group(runtime.process)
                runtime.process = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # surfaced by the tests' fixture
                import traceback

                self.errors.append(traceback.format_exc())
                if len(self.errors) > 20:
                    raise
                del exc
            self._stop.wait(TICK_S)

    def tick(self) -> None:
        self._garbage_collect()
        self._deployments()
        self._replicasets()
        self._schedule()
        self._kubelet()
        self._endpointslices()

    # --- garbage collection -----------------------------------------------------------------------------

    def _garbage_collect(self) -> None:
        store = self.store
        nodes = {node["metadata"]["name"] for node in store.list("Node")}
        with store.lock:
            uids = {obj["metadata"]["uid"] for obj in store.objects.values()}
            for (kind, namespace, name), obj in list(store.objects.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if refs and not any(ref.get("uid") in uids for ref in refs):
                    store.delete(kind, namespace, name)
            for pod in store.list("Pod"):
                node = pod["spec"].get("nodeName")
                if node and node not in nodes:
                    # PodGC: the node is gone, and so is everything that ran there.
                    self._stop_runtime(pod)
                    status = pod.setdefault("status", {})
                    conditions = [
                        c for c in status.get("conditions") or [] if c["type"] != "DisruptionTarget"
                    ]
                    conditions.append(
                        _condition(
                            "DisruptionTarget", True, "DeletionByPodGC", "PodGC: node no longer exists"
                        )
                    )
                    status["conditions"] = conditions
                    status["phase"] = "Failed"
                    store.update(pod)
                    store.remove("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])

    # --- Deployment and ReplicaSet controllers ----------------------------------------------------------

    def _deployments(self) -> None:
        store = self.store
        for deployment in store.list("Deployment"):
            meta, spec = deployment["metadata"], deployment["spec"]
            namespace = meta["namespace"]
            template = copy.deepcopy(spec["template"])
            pod_hash = _template_hash(template)
            template["metadata"].setdefault("labels", {})["pod-template-hash"] = pod_hash
            name = f"{meta['name']}-{pod_hash}"
            owned = [rs for rs in store.list("ReplicaSet", namespace) if _owned_by(rs, deployment)]
            replicas = int(spec.get("replicas", 1))
            current = next((rs for rs in owned if rs["metadata"]["name"] == name), None)
            if current is None:
                store.create({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {"name": name, "namespace": namespace, "labels": dict(template["metadata"]["labels"]),
                                 "ownerReferences": [_owner_ref(deployment)]},
                    "spec": {"replicas": replicas,
                             "selector": {"matchLabels": {**spec["selector"]["matchLabels"], "pod-template-hash": pod_hash}},
                             "template": template},
                })  # fmt: skip
            elif current["spec"]["replicas"] != replicas:
                current["spec"]["replicas"] = replicas
                store.update(current)
            for old in owned:
                if old["metadata"]["name"] != name and old["spec"]["replicas"] != 0:
                    old["spec"]["replicas"] = 0  # maxSurge 0: the old pods go before new ones come
                    store.update(old)
            pods = [
                p
                for p in store.list("Pod", namespace)
                if any(_owned_by(p, rs) for rs in owned) and not p["metadata"].get("deletionTimestamp")
            ]
            ready = sum(1 for p in pods if _pod_ready(p))
            updated = sum(
                1 for p in pods if (p["metadata"].get("labels") or {}).get("pod-template-hash") == pod_hash
            )
            previous = _conditions(deployment)
            status: dict[str, Any] = {"observedGeneration": meta.get("generation", 1)}
            for key, value in (
                ("replicas", len(pods)),
                ("updatedReplicas", updated),
                ("readyReplicas", ready),
                ("availableReplicas", ready),
                ("unavailableReplicas", max(0, replicas - ready)),
            ):
                if value:
                    status[key] = value
            available = ready >= replicas
            status["conditions"] = [
                _condition("Available", available, "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                           "Deployment has minimum availability." if available else "Deployment does not have minimum availability.",
                           previous.get("Available")),
                _condition("Progressing", True, "NewReplicaSetAvailable" if available else "ReplicaSetUpdated",
                           f'ReplicaSet "{name}" has successfully progressed.' if available
                           else f'ReplicaSet "{name}" is progressing.', previous.get("Progressing")),
            ]  # fmt: skip
            if status != deployment.get("status"):
                deployment["status"] = status
                store.update(deployment)

    def _replicasets(self) -> None:
        store = self.store
        for rs in store.list("ReplicaSet"):
            namespace = rs["metadata"]["namespace"]
            pods = [
                p
                for p in store.list("Pod", namespace)
                if _owned_by(p, rs) and not p["metadata"].get("deletionTimestamp")
            ]
            wanted = int(rs["spec"].get("replicas", 1))
            for _ in range(wanted - len(pods)):
                template = copy.deepcopy(rs["spec"]["template"])
                pod_spec = template["spec"]
                pod_spec.setdefault("restartPolicy", "Always")
                pod_spec.setdefault("schedulerName", "default-scheduler")
                pod_spec.setdefault("dnsPolicy", "ClusterFirst")
                store.create(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "generateName": f"{rs['metadata']['name']}-",
                            "namespace": namespace,
                            "labels": template["metadata"]["labels"],
                            "ownerReferences": [_owner_ref(rs)],
                        },
                        "spec": pod_spec,
                        "status": {"phase": "Pending", "qosClass": "Burstable"},
                    }
                )
            if len(pods) > wanted:

                def rank(pod: dict[str, Any]) -> tuple[Any, ...]:
                    annotations = pod["metadata"].get("annotations") or {}
                    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
                    phase = (pod.get("status") or {}).get("phase")
                    return (
                        bool(pod["spec"].get("nodeName")),
                        phase != "Pending",
                        _pod_ready(pod),
                        int(annotations.get("controller.kubernetes.io/pod-deletion-cost", "0")),
                        -int(statuses[0].get("restartCount", 0)),
                        _negated(pod["metadata"]["creationTimestamp"]),
                    )

                for pod in sorted(pods, key=rank)[: len(pods) - wanted]:
                    store.delete("Pod", namespace, pod["metadata"]["name"])
            ready = sum(1 for p in pods if _pod_ready(p))
            status = {
                "replicas": len(pods),
                "fullyLabeledReplicas": len(pods),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "observedGeneration": rs["metadata"].get("generation", 1),
            }
            status = {k: v for k, v in status.items() if v or k == "replicas"}
            if status != rs.get("status"):
                rs["status"] = status
                store.update(rs)

    # --- the scheduler ----------------------------------------------------------------------------------

    def _schedule(self) -> None:
        store = self.store
        nodes = store.list("Node")
        pods = store.list("Pod")
        used: dict[str, int] = {}
        for pod in pods:
            node = pod["spec"].get("nodeName")
            if node and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                used[node] = used.get(node, 0) + _gpus(pod)
        for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["name"]):
            if pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
                continue
            need = _gpus(pod)
            reasons: dict[str, int] = {}
            chosen = None
            for node in nodes:
                name = node["metadata"]["name"]
                why = self._unfit(pod, node, need, used.get(name, 0))
                if why:
                    reasons[why] = reasons.get(why, 0) + 1
                elif chosen is None:
                    chosen = name
            status = pod.setdefault("status", {"phase": "Pending"})
            previous = _conditions(pod).get("PodScheduled")
            if chosen is None:
                detail = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items()))
                total = len(nodes)
                message = (
                    (
                        f"0/{total} nodes are available: {detail}. preemption: 0/{total} nodes are available: "
                        f"{total} No preemption victims found for incoming pod."
                    )
                    if total
                    else "no nodes available to schedule pods"
                )
                condition = _condition("PodScheduled", False, "Unschedulable", message, previous)
                if previous != condition:
                    status["conditions"] = [condition]
                    store.update(pod)
                continue
            used[chosen] = used.get(chosen, 0) + need
            pod["spec"]["nodeName"] = chosen
            status["conditions"] = [_condition("PodScheduled", True, previous=previous)]
            store.update(pod)

    @staticmethod
    def _unfit(pod: dict[str, Any], node: dict[str, Any], need: int, used: int) -> str:
        labels = node["metadata"].get("labels") or {}
        selector = pod["spec"].get("nodeSelector") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            return "node(s) didn't match Pod's node affinity/selector"
        tolerations = pod["spec"].get("tolerations") or []
        for taint in (node.get("spec") or {}).get("taints") or []:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            tolerated = any(
                (t.get("key") in (None, taint["key"]) or (t.get("operator") == "Exists" and not t.get("key")))
                and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
                and t.get("effect") in (None, "", taint["effect"])
                for t in tolerations
            )
            if not tolerated:
                return f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"
        if not _conditions(node).get("Ready", {}).get("status") == "True":
            return "node(s) were not ready"
        capacity = int((node.get("status") or {}).get("allocatable", {}).get(GPU, "0"))
        if need and need > capacity - used:
            return f"Insufficient {GPU}"
        return ""

    # --- the kubelet ------------------------------------------------------------------------------------

    def _address(self) -> str:
        n = self._next_ip
        self._next_ip += 1
        return f"127.{self._subnet}.{n // 250}.{n % 250 + 1}"

    def _secret_value(self, namespace: str, ref: dict[str, Any]) -> str:
        import base64

        secret = self.store.get("Secret", namespace, ref["name"]) or {}
        if ref["key"] in (secret.get("stringData") or {}):
            return str(secret["stringData"][ref["key"]])
        data = (secret.get("data") or {}).get(ref["key"])
        return base64.b64decode(data).decode() if data else ""

    def _stop_runtime(self, pod: dict[str, Any]) -> None:
        runtime = self.runtimes.get(pod["metadata"]["uid"])
        if runtime is None:
            return
        if runtime.server is not None:
            runtime.server.stop()
            runtime.server = None
        if runtime.process is not None:
            _stop_group(runtime.process)
            runtime.process = None

    def _kubelet(self) -> None:
        store = self.store
        nodes = {node["metadata"]["name"] for node in store.list("Node")}
        now = time.monotonic()
        for pod in store.list("Pod"):
            node = pod["spec"].get("nodeName")
            if not node or node not in nodes:
                continue
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                # SIGTERM; the drain before it is the reconciler's work. Then the pod object goes.
                self._stop_runtime(pod)
                store.remove("Pod", meta["namespace"], meta["name"])
                continue
            runtime = self.runtimes.get(meta["uid"])
            if runtime is None:
                runtime = self.runtimes[meta["uid"]] = Runtime(ip=self._address())
            before = copy.deepcopy(pod)
            self._run(pod, runtime, now)
            if pod != before:
                store.update(pod)

    def _run(self, pod: dict[str, Any], runtime: Runtime, now: float) -> None:
        container = pod["spec"]["containers"][0]
        image = self.images.get(container["image"])
        status = pod.setdefault("status", {})
        status["podIP"] = runtime.ip
        status["podIPs"] = [{"ip": runtime.ip}]
        status["hostIP"] = "10.0.0.1"
        status.setdefault("startTime", now_rfc3339())
        previous = _conditions(pod)
        statuses = status.get("containerStatuses") or [{}]
        current = statuses[0]
        restarts = int(current.get("restartCount", 0))
        base = {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "restartCount": restarts,
        }
        if image is None:
            runtime.pull_tries += 1
            reason = "ErrImagePull" if runtime.pull_tries < 3 else "ImagePullBackOff"
            message = (
                (
                    f'failed to pull and unpack image "{container["image"]}": failed to resolve reference '
                    f'"{container["image"]}": not found'
                )
                if reason == "ErrImagePull"
                else f'Back-off pulling image "{container["image"]}"'
            )
            state: dict[str, Any] = {"waiting": {"reason": reason, "message": message}}
            self._write(pod, base, state, ready=False, started=False, previous=previous)
            return
        base["imageID"] = (
            f"{container['image']}@sha256:{hashlib.sha256(container['image'].encode()).hexdigest()}"
        )
        if isinstance(image, CrashingImage):
            self._crash(pod, runtime, image, base, current, now, previous)
            return
        if isinstance(image, ProcessImage):
            self._process(pod, runtime, image, base, current, now, previous)
            return
        if runtime.server is None:
            env = {
                e["name"]: (
                    e.get("value")
                    if "value" in e
                    else self._secret_value(pod["metadata"]["namespace"], e["valueFrom"]["secretKeyRef"])
                )
                for e in container.get("env") or []
            }
            args = container.get("args") or []
            served_name = _arg(args, "--served-model-name")
            for _ in range(20):
                try:
                    runtime.server = FakeEngine(
                        served_name=served_name,
                        api_key=env.get("VLLM_API_KEY") or "",
                        health_status=503 if image.load_s else 200,
                        host=runtime.ip,
                        port=int(_arg(args, "--port") or 8000),
                    ).start()
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    runtime.ip = self._address()
                    status["podIP"], status["podIPs"] = runtime.ip, [{"ip": runtime.ip}]
            assert runtime.server is not None, "no free pod address"
            runtime.started_at = now
            runtime.runs.append(
                [
                    f"INFO: serving {served_name} on http://{runtime.ip}:{_arg(args, '--port')}",
                    "INFO:     Application startup complete.",
                ]
            )
            base["containerID"] = (
                f"containerd://{hashlib.sha256(pod['metadata']['uid'].encode()).hexdigest()}"
            )
        server = runtime.server
        if (
            image.load_s
            and server.health_status == 503
            and now - runtime.started_at >= image.load_s
        ):
            server.health_status = 200
        if now - runtime.last_probe >= PROBE_EVERY_S:
            runtime.last_probe = now
            healthy = self._probe(runtime.ip, container)
            if not runtime.started:
                runtime.started = healthy
            if runtime.started:
                threshold = int((container.get("readinessProbe") or {}).get("failureThreshold", 3))
                runtime.ready_failures = 0 if healthy else runtime.ready_failures + 1
                runtime.ready = healthy or (runtime.ready and runtime.ready_failures < threshold)
        base["containerID"] = base.get("containerID") or current.get("containerID", "")
        state = {
            "running": {
                "startedAt": current.get("state", {}).get("running", {}).get("startedAt") or now_rfc3339()
            }
        }
        self._write(pod, base, state, ready=runtime.ready, started=runtime.started, previous=previous)

    def _env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        return {
            e["name"]: (
                e["value"] if "value" in e else self._secret_value(namespace, e["valueFrom"]["secretKeyRef"])
            )
            for e in container.get("env") or []
        }

    def _process(
        self,
        pod: dict[str, Any],
        runtime: Runtime,
        image: ProcessImage,
        base: dict[str, Any],
        current: dict[str, Any],
        now: float,
        previous: dict[str, dict[str, Any]],
    ) -> None:
        container = pod["spec"]["containers"][0]
        if runtime.process is None:
            host_paths = {
                m["mountPath"]: v["hostPath"]["path"]
                for v in pod["spec"].get("volumes") or []
                for m in container.get("volumeMounts") or []
                if m["name"] == v["name"] and "hostPath" in v
            }
            args = [*container.get("command", []), *container.get("args", [])]
            args = [sys.executable if a == "python3" else host_paths.get(a, a) for a in args]
            if "--host" in args:
                args[args.index("--host") + 1] = runtime.ip
            image.log_dir.mkdir(parents=True, exist_ok=True)
            runtime.log_path = image.log_dir / f"{pod['metadata']['name']}.log"
            env = {**os.environ, **self._env(pod, container), "PYTHONUNBUFFERED": "1"}
            with runtime.log_path.open("ab") as log:
                # Its own process group: the pod's stop (SIGTERM to the group) takes its children too.
                runtime.process = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            runtime.runs.append([])
            runtime.started_at = now
            base["containerID"] = f"containerd://{runtime.process.pid}"
        process = runtime.process
        runtime.runs[-1] = (
            runtime.log_path.read_text(errors="replace").splitlines()[-200:] if runtime.log_path else []
        )
        code = process.poll()
        if code is not None:
            runtime.process = None
            restarts = int(current.get("restartCount", 0)) + 1
            base["restartCount"] = restarts
            base["lastState"] = {
                "terminated": {
                    "exitCode": code if code >= 0 else 128 - code,
                    "reason": "Error",
                    "startedAt": now_rfc3339(),
                    "finishedAt": now_rfc3339(),
                }
            }
            state: dict[str, Any] = {
                "waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}
            }
            self._write(pod, base, state, ready=False, started=False, previous=previous)
            return
        if now - runtime.last_probe >= PROBE_EVERY_S:
            runtime.last_probe = now
            healthy = self._probe(runtime.ip, container)
            runtime.started = runtime.started or healthy
            runtime.ready = healthy if runtime.started else False
        base["containerID"] = current.get("containerID") or f"containerd://{process.pid}"
        state = {
            "running": {
                "startedAt": current.get("state", {}).get("running", {}).get("startedAt") or now_rfc3339()
            }
        }
        self._write(pod, base, state, ready=runtime.ready, started=runtime.started, previous=previous)

    def _probe(self, ip: str, container: dict[str, Any]) -> bool:
        probe = container.get("readinessProbe") or container.get("startupProbe") or {}
        path = (probe.get("httpGet") or {}).get("path", "/health")
        try:
            connection = http.client.HTTPConnection(ip, 8000, timeout=0.5)
            connection.request("GET", path)
            ok = 200 <= connection.getresponse().status < 400
            connection.close()
            return ok
        except OSError:
            return False

    def _crash(
        self,
        pod: dict[str, Any],
        runtime: Runtime,
        image: CrashingImage,
        base: dict[str, Any],
        current: dict[str, Any],
        now: float,
        previous: dict[str, dict[str, Any]],
    ) -> None:
        waiting = (current.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff" and now < runtime.restart_at:
            return
        # The container runs, prints its lines and exits: one more restart, and a back-off before the next.
        started = now_rfc3339()
        runtime.runs.append(list(image.lines))
        restarts = int(current.get("restartCount", 0)) + 1
        base["restartCount"] = restarts
        run_id = f"{pod['metadata']['uid']}/{restarts}"
        base["containerID"] = f"containerd://{hashlib.sha256(run_id.encode()).hexdigest()}"
        base["lastState"] = {
            "terminated": {
                "exitCode": image.exit_code,
                "reason": image.reason,
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": base["containerID"],
            }
        }
        delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** max(0, restarts - 1))
        runtime.restart_at = now + delay
        state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:.0f}s restarting failed container={base['name']} "
                f"pod={pod['metadata']['name']}_{pod['metadata']['namespace']}",
            }
        }
        self._write(pod, base, state, ready=False, started=False, previous=previous)

    @staticmethod
    def _write(
        pod: dict[str, Any],
        base: dict[str, Any],
        state: dict[str, Any],
        *,
        ready: bool,
        started: bool,
        previous: dict[str, dict[str, Any]],
    ) -> None:
        status = pod["status"]
        container_status = {**base, "state": state, "ready": ready, "started": started}
        if not container_status.get("containerID"):
            container_status.pop("containerID", None)
        status["containerStatuses"] = [container_status]
        status["phase"] = "Running" if "running" in state else "Pending"
        not_ready = "containers with unready status: [engine]"
        status["conditions"] = [
            _condition("PodScheduled", True, previous=previous.get("PodScheduled")),
            _condition("Initialized", True, previous=previous.get("Initialized")),
            _condition("ContainersReady", ready, "" if ready else "ContainersNotReady", "" if ready else not_ready,
                       previous.get("ContainersReady")),
            _condition("Ready", ready, "" if ready else "ContainersNotReady", "" if ready else not_ready,
                       previous.get("Ready")),
        ]  # fmt: skip

    # --- EndpointSlices ---------------------------------------------------------------------------------

    def _endpointslices(self) -> None:
        store = self.store
        for service in store.list("Service"):
            meta = service["metadata"]
            namespace, name = meta["namespace"], meta["name"]
            selector = (service.get("spec") or {}).get("selector") or {}
            if not selector:
                continue
            text = ",".join(f"{k}={v}" for k, v in selector.items())
            pods = [
                p
                for p in store.list("Pod", namespace)
                if selector_match(text, p["metadata"].get("labels") or {})
                and (p.get("status") or {}).get("podIP")
            ]
            endpoints = []
            for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
                terminating = bool(pod["metadata"].get("deletionTimestamp"))
                ready = _pod_ready(pod)
                endpoints.append({
                    "addresses": [pod["status"]["podIP"]],
                    "conditions": {"ready": ready and not terminating, "serving": ready, "terminating": terminating},
                    "nodeName": pod["spec"].get("nodeName", ""),
                    "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": namespace,
                                  "uid": pod["metadata"]["uid"]},
                })  # fmt: skip
            ports = [
                {
                    "name": port.get("name", ""),
                    "port": 8000
                    if isinstance(port.get("targetPort"), str)
                    else int(port.get("targetPort") or port["port"]),
                    "protocol": port.get("protocol", "TCP"),
                }
                for port in service["spec"].get("ports") or []
            ]
            slice_name = f"{name}-{_template_hash({'svc': meta['uid']})[:5]}"
            labels = {
                **(meta.get("labels") or {}),
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            }
            current = store.get("EndpointSlice", namespace, slice_name)
            wanted = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name,
                    "namespace": namespace,
                    "labels": labels,
                    "ownerReferences": [{**_owner_ref(service), "apiVersion": "v1"}],
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            }
            if current is None:
                store.create(wanted)
            elif (current["endpoints"], current["ports"], current["metadata"].get("labels")) != (
                endpoints,
                ports,
                labels,
            ):
                current.update(endpoints=endpoints, ports=ports)
                current["metadata"]["labels"] = labels
                store.update(current)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the container's process group (vLLM takes its engine core down with it), SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _negated(stamp: str) -> tuple[int, ...]:
    """Newest first in an ascending sort."""
    return tuple(-ord(c) for c in stamp)
