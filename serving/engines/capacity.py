"""Canaries that fit a GPU budget: how many replicas each arm of an alias gets, scaling them, and when the
alias's traffic may move.

An alias with a `gpu_budget` (replicas of its versions together, each replica one engine's worth of
GPUs) never asks for more: at each step the candidate gets the replicas its weight needs (at least one),
and the baseline gives them up first, like a Deployment with `maxSurge: 0`. A version only grows into
GPUs that another has handed back: a replica being drained still holds its GPUs until it is gone. Traffic
toward the candidate moves only once the candidate's replicas for the new weight are ready; traffic away
from it (a rollback) moves at once and the GPUs follow.

An arm's replicas are its version's `kubernetes` worker (the Deployment's replicas; 0 stops the worker,
which drains and deletes it) or, on a multi-GPU host, its `local` workers (one engine each, more are
created beside the first, the newest are stopped first).

`capacity_sync` is idempotent and runs whenever the split changes (`route_set`) and on every pass of
every engine reconciler, which is when replicas become ready or go away."""

from __future__ import annotations

import math
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from serving.models import Alias, EngineWorker, ModelVersion

Driver = EngineWorker.Driver
State = EngineWorker.State
Desired = EngineWorker.Desired
RUNNING = Desired.RUNNING
# A local engine in these states holds its GPUs.
HOLDING_STATES = (State.STARTING, State.READY, State.UNHEALTHY, State.DRAINING)


class CapacityError(ValueError):
    pass


@dataclass(frozen=True)
class ArmReplicas:
    baseline: int
    candidate: int


def replicas_for_weight(*, budget: int, weight: float, has_candidate: bool) -> ArmReplicas:
    """The split of `budget` replicas for a candidate weight (pure).

    The candidate gets ceil(weight x budget), at least 1 while it is in the alias at all (a shadow step
    mirrors to it), and the baseline keeps at least 1 while it still takes traffic (weight < 1)."""
    if budget < 1:
        raise CapacityError("gpu_budget must be at least 1")
    if not 0.0 <= weight <= 1.0:
        raise CapacityError("weight must be between 0 and 1")
    if not has_candidate:
        return ArmReplicas(baseline=budget, candidate=0)
    if weight >= 1.0:
        return ArmReplicas(baseline=0, candidate=budget)
    if budget < 2:
        raise CapacityError("a budget of 1 cannot hold a baseline and a candidate: give gpu_budget 2 or more")
    candidate = min(max(1, math.ceil(weight * budget - 1e-9)), budget - 1)
    return ArmReplicas(baseline=budget - candidate, candidate=candidate)


# --- an arm's workers -----------------------------------------------------------------------------


def _pool(version_id: int) -> list[EngineWorker]:
    """The workers the budget scales for a version: its Kubernetes workers if it has any, else its local
    workers on the host of the first one."""
    workers = list(EngineWorker.objects.filter(model_version_id=version_id).order_by("id"))
    kube = [w for w in workers if w.driver == Driver.KUBERNETES]
    if kube:
        return kube
    local = [w for w in workers if w.driver == Driver.LOCAL]
    return [w for w in local if w.host_name == local[0].host_name] if local else []


def _applied(pool: list[EngineWorker]) -> int:
    """Replicas the version is asked to have now."""
    if pool and pool[0].driver == Driver.KUBERNETES:
        return sum(w.replicas for w in pool if w.desired_state == RUNNING)
    return sum(1 for w in pool if w.desired_state == RUNNING)


def _occupied(pool: list[EngineWorker]) -> int:
    """Replicas holding GPUs now (asked for, starting, serving or still draining)."""
    if pool and pool[0].driver == Driver.KUBERNETES:
        # Pods still listed (a terminating one too) hold their GPUs; pods asked for but not created yet will.
        return sum(
            max(
                len(w.pods or []), w.replicas if w.desired_state == RUNNING and w.state != State.FAILED else 0
            )
            for w in pool
        )
    return sum(
        1
        for w in pool
        if w.state in HOLDING_STATES or (w.desired_state == RUNNING and w.state == State.PENDING)
    )


def _ready(pool: list[EngineWorker]) -> int:
    ready = [w for w in pool if w.desired_state == RUNNING and w.state in EngineWorker.ROUTABLE_STATES]
    if pool and pool[0].driver == Driver.KUBERNETES:
        return sum(w.ready_replicas for w in ready)
    return len(ready)


def _scale(version_id: int, pool: list[EngineWorker], replicas: int) -> None:
    from serving.services import engine_worker_create, engine_worker_set_desired

    if not pool:
        return
    if pool[0].driver == Driver.KUBERNETES:
        first, rest = pool[0], pool[1:]
        for extra in rest:  # one Deployment per version carries the budget
            if extra.desired_state == RUNNING:
                engine_worker_set_desired(worker=extra, desired=Desired.STOPPED)
        if replicas == 0:
            engine_worker_set_desired(worker=first, desired=Desired.STOPPED)
            return
        if first.replicas != replicas:
            EngineWorker.objects.filter(pk=first.pk).update(replicas=replicas)
        engine_worker_set_desired(worker=first, desired=Desired.RUNNING)
        return
    running = [w for w in pool if w.desired_state == RUNNING]
    for surplus in reversed(running[replicas:]):
        engine_worker_set_desired(worker=surplus, desired=Desired.STOPPED)
    missing = replicas - len(running)
    for idle in [w for w in pool if w.desired_state != RUNNING][: max(0, missing)]:
        engine_worker_set_desired(worker=idle, desired=Desired.RUNNING)
        missing -= 1
    template = pool[0]
    for _ in range(max(0, missing)):
        engine_worker_create(
            model_version=ModelVersion.objects.get(pk=version_id),
            driver=Driver.LOCAL,
            host_name=template.host_name,
        )


# --- the alias ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmCapacity:
    version_id: int
    target: int  # replicas it should end with under the budget
    applied: int  # replicas it is asked for now
    occupied: int  # replicas holding GPUs now
    ready: int  # replicas serving
    failed: str = ""  # why its worker failed, when one did (nothing will make it ready without a person)

    def describe(self) -> str:
        held = f", {self.occupied} holding GPUs" if self.occupied != self.ready else ""
        return f"{self.ready} ready, {self.target} wanted{held}"


def _targets(alias: Alias) -> dict[int, int]:
    assert alias.gpu_budget is not None
    split = replicas_for_weight(
        budget=alias.gpu_budget, weight=alias.target_weight, has_candidate=alias.candidate_id is not None
    )
    targets = {int(k): 0 for k in (alias.capacity_targets or {})}
    targets[alias.baseline_id] = split.baseline
    if alias.candidate_id is not None:
        targets[alias.candidate_id] = split.candidate
    return targets


def capacity_check(*, budget: int, weight: float, has_candidate: bool) -> None:
    """Raise CapacityError when the budget cannot hold the split (route_set calls it before writing)."""
    replicas_for_weight(budget=budget, weight=weight, has_candidate=has_candidate)


def capacity_sync_locked(alias: Alias) -> bool:
    """One step toward the alias's targets (inside the caller's transaction, the alias row locked): shrink
    what is over, grow into freed GPUs, move traffic if the candidate is ready. True if routing changed."""
    from serving.services import route_generation_bump

    if alias.gpu_budget is None:
        return False
    targets = _targets(alias)
    pools = {vid: _pool(vid) for vid in targets}
    for vid, target in targets.items():
        if _applied(pools[vid]) > target:
            _scale(vid, pools[vid], target)
            pools[vid] = _pool(vid)
    free = alias.gpu_budget - sum(_occupied(pool) for pool in pools.values())
    for vid, target in targets.items():
        applied = _applied(pools[vid])
        if applied < target and free > 0:
            grow = min(target - applied, free)
            _scale(vid, pools[vid], applied + grow)
            free -= grow
            pools[vid] = _pool(vid)
    # A version that left the alias is forgotten once nothing of it holds a GPU.
    keep = {alias.baseline_id, alias.candidate_id}
    stored = {str(vid): target for vid, target in targets.items() if vid in keep or _occupied(pools[vid]) > 0}
    fields = []
    if stored != alias.capacity_targets:
        alias.capacity_targets = stored
        fields.append("capacity_targets")
    moved = False
    if alias.candidate_weight != alias.target_weight:
        increase = alias.target_weight > alias.candidate_weight
        ready = (
            alias.candidate_id is not None
            and _ready(pools[alias.candidate_id]) >= targets[alias.candidate_id]
        )
        if not increase or ready:
            alias.candidate_weight = alias.target_weight
            alias.weight_changed_at = timezone.now()
            fields += ["candidate_weight", "weight_changed_at"]
            moved = True
    if fields:
        alias.save(update_fields=[*fields, "updated_at"])
    if moved:
        route_generation_bump()
    return moved


def capacity_sync(*, alias_name: str) -> bool:
    with transaction.atomic():
        alias = Alias.objects.select_for_update().filter(name=alias_name).first()
        if alias is None:
            return False
        return capacity_sync_locked(alias)


def capacity_sync_all() -> int:
    """Every alias with a budget, one transaction each; the engine reconcilers call it every pass."""
    moved = 0
    for name in Alias.objects.filter(gpu_budget__isnull=False).values_list("name", flat=True):
        moved += capacity_sync(alias_name=name)
    return moved


def arm_capacity(*, alias: Alias) -> dict[int, ArmCapacity]:
    """Per version in the budget: its target, what it is asked for, what holds GPUs and what is ready."""
    if alias.gpu_budget is None:
        return {}
    result = {}
    for vid, target in _targets(alias).items():
        pool = _pool(vid)
        failed = next((w.state_reason for w in pool if w.state == State.FAILED and w.desired_state == RUNNING), "")
        result[vid] = ArmCapacity(vid, target, _applied(pool), _occupied(pool), _ready(pool), failed)
    return result
