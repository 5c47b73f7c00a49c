"""The `kubernetes` driver's reconciler: `manage.py engine_agent --driver kubernetes`.

It runs where it can reach the API server and the pods (in the cluster, with the RBAC of
deploy/kubernetes/base/reconciler-rbac.yaml), takes the workers of its host name whose driver is
`kubernetes` with the same compare-and-set claims as the local agent, and each pass, for each worker:

- creates its Secret (the engine's API key), Deployment and Service, and creates them again if someone
  deleted them;
- reads its pods and the Service's EndpointSlices into the worker: a pod the kubelet calls ready and the
  EndpointSlice controller lists is sent one real 1-token completion before the gateway may route to it
  (as the local agent does), and every other pod says why it is not serving (unschedulable for lack of
  GPUs, an image that cannot be pulled, a crash loop with its last log lines, OOMKilled, a node gone);
- scales: more replicas are one patch; fewer take the chosen pods out of routing first, wait (at least
  the time a route change takes to reach every gateway) until their running and waiting requests are 0,
  mark them as the ones to delete (pod-deletion-cost), then patch the Deployment's replicas;
- stops a worker the same way (all pods drained, then the objects deleted), and gives up on one whose pods
  crash-loop past ENGINE_MAX_CONSECUTIVE_FAILURES restarts (scaled to 0, so it holds no GPU, and FAILED).

Watches on pods, EndpointSlices and Deployments wake it as soon as something changes; it also passes every
`interval_s`. After each pass it moves the GPU budgets of aliases along (serving.engines.capacity)."""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from serving.engines import services as engine_services
from serving.engines.agent import AgentIdentity
from serving.engines.capacity import capacity_sync_all
from serving.engines.kubernetes.cluster import Cluster, ClusterError
from serving.engines.kubernetes.manifests import (
    CONTAINER,
    DELETION_COST,
    DRAINED_COST,
    PORT,
    WORKER_LABEL,
    EngineObject,
    engine_name,
    key_secret_name,
)
from serving.engines.kubernetes.spec import DeploymentSpec, SpecError
from serving.engines.kubernetes.status import PodView, pod_view, pods_summary, ready_addresses
from serving.engines.metrics import merge_replica_metrics
from serving.engines.probe import Scrape, engine_client, probe_readiness, scrape_metrics
from serving.models import EngineWorker

logger = logging.getLogger("serving.engines.kubernetes")

State = EngineWorker.State
Desired = EngineWorker.Desired
KUBERNETES = EngineWorker.Driver.KUBERNETES
# A drained pod is trusted to have nothing in flight only after every gateway has seen it leave routing
# (they poll the route generation every GATEWAY_ROUTE_POLL_S, 0.25 s by default; DESIGN.md allows 1 s).
ROUTE_PROPAGATION_S = 2.0
# API answers that no retry will change: the object is invalid, forbidden, or its namespace is missing.
PERMANENT = (400, 403, 404, 422)


@dataclass(frozen=True)
class ReconcilerConfig:
    host_name: str
    namespace: str
    default_image: str
    interval_s: float = 2.0
    claim_ttl_s: float = 30.0
    drain_timeout_s: float = 60.0
    start_timeout_s: float = 1800.0
    max_restarts: int = 5
    probe_timeout_s: float = 30.0
    log_lines: int = 20
    route_propagation_s: float = ROUTE_PROPAGATION_S
    # How often the serving pods' /metrics are read into the worker (queue, KV cache, counters).
    metrics_interval_s: float = 5.0

    @classmethod
    def from_settings(
        cls, *, host_name: str | None = None, interval_s: float | None = None
    ) -> ReconcilerConfig:
        return cls(
            host_name=host_name or settings.ENGINE_AGENT_HOST,
            namespace=settings.ENGINE_KUBERNETES_NAMESPACE,
            default_image=settings.ENGINE_KUBERNETES_IMAGE,
            interval_s=interval_s if interval_s is not None else 2.0,
            claim_ttl_s=settings.ENGINE_CLAIM_TTL_S,
            drain_timeout_s=settings.ENGINE_DRAIN_TIMEOUT_S,
            start_timeout_s=max(settings.ENGINE_START_TIMEOUT_S, 1800.0),
            max_restarts=settings.ENGINE_MAX_CONSECUTIVE_FAILURES,
            metrics_interval_s=settings.ENGINE_HEALTH_INTERVAL_S,
        )


def _epoch(stamp: str) -> float:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class KubernetesReconciler:
    def __init__(self, config: ReconcilerConfig, cluster: Cluster) -> None:
        self.config = config
        self.cluster = cluster
        self.identity = AgentIdentity.current(config.host_name)
        # Per worker: pods (name -> URL) that passed the 1-token probe at that address.
        self._verified: dict[int, dict[str, str]] = {}
        # (worker, pod) -> when it left routing, for a scale-down or a stop.
        self._drains: dict[tuple[int, str], float] = {}
        self._marked: set[tuple[int, str]] = set()
        # (worker, pod, restarts) -> the container's last log lines before that restart.
        self._logs: dict[tuple[int, str, int], str] = {}
        # Per worker: when its pods' metrics were last read.
        self._scraped: dict[int, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube-probe")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._renewed = -math.inf

    @property
    def claim(self) -> str:
        return self.identity.claim

    # --- the loop ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self, *, once: bool = False) -> None:
        """Pass until stopped. Unlike the local agent it leaves the engines running when it exits: they are
        the cluster's, and the next reconciler takes the workers over where this one left them."""
        logger.info(
            "kubernetes reconciler %s for host %r, namespace %r started",
            self.claim,
            self.config.host_name,
            self.config.namespace,
        )
        if not once:
            self.cluster.watch_changes(("Pod", "EndpointSlice", "Deployment"), self._wake.set, self._stop)
        try:
            while not self._stop.is_set():
                self._pass_retrying()
                if once:
                    break
                self._wake.wait(self.config.interval_s)
                self._wake.clear()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            if not connection.in_atomic_block:
                close_old_connections()
            for worker in EngineWorker.objects.filter(claimed_by=self.claim):
                engine_services.engine_claim_release(worker_id=worker.pk, agent=self.claim)
        except DatabaseError:
            logger.exception("kubernetes reconciler: database error while letting go of the workers")
        logger.info("kubernetes reconciler %s stopped", self.claim)

    def _pass_retrying(self) -> None:
        try:
            self.reconcile()
        except DatabaseError:
            logger.exception(
                "kubernetes reconciler: database error; retrying in %.1f s", self.config.interval_s
            )
            close_old_connections()

    def reconcile(self) -> None:
        """One pass over this host's Kubernetes workers, then the aliases' GPU budgets."""
        if not connection.in_atomic_block:
            close_old_connections()
        if time.monotonic() - self._renewed >= min(self.config.claim_ttl_s / 3, 5.0):
            engine_services.engine_claims_renew(agent=self.claim, ttl_s=self.config.claim_ttl_s)
            self._renewed = time.monotonic()
        workers = EngineWorker.objects.select_related("model_version").filter(
            driver=KUBERNETES, host_name=self.config.host_name
        )
        for worker in workers:
            try:
                self._reconcile_worker(worker)
            except ClusterError as exc:
                logger.warning("engine %s: the cluster answered %s", worker.pk, exc)
            except Exception:
                logger.exception("engine %s: reconcile failed", worker.pk)
        capacity_sync_all()

    # --- one worker -------------------------------------------------------------------------------

    def _owned(self, worker: EngineWorker) -> EngineWorker | None:
        if worker.claimed_by == self.claim:
            return worker
        running = worker.desired_state == Desired.RUNNING
        needs = worker.state in (State.PENDING, State.CRASHED, *engine_services.PROCESS_STATES) or (
            worker.state == State.STOPPED and running
        ) or (worker.state == State.FAILED and not running)
        if not needs:
            return None
        holder = worker.claimed_by
        dead = bool(holder) and self.identity.holder_is_dead(holder)
        expired = worker.claim_expires_at is not None and worker.claim_expires_at < timezone.now()
        if holder and not dead and not expired:
            return None
        claimed = engine_services.engine_claim(
            worker_id=worker.pk,
            agent=self.claim,
            ttl_s=self.config.claim_ttl_s,
            dead_claims=[holder] if dead else [],
        )
        if claimed is None:
            return None
        if claimed.previous_claim:
            logger.warning("engine %s: taken over from %s", worker.pk, claimed.previous_claim)
        return claimed.worker

    def _reconcile_worker(self, worker: EngineWorker) -> None:
        owned = self._owned(worker)
        if owned is None:
            return
        worker = owned
        running = worker.desired_state == Desired.RUNNING
        state = worker.state
        if state in (State.PENDING, State.CRASHED):
            if running:
                self._create(worker)
            else:
                engine_services.engine_stopped(
                    worker_id=worker.pk, agent=self.claim, reason="stopped before it started"
                )
        elif state in (State.STARTING, State.READY, State.UNHEALTHY):
            if running:
                self._observe(worker)
            elif engine_services.engine_drain_begin(
                worker_id=worker.pk, agent=self.claim, reason="stop requested"
            ):
                self._wake.set()
        elif state == State.DRAINING:
            self._stop_worker(worker)
        elif state == State.STOPPED:
            if running:
                engine_services.engine_pending(
                    worker_id=worker.pk, agent=self.claim, reason="start requested"
                )
                self._wake.set()
            else:
                engine_services.engine_claim_release(worker_id=worker.pk, agent=self.claim)
        elif state == State.FAILED:
            if not running:
                # A failed worker keeps its objects (scaled to 0) for a person to look at; stopping it cleans up.
                self._stop_worker(worker)
            else:
                engine_services.engine_claim_release(worker_id=worker.pk, agent=self.claim)

    def _object(self, worker: EngineWorker) -> EngineObject:
        version = worker.model_version
        return EngineObject(
            worker_id=worker.pk, namespace=self.config.namespace, version_label=version.label,
            artifact=version.artifact, served_model_name=version.served_model_name,
            engine_args=list(version.engine_args or []), spec=DeploymentSpec.from_dict(version.deployment),
            default_image=self.config.default_image, replicas=worker.replicas,
        )  # fmt: skip

    def _apply_objects(self, obj: EngineObject, api_key: str) -> None:
        self.cluster.apply(obj.secret(api_key))
        self.cluster.apply(obj.deployment())
        self.cluster.apply(obj.service())

    def _create(self, worker: EngineWorker) -> None:
        try:
            obj = self._object(worker)
        except (SpecError, ValueError) as exc:
            engine_services.engine_refused(
                worker_id=worker.pk, agent=self.claim, reason=f"cannot deploy: {exc}"
            )
            return
        # A key of its own per start, in a Secret the pods read (never in the Deployment's spec).
        api_key = secrets.token_urlsafe(24)
        base_url = f"http://{obj.name}.{self.config.namespace}.svc:{PORT}"
        started = engine_services.engine_start_begin(
            worker_id=worker.pk, agent=self.claim, port=PORT, base_url=base_url, api_key=api_key
        )
        if started is None:
            return
        self._verified.pop(worker.pk, None)
        self._scraped.pop(worker.pk, None)
        try:
            self._apply_objects(obj, api_key)
        except ClusterError as exc:
            if exc.status in PERMANENT:
                engine_services.engine_failed(
                    worker_id=worker.pk,
                    agent=self.claim,
                    reason=f"the cluster refused the engine's objects: {exc}",
                )
            else:
                engine_services.engine_waiting_note(
                    worker_id=worker.pk, agent=self.claim, detail=f"cannot reach the cluster: {exc}"
                )
            return
        logger.info(
            "engine %s: deployed %s (%s replicas) in %s",
            worker.pk,
            obj.name,
            obj.replicas,
            self.config.namespace,
        )

    def _views(self, worker: EngineWorker, obj: EngineObject) -> list[PodView]:
        pods = self.cluster.list("Pod", {WORKER_LABEL: str(worker.pk)})
        slices = self.cluster.list("EndpointSlice", {"kubernetes.io/service-name": obj.name})
        addresses = ready_addresses(slices)
        views = []
        for pod in pods:
            view = pod_view(pod, ready_addresses=addresses, gpus=obj.gpus)
            if view.crash_looping or view.reason.startswith("container exited"):
                lines = self._last_lines(worker.pk, view)
                if lines:
                    view = replace(view, reason=f"{view.reason}; last log lines: {lines}")
            views.append(view)
        return views

    def _last_lines(self, worker_id: int, view: PodView) -> str:
        key = (worker_id, view.name, view.restarts)
        if key not in self._logs:
            try:
                # A crash loop's current container is waiting: its last words are the previous run's.
                text = self.cluster.pod_log(
                    view.name,
                    container=CONTAINER,
                    previous=view.crash_looping or view.restarts > 0,
                    tail_lines=self.config.log_lines,
                )
            except ClusterError as exc:
                text = f"(no log: {exc})"
            self._logs[key] = " | ".join(
                line.strip() for line in text.strip().splitlines()[-self.config.log_lines :]
            )
        return self._logs[key]

    def _verify(self, worker: EngineWorker, views: list[PodView]) -> dict[str, str]:
        """Pods newly serving get one real 1-token completion; returns the failures by pod."""
        verified = self._verified.setdefault(worker.pk, {})
        live = {view.name for view in views if view.serving}
        for name in [n for n in verified if n not in live]:
            del verified[name]
        todo = [view for view in views if view.serving and verified.get(view.name) != view.url]
        name, key = worker.model_version.served_model_name, worker.api_key

        def probe(view: PodView) -> tuple[PodView, bool, str]:
            with engine_client(view.url, api_key=key, timeout_s=self.config.probe_timeout_s) as client:
                result = probe_readiness(client, served_model_name=name)
            return view, result.ok, result.detail

        failures = {}
        for view, ok, detail in self._pool.map(probe, todo):
            if ok:
                verified[view.name] = view.url
            else:
                failures[view.name] = detail
        return failures

    def _record_metrics(self, worker: EngineWorker, pods: list[dict[str, Any]]) -> None:
        """Every ENGINE_HEALTH_INTERVAL_S, the routable pods' /metrics summed into the worker's figures (the
        engine page's queue, KV cache and latency histograms, as the local agent records them for a process).
        A pod that does not answer is left out and named in the log; the figures say how many pods they cover."""
        now = time.monotonic()
        if now - self._scraped.get(worker.pk, -math.inf) < self.config.metrics_interval_s:
            return
        self._scraped[worker.pk] = now
        urls = [pod["url"] for pod in pods if pod["routable"]]
        key = worker.api_key
        scrapes = []
        for url, result in zip(urls, self._pool.map(lambda url: self._scrape(url, key), urls), strict=True):
            if result.metrics is None:
                logger.info("engine %s: no metrics from %s: %s", worker.pk, url, result.detail)
            else:
                scrapes.append(result.metrics)
        if scrapes:
            engine_services.engine_metrics_record(
                worker_id=worker.pk, agent=self.claim, metrics=merge_replica_metrics(scrapes)
            )

    @staticmethod
    def _scrape(url: str, api_key: str = "") -> Scrape:
        """A pod's /metrics: the routable pods' figures (`_record_metrics`) and a draining pod's requests in
        flight (`_drained`; the two never read the same pod in one pass)."""
        with engine_client(url, api_key=api_key, timeout_s=5.0) as client:
            return scrape_metrics(client)

    def _drained(self, worker_id: int, views: list[PodView]) -> bool:
        """Every pod in `views` is out of routing long enough and has nothing in flight (or its time is up)."""
        now = time.monotonic()
        pending = []
        for view in views:
            started = self._drains.setdefault((worker_id, view.name), now)
            if not view.serving:
                continue  # no address to be sent requests at: nothing in flight
            if now - started < self.config.route_propagation_s:
                pending.append(view)
                continue
            if now - started > self.config.drain_timeout_s:
                logger.warning(
                    "engine %s: pod %s still busy after %.0f s of draining; going on",
                    worker_id,
                    view.name,
                    self.config.drain_timeout_s,
                )
                continue
            if self._scrape(view.url).in_flight:
                pending.append(view)
        return not pending

    def _scale(self, worker: EngineWorker, deployment: dict[str, Any], views: list[PodView]) -> set[str]:
        """Bring the Deployment to the worker's replicas; returns the pods being drained for a scale-down."""
        name = engine_name(worker.pk)
        target = worker.replicas
        current = int((deployment.get("spec") or {}).get("replicas") or 0)
        mine = {key for key in self._drains if key[0] == worker.pk}
        if target >= current:
            for key in mine:
                self._drains.pop(key, None)
            if target > current:
                logger.info("engine %s: scaling %s from %s to %s replicas", worker.pk, name, current, target)
                self.cluster.patch("Deployment", name, {"spec": {"replicas": target}})
            return set()
        live = [view for view in views if not view.terminating]
        surplus = max(0, len(live) - target)
        # Pods already leaving first, then those not serving, then the newest of those serving.
        live.sort(key=lambda v: ((worker.pk, v.name) not in mine, v.serving, -_epoch(v.created)))
        victims = live[:surplus]
        for key in mine - {(worker.pk, v.name) for v in victims}:
            self._drains.pop(key, None)
        if not self._drained(worker.pk, victims):
            return {view.name for view in victims}
        for view in victims:
            if (worker.pk, view.name) not in self._marked:
                self.cluster.patch(
                    "Pod", view.name, {"metadata": {"annotations": {DELETION_COST: DRAINED_COST}}}
                )
                self._marked.add((worker.pk, view.name))
        logger.info(
            "engine %s: drained %s; scaling %s from %s to %s replicas",
            worker.pk,
            ", ".join(v.name for v in victims) or "nothing",
            name,
            current,
            target,
        )
        self.cluster.patch("Deployment", name, {"spec": {"replicas": target}})
        return {view.name for view in victims}

    @staticmethod
    def _pods_json(
        views: list[PodView], verified: dict[str, str], draining: set[str], failures: dict[str, str]
    ) -> list[dict[str, Any]]:
        rows = []
        for view in sorted(views, key=lambda v: v.name):
            ready = view.serving and verified.get(view.name) == view.url
            reason = view.reason
            if view.name in failures:
                reason = f"ready by its probe, but the 1-token completion failed: {failures[view.name]}"
            elif view.name in draining:
                reason = "draining: out of routing until its requests are done"
            rows.append(
                {
                    "name": view.name,
                    "url": view.url,
                    "node": view.node,
                    "ready": ready,
                    "routable": ready and view.name not in draining,
                    "draining": view.name in draining,
                    "restarts": view.restarts,
                    "reason": reason[:500],
                }
            )
        return rows

    def _observe(self, worker: EngineWorker) -> None:
        obj = self._object(worker)
        agent = self.claim
        deployment = self.cluster.get("Deployment", obj.name)
        if deployment is None:
            # Deleted behind the platform's back (or never created): deploy it again with the worker's key.
            self._apply_objects(obj, worker.api_key)
            engine_services.engine_waiting_note(
                worker_id=worker.pk, agent=agent, detail="its Deployment was missing; created it again"
            )
            return
        views = self._views(worker, obj)
        failures = self._verify(worker, views)
        draining = self._scale(worker, deployment, views)
        verified = self._verified.get(worker.pk, {})
        pods = self._pods_json(views, verified, draining, failures)
        routable = sum(1 for pod in pods if pod["routable"])
        by_name = {pod["name"]: pod for pod in pods}
        shown = [
            replace(v, reason=by_name[v.name]["reason"], ready=by_name[v.name]["routable"]) for v in views
        ]
        summary = pods_summary(shown, serving=routable, wanted=worker.replicas)
        engine_services.engine_pods_record(
            worker_id=worker.pk,
            agent=agent,
            pods=pods,
            ready_replicas=routable,
            reason=summary if worker.state == State.READY and routable else None,
        )
        if routable:
            self._record_metrics(worker, pods)
            if worker.state != State.READY and engine_services.engine_ready(worker_id=worker.pk, agent=agent):
                logger.info("engine %s: ready (%s)", worker.pk, summary)
                engine_services.engine_pods_record(
                    worker_id=worker.pk, agent=agent, pods=pods, ready_replicas=routable, reason=summary
                )
            return
        looping = [v for v in views if v.crash_looping and v.restarts >= self.config.max_restarts]
        started_at = worker.started_at or worker.state_changed_at or timezone.now()
        waited = (timezone.now() - started_at).total_seconds()
        if looping:
            self._give_up(worker, obj, f"pod {looping[0].name} is {by_name[looping[0].name]['reason']}")
        elif worker.state == State.STARTING and waited > self.config.start_timeout_s:
            self._give_up(worker, obj, f"not ready after {self.config.start_timeout_s:.0f} s: {summary}")
        elif worker.state == State.READY:
            logger.warning("engine %s: no pod serves: %s", worker.pk, summary)
            engine_services.engine_unhealthy(worker_id=worker.pk, agent=agent, detail=summary)
        elif worker.state == State.UNHEALTHY:
            engine_services.engine_health_record(worker_id=worker.pk, agent=agent, ok=False, detail=summary)
        else:
            engine_services.engine_waiting_note(worker_id=worker.pk, agent=agent, detail=summary)

    def _give_up(self, worker: EngineWorker, obj: EngineObject, reason: str) -> None:
        """Scale to 0 (a crash-looping pod must not keep its GPU) and wait for a person (FAILED)."""
        try:
            self.cluster.patch("Deployment", obj.name, {"spec": {"replicas": 0}})
        except ClusterError as exc:
            logger.warning("engine %s: could not scale to 0: %s", worker.pk, exc)
        logger.warning("engine %s: giving up: %s", worker.pk, reason)
        engine_services.engine_failed(worker_id=worker.pk, agent=self.claim, reason=reason)

    def _stop_worker(self, worker: EngineWorker) -> None:
        """DRAINING: every pod out of routing until its requests are done, then the objects deleted; STOPPED
        once no pod is left (until then its GPUs count as held)."""
        agent = self.claim
        name = engine_name(worker.pk)
        obj_views: list[PodView] = []
        deployment = self.cluster.get("Deployment", name)
        pods = self.cluster.list("Pod", {WORKER_LABEL: str(worker.pk)})
        if deployment is not None:
            slices = self.cluster.list("EndpointSlice", {"kubernetes.io/service-name": name})
            addresses = ready_addresses(slices)
            obj_views = [pod_view(pod, ready_addresses=addresses) for pod in pods]
            draining = {view.name for view in obj_views}
            engine_services.engine_pods_record(
                worker_id=worker.pk,
                agent=agent,
                ready_replicas=0,
                pods=self._pods_json(obj_views, self._verified.get(worker.pk, {}), draining, {}),
            )
            if not self._drained(worker.pk, obj_views):
                return
            for kind, object_name in (
                ("Deployment", name),
                ("Service", name),
                ("Secret", key_secret_name(worker.pk)),
            ):
                self.cluster.delete(kind, object_name)
            logger.info("engine %s: drained; deleted %s", worker.pk, name)
            pods = self.cluster.list("Pod", {WORKER_LABEL: str(worker.pk)})
        if pods:
            views = [pod_view(pod) for pod in pods]
            engine_services.engine_pods_record(
                worker_id=worker.pk,
                agent=agent,
                ready_replicas=0,
                pods=self._pods_json(views, {}, {view.name for view in views}, {}),
            )
            return
        for key in [key for key in self._drains if key[0] == worker.pk]:
            del self._drains[key]
        self._verified.pop(worker.pk, None)
        self._scraped.pop(worker.pk, None)
        engine_services.engine_pods_record(worker_id=worker.pk, agent=agent, pods=[], ready_replicas=0)
        engine_services.engine_stopped(worker_id=worker.pk, agent=agent, reason=f"stopped: {name} deleted")
