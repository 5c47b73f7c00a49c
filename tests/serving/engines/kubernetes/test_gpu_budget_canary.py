"""A canary that fits a GPU budget, end to end on the stand-in cluster: a rollout's plan gives the alias a
budget of 4 replicas on 4 one-GPU nodes; at each step the baseline gives up the replicas the candidate's
weight needs (drained first), the candidate grows into the freed GPUs, and the traffic moves only once the
candidate's replicas are ready; a rollback gives them back, a promotion hands the candidate all four."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from rollouts.analysis import rollout_look
from rollouts.models import Rollout
from rollouts.services import rollout_advance, rollout_create, rollout_promote, rollout_rollback
from serving.engines.kubernetes.manifests import WORKER_LABEL
from serving.engines.kubernetes.reconciler import KubernetesReconciler
from serving.gateway.routing import route_table_build
from serving.gateway.table import route_rows_load
from serving.models import Alias, EngineWorker, ModelVersion
from serving.services import RouteSplit, route_set
from tests.serving.engines.kubernetes.conftest import IMAGE, NAMESPACE, kube_worker, until, version
from tests.support.kube import EngineImage, KubeStandin, kube_standin

BUDGET = 4
State = EngineWorker.State


@pytest.fixture
def kube() -> Iterator[KubeStandin]:
    with kube_standin(nodes={f"gpu-{i}": 1 for i in range(BUDGET)}) as standin:
        standin.images[IMAGE] = EngineImage()
        yield standin
        assert standin.store.rejected == []


class Fleet:
    def __init__(
        self,
        kube: KubeStandin,
        reconciler: KubernetesReconciler,
        baseline: EngineWorker,
        candidate: EngineWorker,
    ) -> None:
        self.kube, self.reconciler, self.baseline, self.candidate = kube, reconciler, baseline, candidate
        self.most_asked = 0

    def pods(self, worker: EngineWorker) -> list[dict[str, Any]]:
        return [
            p
            for p in self.kube.pods(NAMESPACE, **{WORKER_LABEL: str(worker.pk)})
            if not p["metadata"].get("deletionTimestamp")
        ]

    def step(self) -> None:
        """One reconcile pass, checking the budget holds: never more replicas asked for than it allows."""
        self.reconciler.reconcile()
        asked = sum(
            w.replicas
            for w in EngineWorker.objects.filter(
                pk__in=[self.baseline.pk, self.candidate.pk], desired_state="running"
            )
        )
        self.most_asked = max(self.most_asked, asked)
        assert asked <= BUDGET

    def settle(self, weight: float, baseline: int, candidate: int, what: str) -> Alias:
        """Passes until the alias routes `weight` with those ready replicas; the traffic never moved before the
        candidate's replicas were ready."""

        def done() -> Alias | None:
            alias = Alias.objects.get(name="adder")
            b = EngineWorker.objects.get(pk=self.baseline.pk)
            c = EngineWorker.objects.get(pk=self.candidate.pk)
            if alias.candidate_weight > 0 and alias.candidate_id is not None:
                assert c.ready_replicas >= 1, "traffic moved to a candidate with no ready replica"
            ready_b = b.ready_replicas if b.desired_state == "running" and b.state == State.READY else 0
            ready_c = c.ready_replicas if c.desired_state == "running" and c.state == State.READY else 0
            if (alias.candidate_weight, ready_b, ready_c, len(self.pods(b)), len(self.pods(c))) == (
                weight,
                baseline,
                candidate,
                baseline,
                candidate,
            ):
                return alias
            return None

        return self.kube.wait(done, what, timeout_s=60, step=self.step)

    def routed(self) -> tuple[float, int, int]:
        route = route_table_build(route_rows_load()).aliases["adder"]
        return (
            route.candidate_weight,
            len(route.baseline.replicas),
            len(route.candidate.replicas) if route.candidate is not None else 0,
        )


@pytest.fixture
def fleet(kube: KubeStandin, reconciler: KubernetesReconciler) -> Fleet:
    v1, v2 = version("adder", "v1"), version("adder", "v2")
    route_set(
        alias_name="adder",
        split=RouteSplit(baseline=v1, candidate=None, candidate_weight=0, shadow_rate=0, rollout_id=None),
    )
    baseline = until(
        kube,
        reconciler,
        kube_worker(v1, replicas=BUDGET),
        lambda w: w.ready_replicas == BUDGET,
        "the baseline on all four GPUs",
    )
    candidate = kube_worker(v2, replicas=1)
    waiting = until(
        kube,
        reconciler,
        candidate,
        lambda w: "unschedulable" in w.state_reason,
        "the candidate waiting for a GPU",
    )
    assert "no node has 1 free nvidia.com/gpu" in waiting.state_reason
    return Fleet(kube, reconciler, baseline, candidate)


def _page(owner: Any, rollout: Rollout) -> str:
    client = Client()
    client.force_login(owner.user)
    response = client.get(f"/rollouts/{rollout.pk}")
    assert response.status_code == 200
    return response.content.decode()


def plan(**extra: Any) -> dict[str, Any]:
    return {
        "alias": "adder",
        "candidate": "adder-v2",
        "strategy": "canary",
        "gpu_budget": BUDGET,
        "steps": [{"weight": 0.1}, {"weight": 0.5}, {"weight": 0.75}],
        **extra,
    }


def test_a_canary_within_a_gpu_budget_from_10_percent_up_and_back(owner: Any, fleet: Fleet) -> None:
    rollout = rollout_create(plan=plan(), actor=owner.user, start=True).rollout
    alias = Alias.objects.get(name="adder")
    # The step started, but its traffic waits for the candidate's replica (the baseline gives one up first).
    assert (alias.target_weight, alias.candidate_weight, alias.gpu_budget) == (0.1, 0.0, BUDGET)
    look, _ = rollout_look(rollout=Rollout.objects.get(pk=rollout.pk))
    assert look.decision == "hold" and look.reason.startswith(
        "waiting for the candidate's replicas before moving to 10%: 0 of 1 ready"
    )
    page = _page(owner, rollout)
    assert "waiting for the candidate&#x27;s replicas before moving to 10%: 0 of 1 ready" in page
    assert "baseline 4 ready, 3 wanted · candidate 0 ready, 1 wanted, 1 holding GPUs" in page

    fleet.settle(0.1, 3, 1, "10 %: baseline 3, candidate 1")
    assert fleet.routed() == (0.1, 3, 1)
    page = _page(owner, rollout)  # the replicas of each arm beside the weights
    assert "GPU budget 4" in page and "baseline 3 ready, 3 wanted · candidate 1 ready, 1 wanted" in page
    assert "Traffic waits" not in page
    look, _ = rollout_look(rollout=Rollout.objects.get(pk=rollout.pk))
    assert "waiting for the candidate" not in look.reason  # the step is judged from here on

    rollout_advance(rollout=rollout.pk, actor=owner.user, reason="next")
    assert Alias.objects.get(name="adder").candidate_weight == 0.1  # held at 10 % while the replicas move
    fleet.settle(0.5, 2, 2, "50 %: baseline 2, candidate 2")
    rollout_advance(rollout=rollout.pk, actor=owner.user, reason="next")
    fleet.settle(0.75, 1, 3, "75 %: baseline 1, candidate 3")
    assert fleet.routed() == (0.75, 1, 3)

    # And back: the traffic returns at once, then the GPUs follow.
    rollout_rollback(rollout=rollout.pk, actor=owner.user, reason="back")
    alias = Alias.objects.get(name="adder")
    assert (alias.candidate_id, alias.candidate_weight) == (None, 0.0)
    fleet.settle(0.0, BUDGET, 0, "the baseline back on all four GPUs")
    assert EngineWorker.objects.get(pk=fleet.candidate.pk).state == State.STOPPED
    assert Alias.objects.get(name="adder").capacity_targets == {str(fleet.baseline.model_version_id): BUDGET}
    assert fleet.most_asked == BUDGET


def test_a_promotion_hands_the_candidate_the_whole_budget(owner: Any, fleet: Fleet) -> None:
    # No bake here (bake_s 0): the promotion is final at once. A bake keeps a baseline holdout, and its
    # replica, until it ends (test_rollout_policy has the bake).
    rollout = rollout_create(plan=plan(bake_s=0), actor=owner.user, start=True).rollout
    fleet.settle(0.1, 3, 1, "10 %")
    rollout_promote(rollout=rollout.pk, actor=owner.user, reason="ship it")
    alias = Alias.objects.get(name="adder")
    assert (alias.baseline_id, alias.candidate_id) == (fleet.candidate.model_version_id, None)

    def promoted() -> bool:
        c = EngineWorker.objects.get(pk=fleet.candidate.pk)
        b = EngineWorker.objects.get(pk=fleet.baseline.pk)
        return c.ready_replicas == BUDGET and b.state == State.STOPPED and not fleet.pods(b)

    fleet.kube.wait(
        promoted, "the candidate on all four GPUs, the old baseline gone", timeout_s=60, step=fleet.step
    )
    assert fleet.routed() == (0.0, BUDGET, 0)
    assert ModelVersion.objects.get(pk=alias.baseline_id).label == "adder-v2"
