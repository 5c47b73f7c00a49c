"""Safe actions: every action names the version its caller saw, a stale one is a 409 saying what changed, and
a retry with the same Idempotency-Key gets the first answer without acting again."""

from __future__ import annotations

from typing import Any

import pytest

from rollouts.actors import ANALYSIS
from rollouts.models import Rollout
from rollouts.services import rollout_advance, rollout_create
from tests.rollouts.helpers import canary_plan, kinds, version

pytestmark = pytest.mark.django_db

THREE_STEPS = [{"weight": 0.1}, {"weight": 0.25}, {"weight": 0.5}]


@pytest.fixture
def rollout(owner: Any) -> Rollout:
    version("adder-v1")
    version("adder-v2")
    return rollout_create(plan=canary_plan(steps=THREE_STEPS), actor=owner.user, start=True).rollout


def advance(member: Any, rollout_id: int, seen: int, key: str | None = None, **body: Any) -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
    return member.api().post(
        f"/api/v1/rollouts/{rollout_id}/advance", {"expected_version": seen, **body}, format="json", **headers
    )


def test_a_retried_advance_with_the_same_key_is_a_no_op_returning_the_first_answer(owner: Any, rollout: Rollout) -> None:
    seen = rollout.version
    first = advance(owner, rollout.pk, seen, key="ci-run-81-advance", reason="manual go")
    assert first.status_code == 200 and first.json()["step_index"] == 1
    assert "Idempotent-Replayed" not in first

    # The CI step timed out waiting for the answer and runs again: it reads the (new) version and sends the
    # same key. The first answer comes back and the rollout stays at step 2.
    retried = advance(owner, rollout.pk, seen + 1, key="ci-run-81-advance", reason="manual go")
    assert retried.status_code == 200 and retried["Idempotent-Replayed"] == "true"
    assert retried.json() == first.json()
    after = Rollout.objects.get(pk=rollout.pk)
    assert (after.step_index, after.version) == (1, seen + 1)
    assert kinds(rollout).count("step_started") == 1

    # The same key for something else is a mistake, said as such.
    other = advance(owner, rollout.pk, seen + 1, key="ci-run-81-advance", reason="another reason")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    # A key is a person's own: another user's identical key is a different request.
    assert Rollout.objects.get(pk=rollout.pk).version == seen + 1


def test_a_stale_action_is_a_409_that_says_what_changed(owner: Any, rollout: Rollout) -> None:
    seen = rollout.version
    # Meanwhile the analysis moved the rollout on.
    rollout_advance(rollout=rollout.pk, actor=ANALYSIS, reason="every guardrail shown safe", expected_version=seen)
    stale = advance(owner, rollout.pk, seen)
    assert stale.status_code == 409
    detail = stale.json()["detail"]
    assert detail == (
        f"rollout {rollout.pk} changed since it was read: expected version {seen}, found {seen + 1}: it moved from "
        "step 1 of 3 to step 2 of 3 since you looked: moved to the next step by analysis (every guardrail shown safe). "
        "Nothing was done: look again, and retry if it still makes sense"
    )
    assert stale.json()["errors"] == {"version": [detail]}
    assert Rollout.objects.get(pk=rollout.pk).step_index == 1

    # A version from the future is no version at all.
    future = advance(owner, rollout.pk, seen + 5)
    assert future.status_code == 409 and "version 7 never existed" in future.json()["detail"]


def test_an_action_without_the_version_is_a_400_naming_the_field(owner: Any, rollout: Rollout) -> None:
    for body in ({}, {"reason": "go", "expected_version": None}):
        response = owner.api().post(f"/api/v1/rollouts/{rollout.pk}/advance", body, format="json")
        assert response.status_code == 400 and list(response.json()["errors"]) == ["expected_version"]
    wrong = owner.api().post(f"/api/v1/rollouts/{rollout.pk}/advance", {"expected_version": "seven"}, format="json")
    assert wrong.status_code == 400 and list(wrong.json()["errors"]) == ["expected_version"]
    assert Rollout.objects.get(pk=rollout.pk).step_index == 0
