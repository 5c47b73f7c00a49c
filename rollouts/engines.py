"""Engines follow rollouts: a rollout asks for the engines it waits for, and lets go of the ones it retired.

- **Requested.** A rollout created to start when ready (`start_when_ready`, `rolloutctl create
  --start-when-ready`) whose baseline or candidate has no engine asked to run gets one
  (`rollout_engines_request`): a stopped worker the platform runs (a local process or a Kubernetes
  Deployment) is asked to run again, else a local worker is created for this server's engine agent
  (ENGINE_AGENT_HOST). The created event records what was asked for. Under a `gpu_budget` the candidate's
  replicas are the budget's to bring up, so only its baseline is asked for.
- **Stopped.** When a rollout ends, the version it retired (the candidate of one rolled back or aborted,
  the old baseline of one promoted) has its engines stopped `ENGINE_IDLE_STOP_S` later (default 300 s; like
  Argo Rollouts' `scaleDownDelaySeconds`, the delay keeps a quick retry from waiting for a cold start), if
  by then nothing uses the version: no alias routes to it (as baseline or candidate), no live rollout (a
  draft included) names it, no eval run in progress runs on it. The beat task `retired_engines_stop` does it
  every 15 s, once per rollout (`Rollout.engines_released_at`, claimed by compare-and-set): an engine a
  person starts again afterwards stays up. Only engines the platform runs are stopped (local processes,
  Kubernetes Deployments); a static endpoint is someone else's. The agent drains a stopped engine first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from rollouts import capacity
from rollouts.models import Rollout
from serving.models import Alias, EngineWorker, ModelVersion
from serving.selectors import engine_worker_list
from serving.services import engine_worker_create, engine_worker_set_desired

logger = logging.getLogger(__name__)

State = Rollout.State
Driver = EngineWorker.Driver
Desired = EngineWorker.Desired
# Engines the platform runs, and so may start and stop; a static endpoint is someone else's.
OWNED_DRIVERS = (Driver.LOCAL, Driver.KUBERNETES)


# --- requested when a rollout waits for them ---------------------------------------------------------------


def _engine_request(version: ModelVersion) -> dict[str, Any] | None:
    """Ask for an engine of `version` if none is asked to run; what was done, or None."""
    workers = list(engine_worker_list(model_version=version))
    if any(w.desired_state == Desired.RUNNING for w in workers):
        return None
    stopped = next((w for w in workers if w.driver in OWNED_DRIVERS), None)
    if stopped is not None:
        engine_worker_set_desired(worker=stopped, desired=Desired.RUNNING)
        return {"version": version.label, "worker": stopped.pk, "how": "asked to run again"}
    created = engine_worker_create(model_version=version, driver=Driver.LOCAL)
    return {"version": version.label, "worker": created.pk, "how": f"created for the engine agent of {created.host_name}"}


def rollout_engines_request(*, rollout: Rollout) -> list[dict[str, Any]]:
    """Inside the creation's transaction: an engine for each version of a start-when-ready rollout that has
    none asked to run. Returns what was asked for (the created event's evidence)."""
    versions = [rollout.baseline]
    if not capacity.rollout_candidate_startable(rollout=rollout):
        versions.append(rollout.candidate)
    done = [_engine_request(version) for version in versions]
    return [d for d in done if d is not None]


# --- stopped after the rollout retired their version -----------------------------------------------------------


def retired_version(rollout: Rollout) -> ModelVersion | None:
    """The version an ended rollout took out of service: the loser of the rollout."""
    if rollout.state == State.PROMOTED:
        return rollout.baseline
    if rollout.state in (State.ROLLED_BACK, State.ABORTED):
        return rollout.candidate
    return None


def version_in_use(*, version: ModelVersion) -> str | None:
    """Why the version's engines must stay (an alias routes to it, a live rollout names it, an eval run
    runs on it), or None when nothing uses it."""
    from evals.models import EvalRun
    from evals.selectors import eval_run_list

    alias = Alias.objects.filter(Q(baseline=version) | Q(candidate=version)).values_list("name", flat=True).first()
    if alias is not None:
        return f"the alias {alias!r} routes to it"
    live = (
        Rollout.objects.filter(state__in=Rollout.LIVE_STATES)
        .filter(Q(baseline=version) | Q(candidate=version))
        .values_list("pk", flat=True)
        .first()
    )
    if live is not None:
        return f"rollout {live} is live on it"
    if eval_run_list(model_version_id=version.pk).filter(state__in=EvalRun.ACTIVE_STATES).exists():
        return "an eval run runs on it"
    return None


@dataclass(frozen=True)
class Released:
    rollout_id: int
    version: str
    stopped: list[int]
    kept: str = ""  # why nothing was stopped


def _release(rollout: Rollout) -> Released | None:
    version = retired_version(rollout)
    with transaction.atomic():
        # The claim: of two beats (or a task run twice) one releases, the other finds it done.
        if not Rollout.objects.filter(pk=rollout.pk, engines_released_at__isnull=True).update(
            engines_released_at=timezone.now()
        ):
            return None
        if version is None:
            return Released(rollout.pk, "", [], kept="nothing retired")
        why = version_in_use(version=version)
        if why is not None:
            return Released(rollout.pk, version.label, [], kept=why)
        stopped = []
        for worker in engine_worker_list(model_version=version).filter(desired_state=Desired.RUNNING,
                                                                       driver__in=OWNED_DRIVERS):
            engine_worker_set_desired(
                worker=worker, desired=Desired.STOPPED,
                reason=f"stop requested: rollout {rollout.pk} {rollout.state.replace('_', ' ')} and nothing uses {version.label}",
            )  # fmt: skip
            stopped.append(worker.pk)
        return Released(rollout.pk, version.label, stopped)


def retired_engines_stop(*, now: datetime | None = None) -> list[Released]:
    """Let go of the engines of every version a rollout retired at least ENGINE_IDLE_STOP_S ago. Safe to run
    twice, and in two processes at once."""
    now = now or timezone.now()
    due = now - timedelta(seconds=float(settings.ENGINE_IDLE_STOP_S))
    ended = Rollout.objects.select_related("baseline", "candidate").filter(
        state__in=Rollout.TERMINAL_STATES, engines_released_at__isnull=True, ended_at__lte=due
    ).order_by("ended_at")[:100]
    done = []
    for rollout in ended:
        released = _release(rollout)
        if released is None:
            continue
        done.append(released)
        if released.stopped:
            logger.info("rollout %s ended: stopping the engines %s of %s, which nothing uses", rollout.pk,
                        released.stopped, released.version)
        elif released.version:
            logger.info("rollout %s ended: the engines of %s stay (%s)", rollout.pk, released.version, released.kept)
    return done
