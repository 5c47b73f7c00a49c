"""The engine agent's state transitions.

Each one is a transaction on one worker row that checks the agent still holds the worker's claim and the
worker is in a state the transition starts from; if not, nothing is written and None comes back (another
agent took over, or a person changed the worker: the agent looks again on its next pass). A transition
into or out of READY bumps the route generation in the same transaction, because gateways route only
to READY workers."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from serving.engines.policy import gives_up, restart_delay_s
from serving.models import EngineWorker
from serving.services import route_generation_bump

State = EngineWorker.State
Desired = EngineWorker.Desired

# States in which a local worker has (or is about to have) a process.
PROCESS_STATES = (State.STARTING, State.READY, State.UNHEALTHY, State.DRAINING)
REASON_MAX = 500


def _cut(text: str, limit: int = REASON_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _locked(worker_id: int, agent: str, from_states: Collection[str] | None) -> EngineWorker | None:
    worker = EngineWorker.objects.select_for_update().filter(pk=worker_id).first()
    if worker is None or worker.claimed_by != agent:
        return None
    if from_states is not None and worker.state not in from_states:
        return None
    return worker


def _save(worker: EngineWorker, *, was: str, fields: dict[str, Any], now: datetime | None = None) -> EngineWorker:
    for name, value in fields.items():
        setattr(worker, name, value)
    names = list(fields)
    if "state" in fields and fields["state"] != was:
        worker.state_changed_at = now or timezone.now()
        names.append("state_changed_at")
    worker.save(update_fields=names)
    routable_before = was in EngineWorker.ROUTABLE_STATES
    if routable_before != (worker.state in EngineWorker.ROUTABLE_STATES):
        route_generation_bump()
    return worker


def _transition(
    *, worker_id: int, agent: str, from_states: Collection[str] | None, to_state: str, reason: str, **fields: Any
) -> EngineWorker | None:
    with transaction.atomic():
        worker = _locked(worker_id, agent, from_states)
        if worker is None:
            return None
        return _save(worker, was=worker.state, fields={"state": to_state, "state_reason": _cut(reason), **fields})


# --- claims ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    worker: EngineWorker
    # Who held it before, if someone else did: their engine process may need cleaning up.
    previous_claim: str
    previous_pid: int | None
    previous_port: int | None


def engine_claim(
    *, worker_id: int, agent: str, ttl_s: float, dead_claims: Collection[str] = ()
) -> Claimed | None:
    """Take the worker for `agent` if nobody holds it, `agent` does, the holder's claim expired, or the
    holder is one of `dead_claims` (an agent on this machine whose process is gone).

    Taking a local worker over from another agent resets it: its process died with that agent, so a
    worker that should run goes back to PENDING and one that should not is STOPPED."""
    now = timezone.now()
    with transaction.atomic():
        # The compare-and-set: of two agents claiming at once, one update matches and the other none.
        free = Q(claimed_by="") | Q(claimed_by=agent) | Q(claim_expires_at__lt=now)
        if dead_claims:
            free |= Q(claimed_by__in=list(dead_claims))
        worker = EngineWorker.objects.select_for_update().filter(free, pk=worker_id).first()
        if worker is None:
            return None
        previous, pid, port = worker.claimed_by, worker.pid, worker.port
        fields: dict[str, Any] = {"claimed_by": agent, "claim_expires_at": now + timedelta(seconds=ttl_s)}
        taken_over = previous not in ("", agent)
        if worker.driver == EngineWorker.Driver.LOCAL and worker.state in PROCESS_STATES and previous != agent:
            running = worker.desired_state == Desired.RUNNING
            fields.update(
                state=State.PENDING if running else State.STOPPED,
                state_reason=_cut(f"agent {previous or '(none)'} went away; " + ("restarting" if running else "stopped")),
                pid=None,
                ready_at=None,
            )
        _save(worker, was=worker.state, fields=fields, now=now)
        if not taken_over:
            return Claimed(worker=worker, previous_claim="", previous_pid=None, previous_port=None)
        return Claimed(worker=worker, previous_claim=previous, previous_pid=pid, previous_port=port)


def engine_claims_renew(*, agent: str, ttl_s: float) -> int:
    """Push back the expiry of every claim `agent` holds; called every pass."""
    until = timezone.now() + timedelta(seconds=ttl_s)
    return EngineWorker.objects.filter(claimed_by=agent).update(claim_expires_at=until)


def engine_claim_release(*, worker_id: int, agent: str) -> bool:
    """Let go of a worker that needs no process (stopped, failed), so any agent may pick it up later."""
    return EngineWorker.objects.filter(pk=worker_id, claimed_by=agent).update(claimed_by="", claim_expires_at=None) == 1


# --- lifecycle ------------------------------------------------------------------------------------


def engine_start_begin(
    *, worker_id: int, agent: str, port: int | None, base_url: str, api_key: str = "", gpu_ids: str = ""
) -> EngineWorker | None:
    """PENDING -> STARTING, before the process is launched: the state is the reservation, so a second
    pass (or agent) finds STARTING and launches nothing. A local engine's URL, key and GPUs are written
    with it (a static endpoint keeps the ones it was created with)."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.PENDING,))
        if worker is None or worker.desired_state != Desired.RUNNING:
            return None
        now = timezone.now()
        restart = worker.consecutive_failures > 0
        fields: dict[str, Any] = {
            "state": State.STARTING,
            "state_reason": "restarting after a failure" if restart else "starting",
            "port": port,
            "pid": None,
            "started_at": now,
            "ready_at": None,
            "next_start_at": None,
            "last_health_ok": None,
            "last_health_detail": "",
            "restarts": worker.restarts + (1 if restart else 0),
        }
        if worker.driver in (EngineWorker.Driver.LOCAL, EngineWorker.Driver.KUBERNETES):
            fields["base_url"] = base_url
            fields["api_key"] = api_key
            fields["gpu_ids"] = gpu_ids
            fields["metrics"] = {}
            fields["metrics_at"] = None
        return _save(worker, was=worker.state, fields=fields, now=now)


def engine_pending_note(*, worker_id: int, agent: str, reason: str) -> EngineWorker | None:
    """A PENDING worker cannot start yet (its GPUs are held by other engines): say why, keep the state."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.PENDING,))
        if worker is None or worker.state_reason == _cut(reason):
            return worker
        return _save(worker, was=worker.state, fields={"state_reason": _cut(reason)})


def engine_refused(*, worker_id: int, agent: str, reason: str) -> EngineWorker | None:
    """PENDING -> FAILED without a try: it can never start here (more GPUs than the host has, a bad
    engine flag). It waits for a person, who fixes the version or the host and asks it to run again."""
    return _transition(worker_id=worker_id, agent=agent, from_states=(State.PENDING,), to_state=State.FAILED,
                       reason=reason, next_start_at=None, claimed_by="", claim_expires_at=None)


def engine_pid_set(*, worker_id: int, agent: str, pid: int) -> EngineWorker | None:
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.STARTING,))
        if worker is None:
            return None
        return _save(worker, was=worker.state, fields={"pid": pid, "state_reason": f"starting (pid {pid})"})


def engine_ready(*, worker_id: int, agent: str) -> EngineWorker | None:
    """STARTING or UNHEALTHY -> READY: routable from the next route table the gateways build."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.STARTING, State.UNHEALTHY))
        if worker is None or worker.desired_state != Desired.RUNNING:
            return None
        now = timezone.now()
        fields: dict[str, Any] = {
            "state": State.READY,
            "state_reason": "ready" if worker.state == State.STARTING else "healthy again",
            "last_health_ok": True,
            "last_health_at": now,
            "last_health_detail": "ok",
        }
        if worker.state == State.STARTING:
            fields["ready_at"] = now
        return _save(worker, was=worker.state, fields=fields, now=now)


def engine_waiting_note(*, worker_id: int, agent: str, detail: str) -> EngineWorker | None:
    """A STARTING worker is not ready yet: say why (the last probe's answer), keep the state."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.STARTING,))
        if worker is None:
            return None
        reason = _cut(f"not ready yet: {detail}")
        return _save(worker, was=worker.state, fields={
            "state_reason": reason, "last_health_ok": False, "last_health_at": timezone.now(),
            "last_health_detail": _cut(detail),
        })


def engine_health_record(
    *, worker_id: int, agent: str, ok: bool, detail: str, stable: bool = False
) -> EngineWorker | None:
    """The result of a health check; `stable` (ready long enough) clears the run of failures."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, None)
        if worker is None:
            return None
        fields: dict[str, Any] = {"last_health_ok": ok, "last_health_at": timezone.now(), "last_health_detail": _cut(detail)}
        if ok and stable and worker.consecutive_failures:
            fields["consecutive_failures"] = 0
        return _save(worker, was=worker.state, fields=fields)


def engine_unhealthy(*, worker_id: int, agent: str, detail: str) -> EngineWorker | None:
    """READY -> UNHEALTHY: no longer routable; it becomes READY again when its checks pass."""
    return _transition(worker_id=worker_id, agent=agent, from_states=(State.READY,), to_state=State.UNHEALTHY,
                       reason=f"health check failing: {detail}")


def engine_failed_start(
    *, worker_id: int, agent: str, reason: str, backoff_base_s: float, backoff_max_s: float, max_failures: int
) -> EngineWorker | None:
    """The process died, or never became ready: CRASHED with a restart time, or FAILED after
    `max_failures` failures in a row."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.PENDING, *PROCESS_STATES))
        if worker is None:
            return None
        failures = worker.consecutive_failures + 1
        now = timezone.now()
        fields: dict[str, Any] = {"consecutive_failures": failures, "pid": None}
        if gives_up(failures=failures, max_failures=max_failures):
            fields.update(state=State.FAILED, next_start_at=None, claimed_by="", claim_expires_at=None,
                          state_reason=_cut(f"gave up after {failures} failures in a row; last: {reason}"))
        else:
            delay = restart_delay_s(failures=failures, base_s=backoff_base_s, max_s=backoff_max_s)
            fields.update(state=State.CRASHED, next_start_at=now + timedelta(seconds=delay),
                          state_reason=_cut(f"{reason}; restart {failures} in {delay:.3g} s"))
        return _save(worker, was=worker.state, fields=fields, now=now)


def engine_restart_due(*, worker_id: int, agent: str) -> EngineWorker | None:
    """CRASHED -> PENDING once its backoff has passed."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.CRASHED,))
        if worker is None or (worker.next_start_at is not None and worker.next_start_at > timezone.now()):
            return None
        return _save(worker, was=worker.state, fields={"state": State.PENDING, "state_reason": "restart due"})


def engine_drain_begin(*, worker_id: int, agent: str, reason: str) -> EngineWorker | None:
    """Stop routing to it (-> DRAINING); the agent stops the process once in-flight requests are done."""
    return _transition(worker_id=worker_id, agent=agent, from_states=(State.STARTING, State.READY, State.UNHEALTHY),
                       to_state=State.DRAINING, reason=reason)


def engine_stopped(*, worker_id: int, agent: str, reason: str) -> EngineWorker | None:
    """The process is gone (or there never was one) and that was asked for: STOPPED, claim released."""
    return _transition(worker_id=worker_id, agent=agent, from_states=None, to_state=State.STOPPED, reason=reason,
                       pid=None, next_start_at=None, claimed_by="", claim_expires_at=None)


def engine_pending(*, worker_id: int, agent: str, reason: str) -> EngineWorker | None:
    """STOPPED but wanted running again (its desired state flipped back during a drain)."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, (State.STOPPED,))
        if worker is None or worker.desired_state != Desired.RUNNING:
            return None
        return _save(worker, was=worker.state, fields={"state": State.PENDING, "state_reason": reason,
                                                       "consecutive_failures": 0})


def engine_agent_left(*, worker_id: int, agent: str, reason: str) -> EngineWorker | None:
    """The agent is exiting and has stopped the worker's process: PENDING (another agent, or this one
    restarted, starts it again) or STOPPED, and the claim is released so that happens at once."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, None)
        if worker is None:
            return None
        fields: dict[str, Any] = {"claimed_by": "", "claim_expires_at": None}
        if worker.driver == EngineWorker.Driver.LOCAL and worker.state in PROCESS_STATES:
            running = worker.desired_state == Desired.RUNNING
            fields.update(state=State.PENDING if running else State.STOPPED, state_reason=_cut(reason), pid=None,
                          ready_at=None)
        return _save(worker, was=worker.state, fields=fields)


def engine_failed(*, worker_id: int, agent: str, reason: str) -> EngineWorker | None:
    """Give up on a worker whose restarts are someone else's (Kubernetes' kubelet restarts a crashing pod
    with its own backoff): FAILED, claim released, waiting for a person."""
    return _transition(worker_id=worker_id, agent=agent, from_states=(State.PENDING, *PROCESS_STATES),
                       to_state=State.FAILED, reason=reason, next_start_at=None, claimed_by="", claim_expires_at=None)


def _routable_urls(pods: list[dict[str, Any]]) -> set[str]:
    return {str(pod.get("url")) for pod in pods if pod.get("routable")}


def engine_pods_record(*, worker_id: int, agent: str, pods: list[dict[str, Any]], ready_replicas: int,
                       reason: str | None = None) -> EngineWorker | None:
    """What the reconciler saw of a Kubernetes worker's pods. When the set of pods the gateway may route to
    changes (one became ready, one is drained, a node went), the route generation is bumped with it."""
    with transaction.atomic():
        worker = _locked(worker_id, agent, None)
        if worker is None:
            return None
        routable_before = _routable_urls(worker.pods or [])
        fields: dict[str, Any] = {}
        if worker.pods != pods:
            fields["pods"] = pods
        if worker.ready_replicas != ready_replicas:
            fields["ready_replicas"] = ready_replicas
        if reason is not None and worker.state_reason != _cut(reason):
            fields["state_reason"] = _cut(reason)
        if not fields:
            return worker
        saved = _save(worker, was=worker.state, fields=fields)
        if worker.state in EngineWorker.ROUTABLE_STATES and _routable_urls(pods) != routable_before:
            route_generation_bump()
        return saved


def engine_metrics_record(*, worker_id: int, agent: str, metrics: dict[str, Any]) -> bool:
    return EngineWorker.objects.filter(pk=worker_id, claimed_by=agent).update(
        metrics=metrics, metrics_at=timezone.now()) == 1


def engine_log_tail_record(*, worker_id: int, agent: str, log_tail: str) -> bool:
    return EngineWorker.objects.filter(pk=worker_id, claimed_by=agent).update(log_tail=log_tail) == 1
