"""The buttons of a rollout: which a person may press now, what each will do (said in its confirmation
dialog), and the POST that calls the service. Roles and states are checked again by the services."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from config.errors import DomainError
from rollouts import selectors
from rollouts.approvals import approval_status
from rollouts.models import Rollout
from rollouts.services import (
    ACTIONS,
    action_allowed,
    rollout_abort,
    rollout_advance,
    rollout_approval_request,
    rollout_approve,
    rollout_pause,
    rollout_promote,
    rollout_reject,
    rollout_resume,
    rollout_rollback,
    rollout_start,
)
from rollouts.views.display import percent, rollout_or_404, ui_actor

ACTION_LABELS = {
    "start": "Start", "pause": "Pause", "resume": "Resume", "approve": "Approve", "reject": "Reject",
    "advance": "Advance now", "promote": "Promote now", "rollback": "Roll back", "abort": "Abort",
    "request_approval": "Ask again for approval",
}  # fmt: skip


DANGER_ACTIONS = {"rollback", "abort", "reject"}
ACTION_SERVICES: dict[str, Any] = {
    "start": rollout_start, "pause": rollout_pause, "resume": rollout_resume, "approve": rollout_approve,
    "reject": rollout_reject, "advance": rollout_advance, "promote": rollout_promote, "rollback": rollout_rollback,
    "abort": rollout_abort, "request_approval": rollout_approval_request,
}  # fmt: skip


assert set(ACTION_SERVICES) == set(ACTIONS)


def _step_text(rollout: Rollout, index: int) -> str:
    steps = rollout.steps
    step = steps[index]
    where = f"step {index + 1} of {len(steps)}"
    weight = float(step["weight"])
    if weight == 0:
        return f"{where}: no users on {rollout.candidate.label}; {percent(float(step['shadow_rate']))} of requests are mirrored to it"
    return f"{where}: {percent(weight)} of the users of {rollout.alias_name} go to {rollout.candidate.label}"


def action_explanation(rollout: Rollout, action: str) -> str:
    alias, base, cand = rollout.alias_name, rollout.baseline.label, rollout.candidate.label
    steps = rollout.steps
    watch = "The analysis keeps checking every guardrail and rolls back by itself on a breach."
    if action == "start":
        gate = rollout.plan.get("eval_gate")
        if gate:
            return (
                f"The eval gate runs first: {base} and {cand} answer the suite {gate.get('suite')}, and no traffic "
                f"moves until {cand} passes it. Then {_step_text(rollout, 0)}."
            )
        if steps and steps[0].get("requires_approval"):
            return f"The rollout starts and waits for an approval of step 1 ({_step_text(rollout, 0)})."
        return f"The rollout starts now: {_step_text(rollout, 0)}. {watch}"
    if action == "approve":
        pending = rollout.step_index + 1
        status = approval_status(rollout=rollout)
        if status is not None and status.remaining > 1:
            return (
                f"You add your approval of {status.what} ({status.text}). It goes ahead once {status.required} "
                "approvers have approved."
            )
        if pending >= len(steps):
            return f"You approve the promotion: {cand} becomes what {alias} serves to every user, and the rollout ends."
        return f"You approve {_step_text(rollout, pending)}. It starts at once. {watch}"
    if action == "reject":
        return (
            f"You refuse the approval: the rollout rolls back and every user of {alias} goes back to {base}."
        )
    if action == "request_approval":
        return (
            "The last approval request expired, so nobody can approve it. This asks again: a new request with its "
            "own notification, and approvals start again from none."
        )
    if action == "advance":
        nxt = rollout.step_index + 1
        if nxt < len(steps):
            if steps[nxt].get("requires_approval"):
                return f"Step {nxt} ends now, without waiting for its minimums; step {nxt + 1} needs an approval, so the rollout then waits for one."
            return f"Step {nxt} ends now, without waiting for its minimums, and {_step_text(rollout, nxt)}."
        if rollout.plan.get("promotion_requires_approval"):
            return (
                "The last step ends now; the promotion needs an approval, so the rollout then waits for one."
            )
        if rollout.bake_s > 0:
            return (f"The last step ends now and {cand} is promoted: all but {percent(rollout.holdout)} of the users of "
                    f"{alias} at once, everyone after a bake of {rollout.bake_s} s with no breach.")
        return f"The last step ends now and {cand} is promoted: it serves every user of {alias}."
    if action == "promote":
        if rollout.state == "baking":
            return f"The bake ends now: the holdout goes to {cand} too, which then serves every user of {alias}. After this the rollout can no longer be rolled back."
        if rollout.bake_s > 0:
            return (f"{cand} is promoted now, skipping any remaining steps: it serves all but {percent(rollout.holdout)} of "
                    f"the users of {alias}, the rest stay on {base} for {rollout.bake_s} s to compare (the bake); then it "
                    "serves everyone.")
        return f"{cand} becomes what {alias} serves to every user now, skipping any remaining steps. The rollout ends as promoted."
    if action == "pause":
        weights = selectors.rollout_weights(rollout=rollout)
        return (
            f"The split stays where it is ({percent(weights['candidate'])} of users on {cand}) and nothing advances until "
            "someone resumes. The analysis still rolls back by itself on a breach."
        )
    if action == "resume":
        return f"The rollout carries on from where it was paused ({(rollout.paused_from or 'running').replace('_', ' ')})."
    if action == "rollback" and rollout.state == "baking":
        return (
            f"The promotion is undone during its bake: every user of {alias} goes back to {base} within a second and the "
            "rollout ends as rolled back."
        )
    if action == "rollback":
        return (
            f"Every user of {alias} goes back to {base} within a second and the rollout ends as rolled back. "
            f"Trying {cand} again needs a new rollout."
        )
    if action == "abort":
        return f"The rollout stops without a verdict: {base} keeps (or gets back) all of {alias}'s traffic."
    return ""


def actions_for(rollout: Rollout, user: Any) -> list[dict[str, Any]]:
    out = []
    for action in selectors.rollout_actions(rollout=rollout, user=user):
        label = ACTION_LABELS[action]
        if action == "approve":
            pending = rollout.step_index + 1
            label = "Approve promotion" if pending >= len(rollout.steps) else f"Approve step {pending + 1}"
        out.append({
            "action": action, "label": label, "danger": action in DANGER_ACTIONS,
            "explanation": action_explanation(rollout, action),
            "url": reverse("rollout-action", args=[rollout.pk, action]),
            "step_index": rollout.step_index + 1 if action in ("approve", "reject") else None,
        })  # fmt: skip
    return out


@require_POST
def rollout_action(request: HttpRequest, rollout_id: int, action: str) -> HttpResponse:
    if not request.user.is_authenticated:
        raise PermissionDenied("log in first")
    if action not in ACTION_SERVICES:
        raise Http404(f"no action {action!r}")
    if not action_allowed(user=request.user, action=action):
        raise PermissionDenied(f"{action} is not open to your role")
    rollout = rollout_or_404(rollout_id)
    kwargs: dict[str, Any] = {
        "rollout": rollout,
        "actor": ui_actor(request),
        "reason": request.POST.get("reason", "")[:2000],
    }
    if action in ("approve", "reject") and (request.POST.get("step_index") or "").isdigit():
        kwargs["step_index"] = int(request.POST["step_index"])
    # The version the page showed: if the rollout moved since (the analysis advanced it, a colleague acted),
    # the click is refused and the page says what changed, rather than acting on a state the person never saw.
    seen = (request.POST.get("expected_version") or "").strip()
    if not seen.isdigit():
        messages.error(
            request, f"Could not {ACTION_LABELS[action].lower()}: the form did not say which version of the rollout "
            "you saw (expected_version). Reload the page and try again.",
        )  # fmt: skip
        return redirect("rollout-detail", rollout_id=rollout.pk)
    kwargs["expected_version"] = int(seen)
    try:
        after = ACTION_SERVICES[action](**kwargs)
    except DomainError as exc:
        messages.error(request, f"Could not {ACTION_LABELS[action].lower()}: {exc.message}")
    else:
        done = f"{ACTION_LABELS[action]}: done. The rollout is now {after.state.replace('_', ' ')}."
        status = approval_status(rollout=after) if action in ("approve", "request_approval") else None
        messages.success(request, f"{done} {status.text}." if status is not None else done)
    return redirect("rollout-detail", rollout_id=rollout.pk)
