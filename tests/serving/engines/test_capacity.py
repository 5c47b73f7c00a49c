"""GPU budgets (serving.engines.capacity): the split of a budget between the arms (pure), and the same
scaling for local workers on a multi-GPU host: the baseline's surplus engines are stopped first, the
candidate grows (more local workers beside the first) only into GPUs freed, and traffic moves once the
candidate's engines are ready. Engine states are set here as the agent would set them."""

from __future__ import annotations

import pytest

from serving.engines.capacity import CapacityError, capacity_sync, replicas_for_weight
from serving.models import Alias, EngineWorker, ModelVersion
from serving.selectors import alias_capacity
from serving.services import RouteSplit, engine_worker_create, route_set

State = EngineWorker.State
HOST = "gpu-box"


@pytest.mark.parametrize(("budget", "weight", "split"), [
    (4, 0.0, (3, 1)),  # a shadow step mirrors to one candidate engine
    (4, 0.1, (3, 1)), (4, 0.25, (3, 1)), (4, 0.26, (2, 2)), (4, 0.5, (2, 2)), (4, 0.75, (1, 3)),
    (4, 0.99, (1, 3)),  # the baseline keeps one while it takes traffic
    (4, 1.0, (0, 4)), (2, 0.5, (1, 1)), (10, 0.05, (9, 1)),
])
def test_the_candidate_gets_what_its_weight_needs_and_the_baseline_the_rest(
        budget: int, weight: float, split: tuple[int, int]) -> None:
    got = replicas_for_weight(budget=budget, weight=weight, has_candidate=True)
    assert (got.baseline, got.candidate) == split
    assert replicas_for_weight(budget=budget, weight=0.0, has_candidate=False).baseline == budget


def test_a_budget_that_cannot_hold_both_arms_is_refused() -> None:
    with pytest.raises(CapacityError, match="a budget of 1 cannot hold a baseline and a candidate"):
        replicas_for_weight(budget=1, weight=0.5, has_candidate=True)


def _set(worker: EngineWorker, state: str) -> None:
    EngineWorker.objects.filter(pk=worker.pk).update(state=state)


def _running(version: ModelVersion) -> list[EngineWorker]:
    return list(EngineWorker.objects.filter(model_version=version, desired_state="running").order_by("id"))


def test_local_workers_on_a_multi_gpu_host_scale_within_the_budget(db: None) -> None:
    v1 = ModelVersion.objects.create(name="m", version="v1", artifact="/models/v1", served_model_name="m-v1")
    v2 = ModelVersion.objects.create(name="m", version="v2", artifact="/models/v2", served_model_name="m-v2")
    baseline = [engine_worker_create(model_version=v1, host_name=HOST) for _ in range(3)]
    for worker in baseline:
        _set(worker, State.READY)
    candidate = engine_worker_create(model_version=v2, host_name=HOST)
    route_set(alias_name="m", split=RouteSplit(baseline=v1, candidate=None, candidate_weight=0, shadow_rate=0,
                                               rollout_id=None))

    route_set(alias_name="m", split=RouteSplit(baseline=v1, candidate=v2, candidate_weight=0.3, shadow_rate=0,
                                               rollout_id=1, gpu_budget=3))
    # The newest baseline engine drains; the traffic waits for the candidate's engine.
    assert [w.pk for w in _running(v1)] == [baseline[0].pk, baseline[1].pk]
    assert EngineWorker.objects.get(pk=baseline[2].pk).state == State.DRAINING
    alias = Alias.objects.get(name="m")
    assert (alias.target_weight, alias.candidate_weight) == (0.3, 0.0)
    capacity = alias_capacity(name="m")
    assert capacity is not None and capacity.waiting is not None and "0 of 1 ready" in capacity.waiting

    _set(baseline[2], State.STOPPED)
    _set(candidate, State.READY)
    assert capacity_sync(alias_name="m")
    assert Alias.objects.get(name="m").candidate_weight == 0.3

    # 0.67: the baseline gives up one more; the candidate gets a second engine only once that one is gone.
    route_set(alias_name="m", split=RouteSplit(baseline=v1, candidate=v2, candidate_weight=0.67, shadow_rate=0,
                                               rollout_id=1, gpu_budget=3))
    assert [w.pk for w in _running(v1)] == [baseline[0].pk]
    assert len(_running(v2)) == 1  # baseline[1] still holds its GPUs while it drains
    _set(baseline[1], State.STOPPED)
    capacity_sync(alias_name="m")
    added = _running(v2)[1]
    assert (added.driver, added.host_name, added.state) == ("local", HOST, State.PENDING)
    assert Alias.objects.get(name="m").candidate_weight == 0.3  # not before the second engine is ready
    _set(added, State.READY)
    capacity_sync(alias_name="m")
    assert Alias.objects.get(name="m").candidate_weight == 0.67

    # A rollback: traffic back at once, the candidate's engines stopped, the baseline's started again.
    route_set(alias_name="m", split=RouteSplit(baseline=v1, candidate=None, candidate_weight=0, shadow_rate=0,
                                               rollout_id=None, gpu_budget=3))
    assert Alias.objects.get(name="m").candidate_weight == 0.0
    assert _running(v2) == []
    for worker in EngineWorker.objects.filter(model_version=v2):
        _set(worker, State.STOPPED)
    capacity_sync(alias_name="m")
    assert len(_running(v1)) == 3
    assert Alias.objects.get(name="m").capacity_targets == {str(v1.pk): 3}
