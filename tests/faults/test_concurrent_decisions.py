"""Two analysis workers and a person act on the same rollout at the same moment: exactly one transition.

Two real Celery worker processes each get an analysis of the rollout; the one that takes the lease
decides to advance and is held just before it applies (tests/faults/paused_celery.py), the other finds
the lease taken. Then the held look and a release manager's "advance" over the REST API, carrying the
version they saw, are let go at once. Whoever commits first moves the rollout one step; the other is
refused (a 409 for the person, a look recorded as not applied for the analysis)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from rollouts.models import Rollout, RolloutAnalysis
from rollouts.services import rollout_create
from rollouts.tasks import analyse_rollout
from tests.faults.conftest import Platform
from tests.rollouts.helpers import both_arms, kinds, quick_plan, step_back, version
from tests.support.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def test_two_analysis_workers_and_a_person_at_once_apply_exactly_one_transition(
    owner: Any, platform: Platform
) -> None:
    version("adder-v1")
    version("adder-v2")
    rollout = rollout_create(plan=quick_plan(), actor=owner.user, start=True).rollout
    # The first step's minimums are met with a clean split: the analysis decides to advance.
    step_back(rollout, 61)
    both_arms(rollout, total=1000, weight=0.1, seed=91)
    seen = Rollout.objects.get(pk=rollout.pk).version

    first = platform.worker("analysis-a", pause=["analysis"])
    second = platform.worker("analysis-b", pause=["analysis"])
    analyse_rollout.delay(rollout.pk)
    analyse_rollout.delay(rollout.pk)
    wait_until(lambda: platform.paused("analysis"), timeout_s=60, what="a look holding the lease")
    # With one task each (prefetch 1, acknowledged late), the other worker got the other look: lease taken.
    wait_until(lambda: "'skipped'" in first.text() + second.text(), timeout_s=60, what="the second look to skip")
    assert len(platform.paused("analysis")) == 1

    answers: dict[str, Any] = {}
    start = threading.Barrier(2)

    def person() -> None:
        start.wait(timeout=10)
        answers["person"] = owner.api().post(
            f"/api/v1/rollouts/{rollout.pk}/advance", {"expected_version": seen, "reason": "looks good to me"},
            format="json",
        )

    def analysis() -> None:
        start.wait(timeout=10)
        platform.release("analysis")

    threads = [threading.Thread(target=person), threading.Thread(target=analysis)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    wait_until(lambda: RolloutAnalysis.objects.filter(rollout=rollout).exists(), timeout_s=60, what="the look's record")

    after = Rollout.objects.get(pk=rollout.pk)
    assert (after.step_index, after.version) == (1, seen + 1)
    assert kinds(after) == ["created", "started", "step_started"]
    (look,) = RolloutAnalysis.objects.filter(rollout=rollout)
    assert look.decision == "advance"
    response = answers["person"]
    event = after.events.get(kind="step_started")
    if response.status_code == 200:
        assert event.actor == "owner" and not look.applied
        assert "not applied" in look.reason and f"expected version {seen}" in look.reason
    else:
        assert response.status_code == 409, response.content
        (said,) = response.json()["errors"]["version"]
        assert said.startswith(
            f"rollout {rollout.pk} changed since it was read: expected version {seen}, found {seen + 1}: it moved from "
            "step 1 of "
        ), said
        assert "moved to the next step by analysis" in said
        assert event.actor == "analysis" and look.applied
