"""The engine agent: one per host, reconciling each engine worker's desired state with what runs.

One pass every `interval_s`: renew this agent's claims, then for every worker of its host decide the next
step from the row and from the processes it runs. Everything that waits on the network (readiness,
health, the metrics scrape, drain checks) runs in a thread pool, one job per worker at a time, so a slow
engine never stalls the others; the decisions, the database writes and every process launch stay on the
main thread (a child's PR_SET_PDEATHSIG is tied to the thread that forked it).

Local engines die with the agent, however it dies (SIGTERM via PDEATHSIG), so on start an agent owns no
process: workers claimed by an agent that is gone are reset and started again."""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from serving.engines import services as engine_services
from serving.engines.capacity import capacity_sync_all
from serving.engines.command import engine_build, gpu_count
from serving.engines.drivers import LocalEngine, free_port, local_start, log_tail, stale_engine_kill
from serving.engines.flavors import flavor_get
from serving.engines.gpus import GpuFitError, gpus_assign, gpus_parse, host_gpus
from serving.engines.probe import (
    ProbeResult,
    Scrape,
    engine_client,
    probe_health,
    probe_readiness,
    scrape_metrics,
)
from serving.models import EngineWorker

logger = logging.getLogger("serving.engines.agent")

State = EngineWorker.State
Desired = EngineWorker.Desired
Driver = EngineWorker.Driver

# On SIGTERM the agent has about 5 s before a supervisor (honcho) sends SIGKILL: a short drain, then
# SIGTERM to the engines (vLLM exits in about 3 s), then SIGKILL to what is left.
SHUTDOWN_DRAIN_S = 1.0
SHUTDOWN_TERM_WAIT_S = 3.0
READINESS_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 10.0
PROBE_THREADS = 8


@dataclass(frozen=True)
class AgentConfig:
    host_name: str
    interval_s: float = 1.0
    health_interval_s: float = 5.0
    unhealthy_after: int = 2
    start_timeout_s: float = 600.0
    backoff_base_s: float = 5.0
    backoff_max_s: float = 300.0
    max_failures: int = 5
    drain_timeout_s: float = 60.0
    stop_grace_s: float = 15.0
    claim_ttl_s: float = 30.0
    # Ready this long without a crash: the run of failures is forgiven.
    stable_after_s: float = 60.0
    log_dir: Path = Path("var/engines")
    bind_host: str = "127.0.0.1"
    public_host: str = "127.0.0.1"
    cpus: frozenset[int] | None = None
    build: str = "cpu"
    # The GPUs this host's engines share out (empty on the CPU build).
    gpus: tuple[str, ...] = ()
    drain_no_signal_s: float = 10.0
    # Local engine processes this agent runs at once at most (0: no limit); past it a worker waits, pending.
    max_local_engines: int = 0

    @classmethod
    def from_settings(cls, *, host_name: str | None = None, interval_s: float | None = None) -> AgentConfig:
        return cls(
            host_name=host_name or settings.ENGINE_AGENT_HOST,
            interval_s=interval_s if interval_s is not None else 1.0,
            health_interval_s=settings.ENGINE_HEALTH_INTERVAL_S,
            unhealthy_after=settings.ENGINE_UNHEALTHY_AFTER,
            start_timeout_s=settings.ENGINE_START_TIMEOUT_S,
            backoff_base_s=settings.ENGINE_RESTART_BACKOFF_S,
            backoff_max_s=settings.ENGINE_RESTART_BACKOFF_MAX_S,
            max_failures=settings.ENGINE_MAX_CONSECUTIVE_FAILURES,
            drain_timeout_s=settings.ENGINE_DRAIN_TIMEOUT_S,
            stop_grace_s=settings.ENGINE_STOP_GRACE_S,
            claim_ttl_s=settings.ENGINE_CLAIM_TTL_S,
            log_dir=Path(settings.ENGINE_LOG_DIR),
            bind_host=settings.ENGINE_BIND_HOST,
            public_host=settings.ENGINE_PUBLIC_HOST,
            cpus=settings.ENGINE_CPUS,
            build=(build := engine_build(settings.ENGINE_BUILD)),
            gpus=host_gpus(gpus_parse(settings.ENGINE_GPUS), os.environ) if build == "cuda" else (),
            drain_no_signal_s=settings.ENGINE_DRAIN_NO_SIGNAL_S,
            max_local_engines=settings.ENGINE_MAX_LOCAL_ENGINES,
        )


@dataclass(frozen=True)
class AgentIdentity:
    """`host/machine/pid/nonce`: unique per agent process, and telling another agent on the same machine
    whether the holder of a claim is still alive."""

    host_name: str
    machine: str
    pid: int
    nonce: str

    @classmethod
    def current(cls, host_name: str) -> AgentIdentity:
        return cls(host_name=host_name[:60], machine=socket.gethostname()[:40], pid=os.getpid(),
                   nonce=uuid.uuid4().hex[:8])

    @property
    def claim(self) -> str:
        return f"{self.host_name}/{self.machine}/{self.pid}/{self.nonce}"

    def holder_is_dead(self, claim: str) -> bool:
        """True if `claim` names an agent process on this machine that no longer exists."""
        parts = claim.rsplit("/", 3)
        if len(parts) != 4 or parts[1] != self.machine or not parts[2].isdigit() or claim == self.claim:
            return False
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def last_words(tail: str) -> str:
    """The last line of a log tail that looks like an error ("" if none does): why the engine died."""
    for line in reversed(tail.splitlines()):
        if any(mark in line for mark in ("Error", "error:", "Exception", "Traceback", "Killed")):
            return line.strip()[-300:]
    return ""


@dataclass
class _Job:
    kind: str  # ready | health | drain
    future: Future[tuple[ProbeResult | None, Scrape | None]]


class EngineAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity = AgentIdentity.current(config.host_name)
        self.engines: dict[int, LocalEngine] = {}
        self._jobs: dict[int, _Job] = {}
        self._pool = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="engine-probe")
        self._health_failures: dict[int, int] = {}
        # When each worker may be probed again: a probe's answer wakes the loop, and without this a
        # refused connection would be retried in a hot loop.
        self._next_probe: dict[int, float] = {}
        self._tails: dict[int, str] = {}
        self._renewed = -math.inf
        self._stop = threading.Event()
        self._wake = threading.Event()

    @property
    def claim(self) -> str:
        return self.identity.claim

    # --- the loop ---------------------------------------------------------------------------------

    @staticmethod
    def _fresh_connection() -> None:
        # A long-lived process must drop a connection the database closed (CONN_MAX_AGE, a restart);
        # inside a transaction (a test's) the connection is the caller's to keep.
        if not connection.in_atomic_block:
            close_old_connections()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """From a signal handler: finish the current pass, then stop every engine and exit."""
        self._stop.set()
        self._wake.set()

    def run(self, *, once: bool = False) -> None:
        logger.info("engine agent %s for host %r started", self.claim, self.config.host_name)
        try:
            while not self._stop.is_set():
                self._reconcile_retrying()
                if once:
                    self.wait_for_jobs()
                    self._reconcile_retrying()
                    break
                self._wake.wait(self.config.interval_s)
                self._wake.clear()
        finally:
            self.shutdown()

    def _reconcile_retrying(self) -> None:
        try:
            self.reconcile()
        except DatabaseError:
            # The database restarting must not take the engines down with the agent: retry next pass. Claims
            # not renewed meanwhile expire, and a claim found lost stops that engine.
            logger.exception("engine agent: database error; retrying in %.1f s", self.config.interval_s)
            close_old_connections()

    def wait_for_jobs(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for job in list(self._jobs.values()):
            job.future.exception(timeout=max(0.0, deadline - time.monotonic()))

    def reconcile(self) -> None:
        """One pass over this host's workers."""
        self._fresh_connection()
        self._apply_finished_jobs()
        # Renewed well inside the TTL, but not every pass: on SQLite every write takes the database's lock.
        if time.monotonic() - self._renewed >= min(self.config.claim_ttl_s / 3, 5.0):
            engine_services.engine_claims_renew(agent=self.claim, ttl_s=self.config.claim_ttl_s)
            self._renewed = time.monotonic()
        # Kubernetes workers of the same host name are the kubernetes reconciler's (--driver kubernetes).
        workers = list(EngineWorker.objects.select_related("model_version").filter(host_name=self.config.host_name)
                       .exclude(driver=Driver.KUBERNETES))
        present = set()
        for worker in workers:
            present.add(worker.pk)
            try:
                self._reconcile_worker(worker)
            except Exception:
                # One worker's trouble (a bad artifact, a database hiccup) must not stop the others.
                logger.exception("engine %s: reconcile failed", worker.pk)
        for worker_id in [wid for wid in self.engines if wid not in present]:
            logger.warning("engine %s: its worker row is gone; stopping its process", worker_id)
            self.engines.pop(worker_id).kill()
        # GPU budgets move on when replicas become ready or go (serving.engines.capacity).
        capacity_sync_all()

    # --- one worker -------------------------------------------------------------------------------

    def _needs_owner(self, worker: EngineWorker) -> bool:
        running = worker.desired_state == Desired.RUNNING
        if worker.state in (State.PENDING, State.CRASHED):
            return True  # to start it, or to mark it stopped
        if worker.state == State.STOPPED:
            return running
        return worker.state in engine_services.PROCESS_STATES

    def _claim(self, worker: EngineWorker) -> EngineWorker | None:
        holder = worker.claimed_by
        now = timezone.now()
        dead = holder and self.identity.holder_is_dead(holder)
        expired = worker.claim_expires_at is not None and worker.claim_expires_at < now
        if holder and not dead and not expired:
            return None  # another live agent owns it
        claimed = engine_services.engine_claim(worker_id=worker.pk, agent=self.claim, ttl_s=self.config.claim_ttl_s,
                                               dead_claims=[holder] if dead else [])
        if claimed is None:
            return None
        if claimed.previous_claim:
            logger.warning("engine %s: taken over from %s", worker.pk, claimed.previous_claim)
            if claimed.previous_pid and claimed.previous_claim.rsplit("/", 3)[1:2] == [self.identity.machine]:
                # PDEATHSIG should have ended it with its agent; make sure before a second one starts.
                stale_engine_kill(pid=claimed.previous_pid, port=claimed.previous_port)
        return claimed.worker

    def _reconcile_worker(self, worker: EngineWorker) -> None:
        if worker.claimed_by != self.claim:
            if worker.pk in self.engines:
                # Someone took the worker while this agent stalled: two processes for one worker must not be.
                logger.error("engine %s: claim lost to %r; stopping its process", worker.pk, worker.claimed_by)
                self.engines.pop(worker.pk).kill()
                return
            if not self._needs_owner(worker):
                return
            claimed = self._claim(worker)
            if claimed is None:
                return
            worker = claimed
        local = worker.driver == Driver.LOCAL
        engine = self.engines.get(worker.pk)
        if local and engine is not None:
            self._record_log_tail(worker.pk, engine)
            code = engine.exit_code()
            if code is not None:
                # Even with a probe out: its answer no longer fits the row's state and is refused.
                self._on_exit(worker, engine, code)
                return
        if worker.pk in self._jobs:
            return  # a probe is out; its answer decides the next step
        running = worker.desired_state == Desired.RUNNING
        state = worker.state
        if state == State.PENDING:
            if not running:
                engine_services.engine_stopped(worker_id=worker.pk, agent=self.claim, reason="stopped before it started")
            elif worker.next_start_at is None or worker.next_start_at <= timezone.now():
                self._start(worker)
        elif state == State.CRASHED:
            if not running:
                engine_services.engine_stopped(worker_id=worker.pk, agent=self.claim, reason="stopped after a crash")
                return
            if worker.next_start_at is not None and worker.next_start_at > timezone.now():
                return  # backing off
            pending = engine_services.engine_restart_due(worker_id=worker.pk, agent=self.claim)
            if pending is not None:
                self._start(pending)
        elif state in (State.STARTING, State.READY, State.UNHEALTHY):
            if local and engine is None:
                self._failed(worker, "the agent has no process for it")
            elif not running:
                engine_services.engine_drain_begin(worker_id=worker.pk, agent=self.claim, reason="stop requested")
                self._wake.set()
            elif state == State.STARTING:
                self._check_starting(worker, engine)
            else:
                self._check_health(worker, engine)
        elif state == State.DRAINING:
            self._drain(worker, engine)
        elif state == State.STOPPED:
            if running:
                engine_services.engine_pending(worker_id=worker.pk, agent=self.claim, reason="start requested")
                self._wake.set()
            else:
                engine_services.engine_claim_release(worker_id=worker.pk, agent=self.claim)
        elif state == State.FAILED:
            engine_services.engine_claim_release(worker_id=worker.pk, agent=self.claim)

    def _start(self, worker: EngineWorker) -> None:
        if worker.driver == Driver.STATIC:
            started = engine_services.engine_start_begin(worker_id=worker.pk, agent=self.claim, port=None,
                                                         base_url=worker.base_url)
            if started is not None:
                logger.info("engine %s: probing static endpoint %s", worker.pk, worker.base_url)
                self._submit(started, "ready")
            return
        cap = self.config.max_local_engines
        if cap and len(self.engines) >= cap:
            # Memory, not GPUs, is what a CPU host runs out of: the oldest waiting worker starts first when
            # one of the running engines has stopped (workers are visited in the order they were created).
            engine_services.engine_pending_note(worker_id=worker.pk, agent=self.claim, reason=(
                f"waiting for a free slot: {len(self.engines)} local engines run on this host "
                f"(ENGINE_MAX_LOCAL_ENGINES={cap})"))
            return
        version = worker.model_version
        gpus = self._gpus_for(worker)
        if gpus is None:
            return
        port = free_port(self.config.bind_host)
        # A key of its own per start: the engine answers only the gateway, the probes and the scraper, which
        # read it from the worker row, so an engine bound off loopback cannot be called around the gateway.
        api_key = secrets.token_urlsafe(24)
        started = engine_services.engine_start_begin(
            worker_id=worker.pk, agent=self.claim, port=port, base_url=f"http://{self.config.public_host}:{port}",
            api_key=api_key, gpu_ids=",".join(gpus))
        if started is None:
            return
        try:
            engine = local_start(worker_id=worker.pk, model=version.artifact, served_model_name=version.served_model_name,
                                 engine_args=list(version.engine_args or []), host=self.config.bind_host, port=port,
                                 log_dir=self.config.log_dir, cpus=self.config.cpus, build=self.config.build,
                                 gpus=gpus, api_key=api_key)
        except (OSError, ValueError) as exc:
            self._failed(started, f"could not launch the engine: {exc}")
            return
        self.engines[worker.pk] = engine
        self._health_failures.pop(worker.pk, None)
        if engine_services.engine_pid_set(worker_id=worker.pk, agent=self.claim, pid=engine.pid) is None:
            self.engines.pop(worker.pk).kill()
            return
        logger.info("engine %s: started %s as pid %s on port %s", worker.pk, version.label, engine.pid, port)

    def _gpus_for(self, worker: EngineWorker) -> tuple[str, ...] | None:
        """The GPUs a local engine starts on (none on the CPU build), or None when it cannot start now:
        waiting for GPUs to come free (it stays PENDING, saying why), or never (FAILED at once)."""
        if self.config.build == "cpu":
            return ()
        try:
            need = gpu_count(list(worker.model_version.engine_args or []))
            held = {wid: engine.gpus for wid, engine in self.engines.items()}
            return gpus_assign(need=need, host=self.config.gpus, held=held).gpu_ids
        except ValueError as exc:
            engine_services.engine_refused(worker_id=worker.pk, agent=self.claim, reason=f"cannot start: {exc}")
        except GpuFitError as exc:
            if exc.permanent:
                engine_services.engine_refused(worker_id=worker.pk, agent=self.claim, reason=f"cannot start: {exc.reason}")
            else:
                engine_services.engine_pending_note(worker_id=worker.pk, agent=self.claim, reason=exc.reason)
        return None

    def _check_starting(self, worker: EngineWorker, engine: LocalEngine | None) -> None:
        started_at = worker.started_at or worker.state_changed_at or timezone.now()
        waited = (timezone.now() - started_at).total_seconds()
        if waited > self.config.start_timeout_s:
            detail = worker.last_health_detail or "no answer"
            if engine is not None:
                engine.kill()
                engine.reap_group()
                self.engines.pop(worker.pk, None)
                self._failed(worker, f"not ready after {self.config.start_timeout_s:.0f} s: {detail}")
                return
            # A static endpoint is someone else's to fix: keep probing, and keep saying why.
        self._submit(worker, "ready")

    def _check_health(self, worker: EngineWorker, engine: LocalEngine | None) -> None:
        if (worker.state == State.UNHEALTHY and engine is not None and worker.state_changed_at is not None
                and timezone.now() - worker.state_changed_at > timedelta(seconds=self.config.start_timeout_s)):
            engine.kill()
            engine.reap_group()
            self.engines.pop(worker.pk, None)
            self._failed(worker, f"unhealthy for over {self.config.start_timeout_s:.0f} s: {worker.last_health_detail}")
            return
        self._submit(worker, "health")

    def _drain(self, worker: EngineWorker, engine: LocalEngine | None) -> None:
        if worker.driver == Driver.LOCAL:
            if engine is None:
                engine_services.engine_stopped(worker_id=worker.pk, agent=self.claim, reason="stopped")
                return
            if engine.term_sent is not None:
                if not engine.killed and time.monotonic() - engine.term_sent > self.config.stop_grace_s:
                    logger.warning("engine %s: still running %.0f s after SIGTERM; SIGKILL", worker.pk,
                                   self.config.stop_grace_s)
                    engine.kill()
                return
        self._submit(worker, "drain")

    def _on_exit(self, worker: EngineWorker, engine: LocalEngine, code: int) -> None:
        engine.reap_group()
        self.engines.pop(worker.pk, None)
        tail = log_tail(engine.log_path)
        engine_services.engine_log_tail_record(worker_id=worker.pk, agent=self.claim, log_tail=tail)
        self._tails[worker.pk] = tail
        how = describe_exit(code)
        if engine.term_sent is not None or worker.state == State.DRAINING or worker.desired_state == Desired.STOPPED:
            logger.info("engine %s: stopped (%s)", worker.pk, how)
            engine_services.engine_stopped(worker_id=worker.pk, agent=self.claim, reason=f"stopped ({how})")
            return
        words = last_words(tail)
        reason = f"exited with {how}" + (f": {words}" if words else "")
        logger.warning("engine %s: %s", worker.pk, reason)
        self._failed(worker, reason)

    def _failed(self, worker: EngineWorker, reason: str) -> None:
        result = engine_services.engine_failed_start(
            worker_id=worker.pk, agent=self.claim, reason=reason, backoff_base_s=self.config.backoff_base_s,
            backoff_max_s=self.config.backoff_max_s, max_failures=self.config.max_failures)
        if result is not None:
            logger.warning("engine %s: %s (%s)", worker.pk, result.state, result.state_reason)

    def _record_log_tail(self, worker_id: int, engine: LocalEngine) -> None:
        tail = log_tail(engine.log_path)
        if tail != self._tails.get(worker_id):
            self._tails[worker_id] = tail
            engine_services.engine_log_tail_record(worker_id=worker_id, agent=self.claim, log_tail=tail)

    # --- probes in threads ------------------------------------------------------------------------

    def _submit(self, worker: EngineWorker, kind: str) -> None:
        base_url, api_key, name = worker.base_url, worker.api_key, worker.model_version.served_model_name
        flavor = flavor_get(worker.flavor)
        now = time.monotonic()
        if not base_url or now < self._next_probe.get(worker.pk, 0.0):
            return
        self._next_probe[worker.pk] = now + (self.config.health_interval_s if kind == "health" else self.config.interval_s)
        def job() -> tuple[ProbeResult | None, Scrape | None]:
            timeout = READINESS_TIMEOUT_S if kind == "ready" else HEALTH_TIMEOUT_S
            with engine_client(base_url, api_key=api_key, timeout_s=timeout, flavor=flavor) as client:
                if kind == "ready":
                    return probe_readiness(client, served_model_name=name, flavor=flavor), None
                if kind == "health":
                    return (probe_health(client, served_model_name=name, flavor=flavor),
                            scrape_metrics(client, flavor=flavor))
                if not flavor.drained or flavor.in_flight_gauges is None:
                    return None, None
                return None, scrape_metrics(client, flavor=flavor)

        future = self._pool.submit(job)
        future.add_done_callback(lambda _: self._wake.set())
        self._jobs[worker.pk] = _Job(kind=kind, future=future)

    def _apply_finished_jobs(self) -> None:
        for worker_id, job in list(self._jobs.items()):
            if not job.future.done():
                continue
            del self._jobs[worker_id]
            try:
                probe, scrape = job.future.result()
            except Exception as exc:
                logger.exception("engine %s: %s probe raised", worker_id, job.kind)
                probe, scrape = ProbeResult(False, f"probe raised {type(exc).__name__}: {exc}"), None
            try:
                self._apply(worker_id, job.kind, probe, scrape)
            except Exception:
                logger.exception("engine %s: applying the %s probe failed", worker_id, job.kind)

    def _apply(self, worker_id: int, kind: str, probe: ProbeResult | None, scrape: Scrape | None) -> None:
        agent = self.claim
        if scrape is not None and scrape.metrics is not None:
            engine_services.engine_metrics_record(worker_id=worker_id, agent=agent, metrics=scrape.metrics)
        if kind == "ready":
            assert probe is not None
            if probe.ok:
                if engine_services.engine_ready(worker_id=worker_id, agent=agent) is not None:
                    logger.info("engine %s: ready", worker_id)
                    self._next_probe[worker_id] = time.monotonic() + self.config.health_interval_s
            else:
                engine_services.engine_waiting_note(worker_id=worker_id, agent=agent, detail=probe.detail)
        elif kind == "health":
            assert probe is not None
            self._apply_health(worker_id, probe)
        elif kind == "drain":
            self._apply_drain(worker_id, scrape)

    def _apply_health(self, worker_id: int, probe: ProbeResult) -> None:
        agent = self.claim
        worker = EngineWorker.objects.filter(pk=worker_id, claimed_by=agent).first()
        if worker is None:
            return
        if probe.ok:
            self._health_failures[worker_id] = 0
            stable = worker.ready_at is not None and (
                timezone.now() - worker.ready_at > timedelta(seconds=self.config.stable_after_s))
            engine_services.engine_health_record(worker_id=worker_id, agent=agent, ok=True, detail="ok", stable=stable)
            if worker.state == State.UNHEALTHY and engine_services.engine_ready(worker_id=worker_id, agent=agent):
                logger.info("engine %s: healthy again", worker_id)
            return
        failures = self._health_failures.get(worker_id, 0) + 1
        self._health_failures[worker_id] = failures
        engine_services.engine_health_record(worker_id=worker_id, agent=agent, ok=False, detail=probe.detail)
        if failures >= self.config.unhealthy_after and worker.state == State.READY:
            logger.warning("engine %s: unhealthy: %s", worker_id, probe.detail)
            engine_services.engine_unhealthy(worker_id=worker_id, agent=agent, detail=probe.detail)

    def _apply_drain(self, worker_id: int, scrape: Scrape | None) -> None:
        agent = self.claim
        worker = EngineWorker.objects.filter(pk=worker_id, claimed_by=agent, state=State.DRAINING).first()
        if worker is None:
            return
        flavor = flavor_get(worker.flavor)
        since = worker.state_changed_at or timezone.now()
        waited = (timezone.now() - since).total_seconds()
        if not flavor.drained:
            reason = f"out of routing ({flavor.name} is a hosted API: never drained)"
        elif flavor.in_flight_gauges is None:
            # Nothing says what is in flight: give the requests routed before the drain a fixed grace.
            if waited < self.config.drain_no_signal_s:
                return
            reason = f"drained ({flavor.name} exports no queue metrics: waited {self.config.drain_no_signal_s:g} s)"
        else:
            in_flight = scrape.in_flight if scrape is not None else None
            overdue = waited > self.config.drain_timeout_s
            if in_flight and not overdue:
                return
            if in_flight:
                reason = f"drain timed out after {self.config.drain_timeout_s:.0f} s with {in_flight:.0f} requests in flight"
            elif in_flight is None:
                reason = "drained (metrics unavailable: " + (scrape.detail if scrape else "no scrape") + ")"
            else:
                reason = "drained"
        engine = self.engines.get(worker_id)
        if worker.driver == Driver.LOCAL and engine is not None:
            logger.info("engine %s: %s; SIGTERM", worker_id, reason)
            engine.terminate()
        else:
            engine_services.engine_stopped(worker_id=worker_id, agent=agent, reason=reason)

    # --- exit ---------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop routing to this agent's engines, give in-flight requests a moment, stop the processes,
        and hand the workers back (PENDING, unclaimed) so the next agent starts them at once."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        agent = self.claim
        try:
            self._fresh_connection()
            for worker_id in list(self.engines):
                engine_services.engine_drain_begin(worker_id=worker_id, agent=agent, reason="engine agent stopping")
        except DatabaseError:
            logger.exception("engine agent: database error while stopping; stopping the engines anyway")
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while self.engines and time.monotonic() < deadline and self._any_in_flight():
            time.sleep(0.2)
        for engine in self.engines.values():
            engine.terminate()
        deadline = time.monotonic() + SHUTDOWN_TERM_WAIT_S
        while time.monotonic() < deadline and any(e.exit_code() is None for e in self.engines.values()):
            time.sleep(0.1)
        for engine in self.engines.values():
            if engine.exit_code() is None:
                engine.kill()
            engine.reap_group()
            try:
                engine.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # exiting anyway; PDEATHSIG covers what is left
                logger.warning("engine %s: pid %s did not exit", engine.worker_id, engine.pid)
        engines, self.engines = self.engines, {}
        try:
            for worker_id, engine in engines.items():
                self._record_log_tail(worker_id, engine)
            for worker in EngineWorker.objects.filter(claimed_by=agent):
                engine_services.engine_agent_left(worker_id=worker.pk, agent=agent, reason="engine agent stopped")
        except DatabaseError:
            # The processes are gone; the claims expire and the next agent resets the workers.
            logger.exception("engine agent: database error while handing the workers back")
        logger.info("engine agent %s stopped", agent)

    def _any_in_flight(self) -> bool:
        for worker_id, engine in self.engines.items():
            with engine_client(f"http://{self.config.public_host}:{engine.port}", timeout_s=0.5) as client:
                scrape = scrape_metrics(client)
            if scrape.in_flight:
                logger.info("engine %s: waiting for in-flight requests before stopping", worker_id)
                return True
        return False


def agent_stats() -> dict[str, Any]:
    """This process' resident memory, for the agent's own log line."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return {"rss_kib": int(line.split()[1])}
    except OSError:
        pass
    return {}
