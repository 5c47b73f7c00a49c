"""GPU budgets of rollouts: the thin side of serving's capacity service (serving.engines.capacity).

A plan's `gpu_budget` goes with every split the rollout sets (`rollout_split`); serving then scales the
arms within it and moves a higher candidate weight only once the candidate's replicas for it are ready.
So that a step is judged on its own traffic, its clock starts when that traffic moved, and it holds while
the replicas come up (`rollout_step_clock`). Under a budget the candidate may start with no ready engine,
as long as it has a worker to scale (`rollout_candidate_startable`), and it counts as coming up rather
than down while serving scales it (`rollout_candidate_coming`)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from rollouts.models import Rollout
from serving.models import ModelVersion
from serving.selectors import alias_capacity, model_version_scalable
from serving.services import RouteSplit


def rollout_budget(rollout: Rollout) -> int | None:
    budget = (rollout.plan or {}).get("gpu_budget")
    return int(budget) if budget else None


def rollout_split(*, rollout: Rollout, split: RouteSplit) -> RouteSplit:
    """The split with the plan's budget (kept after the rollout ends, so the arm that lost gives its
    replicas back to the one that stays)."""
    budget = rollout_budget(rollout)
    return replace(split, gpu_budget=budget) if budget is not None else split


def candidate_startable(*, gpu_budget: int | None, candidate: ModelVersion) -> bool:
    """Under a budget the candidate needs no ready engine to start, only a worker to scale."""
    return gpu_budget is not None and model_version_scalable(model_version=candidate)


def rollout_candidate_startable(*, rollout: Rollout) -> bool:
    return candidate_startable(gpu_budget=rollout_budget(rollout), candidate=rollout.candidate)


def rollout_candidate_coming(*, rollout: Rollout) -> bool:
    """Under a budget, the candidate's replicas are on their way (none of its engines failed): its having
    no ready engine yet is no reason to roll back."""
    if rollout_budget(rollout) is None:
        return False
    capacity = alias_capacity(name=rollout.alias_name)
    return (
        capacity is not None
        and capacity.candidate is not None
        and capacity.waiting is not None
        and not (capacity.candidate.failed)
    )


def rollout_step_clock(*, rollout: Rollout, now: datetime) -> tuple[datetime, str | None]:
    """When the current step's traffic began, and why it has not yet, if it has not (the step holds)."""
    started = rollout.step_started_at or now
    if rollout_budget(rollout) is None:
        return started, None
    capacity = alias_capacity(name=rollout.alias_name)
    if capacity is None:
        return started, None
    if capacity.waiting is not None:
        return started, capacity.waiting
    moved = capacity.weight_changed_at
    return (max(started, moved) if moved is not None else started), None


def rollout_replicas(*, rollout: Rollout) -> dict[str, Any] | None:
    """Replicas per arm beside the weights, for the rollout's page; None without a budget."""
    if rollout_budget(rollout) is None or not rollout.is_live:
        return None
    capacity = alias_capacity(name=rollout.alias_name)
    if capacity is None:
        return None
    return {
        "budget": capacity.budget,
        "baseline": capacity.baseline.describe(),
        "candidate": capacity.candidate.describe() if capacity.candidate is not None else "",
        "waiting": capacity.waiting or "",
    }
