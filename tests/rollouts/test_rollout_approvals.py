"""Approvals as release teams run them: N of the approver role, each person once, requests that expire and
are asked again, four-eyes against the creator and whoever asked, and one rejection ending the wait. Through
the API as a CI job or an approver's script calls it, and the services beneath."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from accounts.roles import Role
from accounts.services import api_token_create, user_create
from config.errors import Conflict, Forbidden
from rollouts.models import Rollout, RolloutApproval, RolloutEvent
from rollouts.plans import PlanInvalid, plan_normalise
from rollouts.services import rollout_advance, rollout_approve, rollout_create, rollout_reject
from tests.conftest import Member
from tests.rollouts.helpers import canary_plan, kinds, version

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions() -> None:
    version("adder-v1")
    version("adder-v2")


def member(username: str, *roles: Role) -> Member:
    user = user_create(username=username, password=f"{username}-password-1", roles=list(roles))
    return Member(user=user, token=api_token_create(user=user, name="tests").raw)


@pytest.fixture
def alice(db: None) -> Member:
    return member("alice", Role.APPROVER)


@pytest.fixture
def bob(db: None) -> Member:
    return member("bob", Role.APPROVER)


@pytest.fixture
def carol(db: None) -> Member:
    return member("carol", Role.APPROVER)


def waiting(owner: Member, **plan: Any) -> Rollout:
    """A canary whose second step needs approvals, moved there by its owner."""
    overrides: dict[str, Any] = {"steps": [{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}]}
    overrides.update(plan)
    rollout = rollout_create(plan=canary_plan(**overrides), actor=owner.user, start=True).rollout
    rollout = rollout_advance(rollout=rollout, actor=owner.user, reason="step 1 looks fine")
    assert rollout.state == "awaiting_approval"
    return rollout


def act(who: Member, rollout: Rollout, action: str, **body: Any) -> Any:
    seen = Rollout.objects.get(pk=rollout.pk).version
    return who.api().post(f"/api/v1/rollouts/{rollout.pk}/{action}", {"expected_version": seen, **body}, format="json")


def fresh(rollout: Rollout) -> Rollout:
    return Rollout.objects.get(pk=rollout.pk)


def test_two_of_n_approvals_each_person_counted_once(owner: Member, alice: Member, bob: Member, carol: Member,
                                                     versions: None) -> None:  # fmt: skip
    rollout = waiting(owner, approvals_required=2)
    status = owner.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert status["approval"]["text"] == (
        "0 of 2 approvals for step 2 of 2; 2 more from role approver (alice, bob, carol)"
    )

    first = act(alice, rollout, "approve", step_index=1, reason="dashboards fine")
    assert first.status_code == 200, first.json()
    body = first.json()
    assert body["state"] == "awaiting_approval" and body["step_index"] == 0
    assert body["approval"]["text"] == "1 of 2 approvals for step 2 of 2: alice; 1 more from role approver (bob, carol)"
    assert [a["by"] for a in body["approval"]["approved"]] == ["alice"]
    assert "approve" not in body["actions"] and "reject" in body["actions"]  # alice has had her say

    # The same person again does not make two: refused, nothing changes.
    again = act(alice, rollout, "approve", step_index=1)
    assert again.status_code == 409
    assert again.json()["detail"].startswith("you approved step 2 of 2 already at ")
    assert "each approver counts once (1 of 2 approvals for step 2 of 2: alice;" in again.json()["detail"]
    assert fresh(rollout).state == "awaiting_approval"
    assert RolloutApproval.objects.filter(rollout=rollout).count() == 1

    # Bob's page was loaded before alice approved: the only change since is another approval of the same
    # request, so his approval still counts, and it is the second: the step goes ahead.
    seen_before_alice = fresh(rollout).version - 1
    second = bob.api().post(
        f"/api/v1/rollouts/{rollout.pk}/approve", {"expected_version": seen_before_alice, "step_index": 1}, format="json"
    )
    assert second.status_code == 200, second.json()
    assert (second.json()["state"], second.json()["step_index"], second.json()["approval"]) == ("running", 1, None)
    assert kinds(rollout)[-3:] == ["awaiting_approval", "approval_added", "approved"]
    approved = RolloutEvent.objects.filter(rollout=rollout).order_by("seq").last()
    assert approved is not None and approved.reason == "step 2 approved by alice, bob"
    assert carol.user.pk not in RolloutApproval.objects.filter(rollout=rollout).values_list("approved_by", flat=True)


def test_an_expired_request_cannot_be_used_and_is_asked_again(owner: Member, alice: Member, bob: Member,
                                                              versions: None, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    rollout = waiting(owner, approvals_required=2, approval_ttl_s=3600)
    assert act(alice, rollout, "approve").status_code == 200
    # Two hours later the request (and alice's approval of it) can no longer be used.
    later = timezone.now() + timedelta(hours=2)
    monkeypatch.setattr(timezone, "now", lambda: later)
    detail = owner.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert detail["approval"]["expired"] is True
    assert "This request expired at" in detail["approval"]["text"] and "must be asked again" in detail["approval"]["text"]
    assert detail["actions"] == ["pause", "request_approval", "rollback", "abort"]

    late = act(bob, rollout, "approve", step_index=1)
    assert late.status_code == 409 and late.json()["errors"].keys() == {"approval"}
    assert late.json()["detail"].startswith("the approval request for step 2 of 2 expired at ")
    assert "a release manager must ask again (`rolloutctl request-approval" in late.json()["detail"]
    assert act(bob, rollout, "reject").status_code == 409  # nor rejected: roll back instead
    assert fresh(rollout).state == "awaiting_approval"

    # Asked again: a new request (a new notable event, so a new notification), approvals from none.
    asked_again = act(owner, rollout, "request-approval")
    assert asked_again.status_code == 200, asked_again.json()
    assert asked_again.json()["approval"]["text"].startswith("0 of 2 approvals for step 2 of 2; 2 more")
    event = RolloutEvent.objects.filter(rollout=rollout).order_by("seq").last()
    assert event is not None and event.kind == "awaiting_approval" and event.actor == "owner"
    assert event.notification.status in ("pending", "sent")
    assert act(owner, rollout, "request-approval").status_code == 409  # the new one is open

    assert act(alice, rollout, "approve").json()["state"] == "awaiting_approval"  # her old one does not count
    assert act(bob, rollout, "approve").json()["state"] == "running"


def test_reject_by_any_approver_ends_the_wait(owner: Member, alice: Member, bob: Member, versions: None) -> None:
    rollout = waiting(owner, approvals_required=3)
    assert act(alice, rollout, "approve").status_code == 200
    rejected = act(bob, rollout, "reject", step_index=1, reason="latency dashboards look off")
    assert rejected.status_code == 200
    assert (rejected.json()["state"], rejected.json()["weights"]["candidate"]) == ("rolled_back", 0.0)
    last = RolloutEvent.objects.filter(rollout=rollout).order_by("seq").last()
    assert last is not None and (last.kind, last.actor, last.reason) == ("rolled_back", "bob", "latency dashboards look off")


def test_self_approval_is_refused_unless_the_plan_allows_it(versions: None, alice: Member) -> None:
    # A person with both roles: creates the rollout, or asks for the step.
    lead = member("lead", Role.RELEASE_MANAGER, Role.APPROVER)
    other_lead = member("other-lead", Role.RELEASE_MANAGER, Role.APPROVER)

    own = waiting(lead)
    refused = act(lead, own, "approve")
    assert refused.status_code == 403 and refused.json()["detail"] == (
        "four-eyes rule: you created this rollout, so another approver must approve it (or the plan sets "
        "allow_self_approval)"
    )
    assert "approve" not in lead.api().get(f"/api/v1/rollouts/{own.pk}").json()["actions"]
    rollout_reject(rollout=own, actor=alice.user)

    # Created by lead, but other-lead moved it to wait for the approval: other-lead may not approve either.
    rollout = rollout_create(
        plan=canary_plan(steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}]), actor=lead.user, start=True
    ).rollout
    rollout_advance(rollout=rollout, actor=other_lead.user)
    with pytest.raises(Forbidden, match="four-eyes rule: you asked for this approval"):
        rollout_approve(rollout=rollout, actor=other_lead.user)
    detail = alice.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert detail["approval"]["excluded"] == {"lead": "created the rollout", "other-lead": "asked for this approval"}
    assert detail["approval"]["eligible"] == ["alice"]
    assert rollout_approve(rollout=rollout, actor=alice.user).state == "running"

    # The plan may allow it: then the creator's approval counts like anyone's (once).
    allowed = rollout_create(
        plan=canary_plan(alias="other", steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}],
                         allow_self_approval=True, approvals_required=2),
        actor=lead.user, start=True,
    ).rollout  # fmt: skip
    rollout_advance(rollout=allowed, actor=lead.user)
    assert rollout_approve(rollout=allowed, actor=lead.user).state == "awaiting_approval"
    with pytest.raises(Conflict, match="each approver counts once"):
        rollout_approve(rollout=allowed, actor=lead.user)
    assert rollout_approve(rollout=allowed, actor=alice.user).state == "running"


def test_the_plan_fields_have_defaults_and_limits() -> None:
    base = canary_plan()
    plan = plan_normalise(base)
    assert (plan.approvals_required, plan.approval_ttl_s) == (1, 86400)
    assert plan.to_dict()["approvals_required"] == 1 and plan.to_dict()["approval_ttl_s"] == 86400
    with pytest.raises(PlanInvalid) as bad:
        plan_normalise({**base, "approvals_required": 0, "approval_ttl_s": 5})
    assert bad.value.errors == {
        "approvals_required": ["must be from 1 to 20, got 0"],
        "approval_ttl_s": ["must be from 60 to 2592000, got 5"],
    }


def test_the_promotion_also_waits_for_n_approvals(owner: Member, alice: Member, bob: Member, versions: None) -> None:
    rollout = rollout_create(
        plan=canary_plan(steps=[{"weight": 0.1}], promotion_requires_approval=True, approvals_required=2),
        actor=owner.user, start=True,
    ).rollout  # fmt: skip
    rollout = rollout_advance(rollout=rollout, actor=owner.user)
    assert rollout.state == "awaiting_approval"
    assert act(alice, rollout, "approve").json()["approval"]["text"].startswith("1 of 2 approvals for the promotion: alice")
    assert act(bob, rollout, "approve").json()["state"] == "baking"  # promoted, watched against its holdout
