"""Approval requests as release teams run them: which step a rollout waits for, who asked and when, until
when the request can be used, who has approved it and who is still needed. Reads only: the services write.

A request is the `awaiting_approval` event that asked (moving the rollout to wait, or asking again after
the last request expired); its `seq` ties the approvals given to it. A step goes ahead once the plan's
`approvals_required` different people with the approver role approved the same unexpired request. The
rollout's creator and the person who asked may not approve unless the plan sets `allow_self_approval`
(four-eyes). One rejection by an approver ends the wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone

from accounts.roles import Role
from accounts.selectors import usernames_with_role
from rollouts.models import Rollout, RolloutApproval, RolloutEvent
from rollouts.plans.model import DEFAULT_APPROVAL_TTL_S, DEFAULT_APPROVALS_REQUIRED

State = Rollout.State
APPROVER_ROLE = Role.APPROVER
# Named in full up to this many; "and N others" after.
_MAX_NAMES = 6


@dataclass(frozen=True)
class Given:
    user_id: int
    username: str
    via: str
    at: datetime


@dataclass(frozen=True)
class ApprovalRequest:
    seq: int  # the awaiting_approval event that asked
    step_index: int  # the step it would start (len(steps): the promotion)
    requested_at: datetime
    requested_by: str  # a username, or "analysis" / "system"
    requested_by_id: int | None
    expires_at: datetime


@dataclass(frozen=True)
class ApprovalStatus:
    """Where one approval request stands, as every surface shows it."""

    rollout_id: int
    request: ApprovalRequest
    step_count: int
    required: int
    given: tuple[Given, ...]
    # Who may not approve this request (four-eyes), with why: {"owner": "created the rollout"}.
    excluded: dict[str, str]
    # People with the approver role who could still approve (not yet approved, not excluded).
    eligible: tuple[str, ...]
    now: datetime

    @property
    def step_index(self) -> int:
        return self.request.step_index

    @property
    def remaining(self) -> int:
        return max(0, self.required - len(self.given))

    @property
    def expired(self) -> bool:
        return self.now >= self.request.expires_at

    @property
    def what(self) -> str:
        if self.request.step_index >= self.step_count:
            return "the promotion"
        return f"step {self.request.step_index + 1} of {self.step_count}"

    def approved_by(self, user_id: int | None) -> Given | None:
        return next((g for g in self.given if g.user_id == user_id), None)

    @property
    def still_needed(self) -> str:
        """"1 more from role approver (bob, carol)"; "" when none is needed."""
        if not self.remaining:
            return ""
        names = list(self.eligible[:_MAX_NAMES])
        if len(self.eligible) > _MAX_NAMES:
            names.append(f"and {len(self.eligible) - _MAX_NAMES} others")
        who = f" ({', '.join(names)})" if names else " (nobody with that role can approve it now)"
        return f"{self.remaining} more from role {APPROVER_ROLE.value}{who}"

    @property
    def text(self) -> str:
        """"1 of 2 approvals for step 3 of 4: alice; 1 more from role approver (bob)"."""
        names = ", ".join(g.username for g in self.given)
        head = f"{len(self.given)} of {self.required} approval{'s' if self.required != 1 else ''} for {self.what}"
        if names:
            head += f": {names}"
        if self.expired:
            return (
                f"{head}. This request expired at {_at(self.request.expires_at)}: it must be asked again "
                "(approvals of an expired request do not count)"
            )
        if self.remaining:
            head += f"; {self.still_needed}"
        return head

    def as_dict(self) -> dict[str, Any]:
        return {
            "step_index": self.request.step_index,
            "what": self.what,
            "approvals_required": self.required,
            "approved": [{"by": g.username, "via": g.via, "at": g.at.isoformat()} for g in self.given],
            "remaining": self.remaining,
            "eligible": list(self.eligible),
            "excluded": dict(self.excluded),
            "request_seq": self.request.seq,
            "requested_at": self.request.requested_at.isoformat(),
            "requested_by": self.request.requested_by,
            "expires_at": self.request.expires_at.isoformat(),
            "expired": self.expired,
            "text": self.text,
        }


def _at(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def approvals_required(rollout: Rollout) -> int:
    return int(rollout.plan.get("approvals_required") or DEFAULT_APPROVALS_REQUIRED)


def approval_ttl(rollout: Rollout) -> timedelta:
    return timedelta(seconds=int(rollout.plan.get("approval_ttl_s") or DEFAULT_APPROVAL_TTL_S))


def waits_for_approval(rollout: Rollout) -> bool:
    """Awaiting an approval, or paused while awaiting one (resuming comes back to the same request)."""
    return rollout.state == State.AWAITING_APPROVAL or (
        rollout.state == State.PAUSED and rollout.paused_from == State.AWAITING_APPROVAL
    )


def approval_request_current(*, rollout: Rollout) -> ApprovalRequest | None:
    """The request the rollout waits on: its latest awaiting_approval event, while it waits."""
    if not waits_for_approval(rollout):
        return None
    event = (
        RolloutEvent.objects.filter(rollout_id=rollout.pk, kind=RolloutEvent.Kind.AWAITING_APPROVAL)
        .order_by("-seq")
        .first()
    )
    if event is None:
        return None
    return ApprovalRequest(
        seq=int(event.seq),
        step_index=rollout.step_index + 1,
        requested_at=event.created_at,
        requested_by=event.actor,
        requested_by_id=event.actor_user_id,
        expires_at=event.created_at + approval_ttl(rollout),
    )


def approvals_given(*, rollout: Rollout, request: ApprovalRequest) -> tuple[Given, ...]:
    rows = (
        RolloutApproval.objects.select_related("approved_by")
        .filter(rollout_id=rollout.pk, step_index=request.step_index, request_seq=request.seq)
        .order_by("created_at", "id")
    )
    seen: dict[int, Given] = {}
    for row in rows:
        seen.setdefault(row.approved_by_id, Given(row.approved_by_id, row.approved_by.get_username(), row.via, row.created_at))
    return tuple(seen.values())


def self_approval_refusal(*, rollout: Rollout, request: ApprovalRequest | None, user_id: int | None) -> str | None:
    """Why the four-eyes rule stops `user_id` from approving, or None when it does not."""
    if user_id is None or rollout.plan.get("allow_self_approval"):
        return None
    if rollout.created_by_id == user_id:
        return "you created this rollout"
    if request is not None and request.requested_by_id == user_id:
        return "you asked for this approval"
    return None


def _excluded(rollout: Rollout, request: ApprovalRequest) -> dict[str, str]:
    if rollout.plan.get("allow_self_approval"):
        return {}
    out: dict[str, str] = {}
    if rollout.created_by is not None:
        out[rollout.created_by.get_username()] = "created the rollout"
    if request.requested_by_id is not None and request.requested_by_id != rollout.created_by_id:
        out.setdefault(request.requested_by, "asked for this approval")
    return out


def approval_status(*, rollout: Rollout, now: datetime | None = None) -> ApprovalStatus | None:
    """The current request's status, or None when the rollout waits for no approval."""
    request = approval_request_current(rollout=rollout)
    if request is None:
        return None
    given = approvals_given(rollout=rollout, request=request)
    excluded = _excluded(rollout, request)
    done = {g.username for g in given}
    eligible = tuple(name for name in usernames_with_role(role=APPROVER_ROLE) if name not in done and name not in excluded)
    return ApprovalStatus(
        rollout_id=int(rollout.pk), request=request, step_count=len(rollout.steps), required=approvals_required(rollout),
        given=given, excluded=excluded, eligible=eligible, now=now or timezone.now(),
    )  # fmt: skip


def step_approvers(*, rollout: Rollout) -> dict[int, list[str]]:
    """Per step index, who approved its latest request (the one that let it go ahead, or the current one):
    for the steps table."""
    latest: dict[int, tuple[int, list[str]]] = {}
    for step_index, request_seq, username in (
        RolloutApproval.objects.filter(rollout_id=rollout.pk)
        .order_by("step_index", "request_seq", "created_at", "id")
        .values_list("step_index", "request_seq", "approved_by__username")
    ):
        seq, names = latest.get(int(step_index), (-1, []))
        if request_seq != seq:
            seq, names = int(request_seq), []
        if username not in names:
            names.append(username)
        latest[int(step_index)] = (seq, names)
    return {index: names for index, (_, names) in latest.items()}
