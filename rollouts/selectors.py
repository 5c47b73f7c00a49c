"""Reads of rollouts for the API, the UI and Slack."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import OuterRef, QuerySet, Subquery
from django.utils import timezone

from config.errors import NotFound
from rollouts.approvals import approval_status, self_approval_refusal
from rollouts.holding import holding_lines
from rollouts.models import Rollout, RolloutAnalysis, RolloutApproval, RolloutEvent
from rollouts.services import ACTION_STATES, ACTIONS, action_allowed

State = Rollout.State


def rollout_get(*, rollout_id: int) -> Rollout:
    rollout = Rollout.objects.select_related("baseline", "candidate", "created_by").filter(pk=rollout_id).first()
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id}")
    return rollout


def rollout_list(*, state: str | None = None, alias: str | None = None, live: bool | None = None) -> QuerySet[Rollout]:
    """Newest first. `state` may be a comma-separated list; `live` keeps only (or drops) live rollouts."""
    rollouts = Rollout.objects.select_related("baseline", "candidate", "created_by").order_by("-created_at", "-id")
    if state:
        rollouts = rollouts.filter(state__in=[s.strip() for s in state.split(",") if s.strip()])
    if alias:
        rollouts = rollouts.filter(alias_name=alias)
    if live is True:
        rollouts = rollouts.filter(state__in=Rollout.LIVE_STATES)
    elif live is False:
        rollouts = rollouts.filter(state__in=Rollout.TERMINAL_STATES)
    return rollouts


def rollouts_awaiting_approval() -> QuerySet[Rollout]:
    """Oldest request first: who has waited longest."""
    return Rollout.objects.select_related("baseline", "candidate").filter(state=State.AWAITING_APPROVAL).order_by("updated_at")


def rollout_events(*, rollout: Rollout | int, after_seq: int | None = None) -> QuerySet[RolloutEvent]:
    rollout_id = rollout if isinstance(rollout, int) else rollout.pk
    events = RolloutEvent.objects.filter(rollout_id=rollout_id).order_by("seq")
    if after_seq is not None:
        events = events.filter(seq__gt=after_seq)
    return events


def rollout_series(
    *, rollout: Rollout | int, since: datetime | None = None, limit: int = 500
) -> list[RolloutAnalysis]:
    """The latest `limit` looks (oldest first) after `since`: what the UI charts."""
    rollout_id = rollout if isinstance(rollout, int) else rollout.pk
    looks = RolloutAnalysis.objects.filter(rollout_id=rollout_id)
    if since is not None:
        looks = looks.filter(created_at__gt=since)
    return list(reversed(list(looks.order_by("-created_at", "-id")[:limit])))


def rollout_latest_analysis(*, rollout: Rollout | int) -> RolloutAnalysis | None:
    rollout_id = rollout if isinstance(rollout, int) else rollout.pk
    return RolloutAnalysis.objects.filter(rollout_id=rollout_id).order_by("-created_at", "-id").first()


def rollout_latest_analyses(*, rollout_ids: list[int]) -> dict[int, RolloutAnalysis]:
    """The latest stored look of each rollout, in two queries however many rollouts (pages read these and
    never recompute a look)."""
    latest = (
        Rollout.objects.filter(pk__in=rollout_ids)
        .annotate(
            latest_id=Subquery(
                RolloutAnalysis.objects.filter(rollout_id=OuterRef("pk")).order_by("-created_at", "-id").values("pk")[:1]
            )
        )
        .values_list("latest_id", flat=True)
    )
    looks = RolloutAnalysis.objects.filter(pk__in=[pk for pk in latest if pk is not None])
    return {look.rollout_id: look for look in looks}


def rollout_approvals(*, rollout: Rollout | int) -> QuerySet[RolloutApproval]:
    rollout_id = rollout if isinstance(rollout, int) else rollout.pk
    return RolloutApproval.objects.select_related("approved_by").filter(rollout_id=rollout_id).order_by("step_index")


def rollout_weights(*, rollout: Rollout) -> dict[str, float]:
    """The split the rollout's state implies (what its alias routes while it is live)."""
    if rollout.state == State.PROMOTED:
        return {"baseline": 0.0, "candidate": 1.0, "shadow": 0.0}
    if rollout.state == State.BAKING:
        return {"baseline": round(rollout.holdout, 6), "candidate": round(1.0 - rollout.holdout, 6), "shadow": 0.0}
    step = rollout.current_step
    if rollout.state in (State.DRAFT, State.ROLLED_BACK, State.ABORTED, State.GATING) or step is None:
        return {"baseline": 1.0, "candidate": 0.0, "shadow": 0.0}
    weight = float(step["weight"])
    return {"baseline": round(1.0 - weight, 6), "candidate": weight, "shadow": float(step["shadow_rate"])}


def rollout_pending_step(*, rollout: Rollout) -> int | None:
    """The step index an approval would start (len(steps) is the promotion), when awaiting one."""
    if rollout.state != State.AWAITING_APPROVAL:
        return None
    return rollout.step_index + 1


def rollout_actions(*, rollout: Rollout, user: Any) -> list[str]:
    """The actions `user` may take on the rollout now (for showing buttons; the services check again)."""
    allowed = []
    status = approval_status(rollout=rollout) if rollout.state == State.AWAITING_APPROVAL else None
    user_id = getattr(user, "pk", None)
    for action in ACTIONS:
        if rollout.state not in ACTION_STATES[action] or not action_allowed(user=user, action=action):
            continue
        if action in ("approve", "reject") and status is not None and status.expired:
            continue  # an expired request is asked again first
        if action == "approve" and status is not None and (
            status.approved_by(user_id) is not None
            or self_approval_refusal(rollout=rollout, request=status.request, user_id=user_id) is not None
        ):
            continue
        if action == "request_approval" and (status is None or not status.expired):
            continue
        if action == "promote" and rollout.state == State.PAUSED and rollout.paused_from == State.GATING:
            continue
        allowed.append(action)
    return allowed


def rollout_health(*, analysis: RolloutAnalysis | None) -> dict[str, Any]:
    """Green / amber / red from the latest look, with the check that drives it (for the dashboard, the
    CLI's progress line and Slack): red = a breach, amber = undecided or SRM, green = everything safe."""
    if analysis is None:
        return {"status": "unknown", "driver": None, "checks": {}}
    checks = {c.get("name", c.get("metric", "?")): c.get("decision") for c in analysis.checks}
    breach = next((name for name, d in checks.items() if d in ("breach", "loss")), None)
    if breach is not None:
        return {"status": "red", "driver": breach, "checks": checks}
    if analysis.srm and analysis.srm.get("mismatch"):
        return {"status": "amber", "driver": "sample ratio mismatch", "checks": checks}
    pending = next((name for name, d in checks.items() if d == "undecided"), None)
    if pending is not None:
        return {"status": "amber", "driver": pending, "checks": checks}
    return {"status": "green", "driver": None, "checks": checks}


def rollout_progress(*, rollout: Rollout, analysis: RolloutAnalysis | None) -> dict[str, Any]:
    """What holds the current step, from the latest look (for the page, the API and `rolloutctl status`):
    each check not yet shown safe with about how many more candidate requests it needs, the step's
    candidate requests against its planned sample and what reaching that undecided does (the plan's
    `on_inconclusive`), and, while the promotion bakes, the holdout and when the bake ends."""
    out: dict[str, Any] = {
        "holding": [], "candidate_n": None, "planned_n": None,
        "on_inconclusive": rollout.plan.get("on_inconclusive", "pause"), "bake": None,
    }  # fmt: skip
    if rollout.state == State.BAKING and rollout.bake_started_at is not None:
        out["bake"] = {
            "started_at": rollout.bake_started_at.isoformat(), "ends_at": rollout.bake_ends_at.isoformat() if rollout.bake_ends_at else None,
            "bake_s": rollout.bake_s, "holdout": rollout.holdout, "holdout_version": rollout.baseline.label,
        }  # fmt: skip
    planned = (rollout.planned_samples or {}).get(str(rollout.step_index))
    out["planned_n"] = int(planned) if planned is not None else None
    current = (
        analysis is not None and analysis.step_index == rollout.step_index
        and rollout.state in (State.RUNNING, State.PAUSED, State.AWAITING_APPROVAL)
    )  # fmt: skip
    if not current or analysis is None:
        return out
    candidate = (analysis.arms or {}).get("candidate") or {}
    out["candidate_n"] = int(candidate["n"]) if candidate.get("n") is not None else None
    for check in analysis.checks or []:
        if check.get("holds"):
            out["holding"].append({
                "name": check.get("name"), "type": check.get("type"), "metric": check.get("metric"),
                "decision": check.get("decision"), "more_n": check.get("more_n"),
                "more_unit": check.get("more_unit") or "candidate requests", "pairs_needed": check.get("pairs_needed"),
                "min_n": check.get("min_n"),
            })  # fmt: skip
    return out


def rollout_holding_text(progress: dict[str, Any]) -> list[str]:
    """One line per check holding the step: its name and what it still needs."""
    return holding_lines(progress["holding"])


def rollout_time_in_step_s(*, rollout: Rollout) -> float | None:
    if rollout.step_started_at is None or rollout.is_terminal:
        return None
    return (timezone.now() - rollout.step_started_at).total_seconds()


def rollout_step_starts(*, rollout: Rollout) -> list[tuple[int, datetime]]:
    """(step index, when it started) of every step the rollout has entered, in order: the time of the event
    that moved the rollout into each step (the same transaction that set `step_started_at`)."""
    starts: list[tuple[int, datetime]] = []
    previous = -1
    for index, at in RolloutEvent.objects.filter(rollout_id=rollout.pk).order_by("seq").values_list("step_index", "created_at"):
        if index >= 0 and index != previous:
            starts.append((index, at))
        previous = index
    return starts
