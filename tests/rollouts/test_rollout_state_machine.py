from __future__ import annotations

from typing import Any

import pytest

from config.errors import Conflict, DomainError, Forbidden
from rollouts.models import Rollout, RolloutEvent
from rollouts.plans import PlanInvalid
from rollouts.services import (
    rollout_abort,
    rollout_advance,
    rollout_approve,
    rollout_create,
    rollout_pause,
    rollout_promote,
    rollout_reject,
    rollout_resume,
    rollout_rollback,
    rollout_start,
)
from serving.selectors import alias_get
from tests.rollouts.helpers import canary_plan, kinds, version

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions() -> None:
    version("adder-v1")
    version("adder-v2")


def create(owner: Any, **overrides: Any) -> Rollout:
    return rollout_create(plan=canary_plan(**overrides), actor=owner.user).rollout


def test_a_canary_walks_its_steps_and_promotes_moving_the_alias(owner: Any, versions: None) -> None:
    rollout = create(owner)
    assert rollout.state == "draft" and alias_get(name="adder") is None

    rollout = rollout_start(rollout=rollout, actor=owner.user)
    assert (rollout.state, rollout.step_index) == ("running", 0)
    alias = alias_get(name="adder")
    assert alias is not None and alias.candidate is not None
    assert (alias.baseline.label, alias.candidate.label, alias.candidate_weight) == ("adder-v1", "adder-v2", 0.1)
    assert alias.rollout_id == rollout.pk

    rollout = rollout_advance(rollout=rollout, actor=owner.user, reason="looks fine")
    assert (rollout.state, rollout.step_index) == ("running", 1)
    assert alias_get(name="adder").candidate_weight == 0.5  # type: ignore[union-attr]

    # Promotion bakes: 95 % of sessions on the candidate, 5 % held out on the baseline, still the rollout's.
    rollout = rollout_advance(rollout=rollout, actor=owner.user)
    assert rollout.state == "baking" and rollout.bake_started_at is not None and rollout.ended_at is None
    alias = alias_get(name="adder")
    assert alias is not None and alias.candidate is not None
    assert (alias.baseline.label, alias.candidate.label, alias.candidate_weight, alias.rollout_id) == (
        "adder-v1", "adder-v2", 0.95, rollout.pk)
    last = rollout.events.order_by("seq").last()
    assert last is not None and (last.kind, last.to_state, last.actor, last.from_state) == ("promoted", "baking", "owner", "running")

    # Promoting a baking rollout ends its bake now: the candidate takes every session.
    rollout = rollout_promote(rollout=rollout, actor=owner.user, reason="bake looks fine")
    assert rollout.state == "promoted" and rollout.ended_at is not None
    alias = alias_get(name="adder")
    assert alias is not None
    assert (alias.baseline.label, alias.candidate, alias.candidate_weight, alias.rollout_id) == ("adder-v2", None, 0.0, None)
    assert kinds(rollout) == ["created", "started", "step_started", "promoted", "baked"]


def test_rollback_sends_everyone_back_to_the_baseline(owner: Any, approver: Any, versions: None) -> None:
    rollout = rollout_start(rollout=create(owner), actor=owner.user)
    rollout = rollout_rollback(rollout=rollout, actor=approver.user, reason="latency looks off")
    assert rollout.state == "rolled_back"
    alias = alias_get(name="adder")
    assert alias is not None and (alias.baseline.label, alias.candidate, alias.candidate_weight) == ("adder-v1", None, 0.0)
    event = rollout.events.order_by("seq").last()
    assert event is not None and (event.kind, event.actor, event.reason) == ("rolled_back", "approver", "latency looks off")


@pytest.mark.parametrize(
    ("prepare", "action", "found"),
    [
        ("draft", rollout_advance, "draft"),
        ("draft", rollout_pause, "draft"),
        ("draft", rollout_rollback, "draft"),
        ("running", rollout_start, "running"),
        ("running", rollout_resume, "running"),
        ("rolled_back", rollout_rollback, "rolled_back"),
        ("rolled_back", rollout_start, "rolled_back"),
        ("baking", rollout_abort, "baking"),
        ("promoted", rollout_abort, "promoted"),
        ("promoted", rollout_promote, "promoted"),
    ],
)
def test_a_transition_from_the_wrong_state_is_a_409_saying_what_was_expected(
    owner: Any, versions: None, prepare: str, action: Any, found: str
) -> None:
    rollout = create(owner)
    if prepare != "draft":
        rollout = rollout_start(rollout=rollout, actor=owner.user)
    if prepare == "rolled_back":
        rollout = rollout_rollback(rollout=rollout, actor=owner.user)
    if prepare in ("baking", "promoted"):
        rollout = rollout_promote(rollout=rollout, actor=owner.user)
    if prepare == "promoted":
        rollout = rollout_promote(rollout=rollout, actor=owner.user)  # the bake ends
    events_before = RolloutEvent.objects.filter(rollout=rollout).count()
    with pytest.raises(Conflict) as refused:
        action(rollout=rollout, actor=owner.user)
    assert refused.value.status_code == 409
    assert "expected state" in refused.value.message and f"found {found}" in refused.value.message
    assert RolloutEvent.objects.filter(rollout=rollout).count() == events_before
    assert Rollout.objects.get(pk=rollout.pk).state == found


def test_an_approval_step_waits_and_four_eyes_hold(owner: Any, approver: Any, versions: None) -> None:
    plan = canary_plan(steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}])
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    rollout = rollout_advance(rollout=rollout, actor=owner.user)
    assert (rollout.state, rollout.step_index) == ("awaiting_approval", 0)
    assert alias_get(name="adder").candidate_weight == 0.1  # type: ignore[union-attr]

    with pytest.raises(Forbidden):  # a release manager is not an approver
        rollout_approve(rollout=rollout, actor=owner.user)
    with pytest.raises(Conflict):  # no skipping the approval
        rollout_advance(rollout=rollout, actor=owner.user)

    rollout = rollout_approve(rollout=rollout, actor=approver.user, reason="numbers look good", step_index=1)
    assert (rollout.state, rollout.step_index) == ("running", 1)
    assert alias_get(name="adder").candidate_weight == 0.5  # type: ignore[union-attr]
    with pytest.raises(Conflict, match="already approved by approver"):
        rollout_approve(rollout=rollout, actor=approver.user, step_index=1)


def test_the_creator_cannot_approve_their_own_rollout_unless_the_plan_allows(platform_admin: Any, versions: None) -> None:
    plan = canary_plan(steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}])
    rollout = rollout_create(plan=plan, actor=platform_admin.user, start=True).rollout
    rollout = rollout_advance(rollout=rollout, actor=platform_admin.user)
    with pytest.raises(Forbidden, match="four-eyes"):
        rollout_approve(rollout=rollout, actor=platform_admin.user)
    assert Rollout.objects.get(pk=rollout.pk).state == "awaiting_approval"
    rollout_abort(rollout=rollout, actor=platform_admin.user)

    allowed = rollout_create(plan={**plan, "allow_self_approval": True}, actor=platform_admin.user, start=True).rollout
    allowed = rollout_advance(rollout=allowed, actor=platform_admin.user)
    assert rollout_approve(rollout=allowed, actor=platform_admin.user).state == "running"


def test_reject_rolls_back_and_pause_resume_returns_where_it_was(owner: Any, approver: Any, versions: None) -> None:
    plan = canary_plan(steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}])
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    rollout = rollout_advance(rollout=rollout, actor=owner.user)
    rollout = rollout_pause(rollout=rollout, actor=approver.user, reason="looking")
    assert (rollout.state, rollout.paused_from) == ("paused", "awaiting_approval")
    rollout = rollout_resume(rollout=rollout, actor=owner.user)
    assert rollout.state == "awaiting_approval"
    rollout = rollout_reject(rollout=rollout, actor=approver.user, reason="not convinced")
    assert rollout.state == "rolled_back"
    assert kinds(rollout)[-3:] == ["paused", "resumed", "rolled_back"]


def test_one_live_rollout_per_alias(owner: Any, versions: None) -> None:
    version("adder-v3")
    first = create(owner)
    with pytest.raises(Conflict, match="already has a live rollout"):
        create(owner, candidate="adder-v3")
    rollout_abort(rollout=first, actor=owner.user)
    assert create(owner, candidate="adder-v3").state == "draft"


def test_the_database_refuses_a_second_live_rollout_on_an_alias_too(owner: Any, versions: None) -> None:
    from django.db import IntegrityError, transaction

    first = create(owner)
    with pytest.raises(IntegrityError), transaction.atomic():
        Rollout.objects.create(
            alias_name="adder", baseline=first.baseline, candidate=first.candidate, strategy="canary", plan=first.plan
        )


def test_starting_needs_ready_engines(owner: Any) -> None:
    version("adder-v1")
    version("adder-v2", ready=False)
    rollout = create(owner)
    with pytest.raises(DomainError) as refused:
        rollout_start(rollout=rollout, actor=owner.user)
    assert refused.value.field == "candidate" and "no ready engine for adder-v2" in refused.value.message
    with pytest.raises(PlanInvalid) as invalid:
        rollout_create(plan=canary_plan(alias="other"), actor=owner.user, start=True)
    assert invalid.value.errors == {"candidate": ["no ready engine for adder-v2"]}


def test_roles_are_enforced_by_the_services(viewer: Any, owner: Any, approver: Any, versions: None) -> None:
    with pytest.raises(Forbidden):
        rollout_create(plan=canary_plan(), actor=viewer.user)
    rollout = rollout_start(rollout=create(owner), actor=owner.user)
    with pytest.raises(Forbidden):
        rollout_advance(rollout=rollout, actor=approver.user)
    with pytest.raises(Forbidden):
        rollout_pause(rollout=rollout, actor=viewer.user)


def test_events_are_append_only(owner: Any, versions: None) -> None:
    rollout = create(owner)
    event = rollout.events.get()
    event.reason = "rewritten"
    with pytest.raises(TypeError):
        event.save()
    with pytest.raises(TypeError):
        event.delete()
    with pytest.raises(TypeError):
        RolloutEvent.objects.filter(rollout=rollout).update(reason="rewritten")
    with pytest.raises(TypeError):
        RolloutEvent.objects.filter(rollout=rollout).delete()
    assert RolloutEvent.objects.get(pk=event.pk).reason == ""
