"""Every write to a rollout: creation from a validated plan, and the state machine's transitions.

draft -> (gating) -> running step i -> ... -> baking -> promoted, with awaiting_approval before a step that
needs it, paused from any live state, and rolled_back / aborted from any live state. Promotion bakes: the
candidate takes all but the plan's `holdout` of sessions for `bake_s`, watched against the baseline that
keeps them; a breach, or a person, may still roll it back then. When the bake ends (or with `bake_s: 0`)
the rollout is promoted and the alias serves the candidate alone; a promoted rollout is never rolled back
(a new rollout is).

Each transition is one service and one transaction: the row is locked (`select_for_update`; on SQLite
the IMMEDIATE transaction serialises writers), the expected state (and, for the analysis, the version
it read) is checked, a `Conflict` (409) says what was expected and what was found, the rollout and its
alias's route are written, and an append-only `RolloutEvent` records the actor, the reason and the
per-arm evidence. The route change is written in the same transaction rather than on commit, so no crash
can leave a rolled-back rollout still routing users to its candidate; gateways see it within a second
(serving's RouteGeneration). Notifications and calls into the evals app run on commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from accounts.roles import Role
from accounts.selectors import user_roles
from config.errors import Conflict, DomainError, Forbidden, NotFound
from config.idempotency import (
    HEADER as IDEMPOTENCY_HEADER,
)
from config.idempotency import (
    IDEMPOTENCY_TTL,
    IdempotencyKeyReused,
    idempotent_create,
    request_fingerprint,
)
from rollouts import capacity, gates
from rollouts.actors import SYSTEM, Actor, ActorLike, as_actor
from rollouts.approvals import (
    approval_request_current,
    approval_status,
    approval_ttl,
    approvals_required,
    self_approval_refusal,
)
from rollouts.models import Rollout, RolloutActionKey, RolloutApproval, RolloutEvent
from rollouts.notifications import notification_enqueue
from rollouts.plans import Plan, PlanInvalid, plan_from_stored, plan_normalise, plan_parse
from rollouts.plans.alpha import check_alpha_share
from serving.models import ModelVersion
from serving.selectors import alias_get, model_version_get, model_version_is_ready
from serving.services import RouteSplit, route_set

logger = logging.getLogger(__name__)

State = Rollout.State
Kind = RolloutEvent.Kind

# Who may do what. Stopping harm (pause, rollback) is open to approvers too; starting and moving traffic
# forward is the release manager's; approving is the approver's. Admins hold every role.
ACTION_ROLES: dict[str, tuple[Role, ...]] = {
    "create": (Role.RELEASE_MANAGER, Role.ADMIN),
    "start": (Role.RELEASE_MANAGER, Role.ADMIN),
    "resume": (Role.RELEASE_MANAGER, Role.ADMIN),
    "advance": (Role.RELEASE_MANAGER, Role.ADMIN),
    "promote": (Role.RELEASE_MANAGER, Role.ADMIN),
    "abort": (Role.RELEASE_MANAGER, Role.ADMIN),
    "pause": (Role.RELEASE_MANAGER, Role.APPROVER, Role.ADMIN),
    "rollback": (Role.RELEASE_MANAGER, Role.APPROVER, Role.ADMIN),
    "approve": (Role.APPROVER, Role.ADMIN),
    "reject": (Role.APPROVER, Role.ADMIN),
    "request_approval": (Role.RELEASE_MANAGER, Role.ADMIN),
}

# From which states each action may be taken.
ACTION_STATES: dict[str, tuple[str, ...]] = {
    "start": (State.DRAFT,),
    "pause": (State.GATING, State.RUNNING, State.AWAITING_APPROVAL),
    "resume": (State.PAUSED,),
    "approve": (State.AWAITING_APPROVAL,),
    "reject": (State.AWAITING_APPROVAL,),
    "request_approval": (State.AWAITING_APPROVAL,),
    "advance": (State.RUNNING,),
    # From baking: end the bake now.
    "promote": (State.RUNNING, State.PAUSED, State.BAKING),
    "rollback": (State.GATING, State.RUNNING, State.AWAITING_APPROVAL, State.PAUSED, State.BAKING),
    "abort": (State.DRAFT, State.GATING, State.RUNNING, State.AWAITING_APPROVAL, State.PAUSED),
    # The analysis's own transitions.
    "eval_gate": (State.GATING,),
}

ACTIONS = (
    "start", "pause", "resume", "approve", "reject", "request_approval", "advance", "promote", "rollback", "abort",
)  # fmt: skip


# --- plan validation against the database ------------------------------------------------------------


@dataclass(frozen=True)
class ValidatedPlan:
    plan: Plan
    baseline: ModelVersion
    candidate: ModelVersion


def _version_or_error(errors: dict[str, list[str]], path: str, ref: str) -> ModelVersion | None:
    try:
        return model_version_get(ref=ref)
    except NotFound:
        errors.setdefault(path, []).append(f"no model version {ref!r} is registered")
        return None


def plan_validate(
    *, data: dict[str, Any] | str | bytes, content_type: str = "", require_ready: bool = False
) -> ValidatedPlan:
    """Validate a plan (JSON/YAML text or a mapping) against the schema and the database.

    Raises `PlanInvalid` (400, every error by field) or `Conflict` (409) when the alias already has a
    live rollout. `require_ready`: both versions must have a ready engine (a plan started at once)."""
    raw = plan_parse(data, content_type=content_type) if isinstance(data, str | bytes) else data
    plan = plan_normalise(raw)
    errors: dict[str, list[str]] = {}
    candidate = _version_or_error(errors, "candidate", plan.candidate)
    alias = alias_get(name=plan.alias)
    baseline: ModelVersion | None = None
    if plan.baseline is not None:
        baseline = _version_or_error(errors, "baseline", plan.baseline)
    elif alias is not None:
        baseline = alias.baseline
    else:
        errors.setdefault("baseline", []).append(f"required: the alias {plan.alias!r} does not exist yet")
    if baseline is not None and alias is not None and alias.baseline_id != baseline.pk:
        errors.setdefault("baseline", []).append(
            f"the alias {plan.alias!r} serves {alias.baseline.label}, not {baseline.label}: "
            "a rollout starts from what the alias serves"
        )
    if baseline is not None and candidate is not None and baseline.pk == candidate.pk:
        errors.setdefault("candidate", []).append("must differ from the baseline")
    for i, guardrail in enumerate(plan.guardrails):
        if guardrail.metric == "cost_per_request" and baseline is not None:
            if not (baseline.price_input_per_million or baseline.price_output_per_million):
                errors.setdefault(f"guardrails[{i}].metric", []).append(
                    f"cost_per_request needs token prices on {baseline.label} (price per million tokens)"
                )
    if require_ready:
        for path, version in (("baseline", baseline), ("candidate", candidate)):
            if path == "candidate" and version is not None and capacity.candidate_startable(
                    gpu_budget=plan.gpu_budget, candidate=version):
                continue  # its GPU budget brings it up
            if version is not None and not model_version_is_ready(model_version=version):
                errors.setdefault(path, []).append(f"no ready engine for {version.label}")
    if plan.eval_gate is not None:
        try:
            plan = plan.with_eval_gate(gates.eval_gate_validate(spec=plan.eval_gate))
        except DomainError as exc:
            errors.setdefault(exc.field or "eval_gate", []).append(exc.message)
    if plan.shadow_quality is not None:
        try:
            plan = plan.with_shadow_scorer(gates.shadow_scorer_normalise(spec=plan.shadow_quality.scorer))
        except DomainError as exc:
            errors.setdefault(exc.field or "shadow.quality.scorer", []).append(exc.message)
    if errors:
        raise PlanInvalid(errors)
    assert baseline is not None and candidate is not None
    live = Rollout.objects.filter(alias_name=plan.alias, state__in=Rollout.LIVE_STATES).first()
    if live is not None:
        raise Conflict(f"the alias {plan.alias!r} already has a live rollout ({live.pk}, {live.state})", field="alias")
    return ValidatedPlan(plan=plan.with_baseline(baseline.label), baseline=baseline, candidate=candidate)


# --- roles ---------------------------------------------------------------------------------------------


def _require_role(actor: Actor, action: str) -> None:
    if actor.user is None:
        return
    roles = user_roles(user=actor.user)
    needed = ACTION_ROLES[action]
    if not any(role in roles for role in needed):
        raise Forbidden(f"{action} needs the role {' or '.join(r.value for r in needed)}")


def action_allowed(*, user: Any, action: str) -> bool:
    roles = user_roles(user=user)
    return any(role in roles for role in ACTION_ROLES[action])


# --- creation --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutCreated:
    rollout: Rollout
    replayed: bool


def rollout_create(
    *,
    plan: dict[str, Any] | str | bytes,
    actor: ActorLike,
    content_type: str = "",
    start: bool = False,
    start_when_ready: bool = False,
    idempotency_key: str | None = None,
) -> RolloutCreated:
    """Create a rollout in draft from a plan, and start it at once if `start`.

    `start_when_ready`: stay in draft until both versions have a ready engine, then start by itself.
    `idempotency_key`: the same key and plan replay the rollout made the first time (`replayed=True`)."""
    who = as_actor(actor)
    _require_role(who, "create")
    raw = plan_parse(plan, content_type=content_type) if isinstance(plan, str | bytes) else plan
    fingerprint = request_fingerprint({"plan": raw, "start": start, "start_when_ready": start_when_ready})

    def find() -> Rollout | None:
        if who.user is None:
            return None
        return Rollout.objects.filter(
            created_by=who.user, idempotency_key=idempotency_key, created_at__gte=timezone.now() - IDEMPOTENCY_TTL
        ).first()

    def create() -> Rollout:
        validated = plan_validate(data=raw, require_ready=start)
        with transaction.atomic():
            if idempotency_key is not None and who.user is not None:
                # A key older than the TTL may name a new rollout; the old one lets go of it.
                Rollout.objects.filter(created_by=who.user, idempotency_key=idempotency_key).update(
                    idempotency_key=""
                )
            try:
                with transaction.atomic():
                    rollout = Rollout.objects.create(
                        name=validated.plan.name,
                        alias_name=validated.plan.alias,
                        baseline=validated.baseline,
                        candidate=validated.candidate,
                        strategy=validated.plan.strategy,
                        plan=validated.plan.to_dict(),
                        state=State.DRAFT,
                        version=1,
                        start_when_ready=start_when_ready and not start,
                        created_by=who.user,
                        idempotency_key=(idempotency_key or "") if who.user is not None else "",
                        idempotency_fingerprint=fingerprint if idempotency_key else "",
                    )
            except IntegrityError:
                if idempotency_key is not None and find() is not None:
                    raise  # a concurrent request with this key won: idempotent_create replays it
                if Rollout.objects.filter(alias_name=validated.plan.alias, state__in=Rollout.LIVE_STATES).exists():
                    raise Conflict(
                        f"the alias {validated.plan.alias!r} already has a live rollout", field="alias"
                    ) from None
                raise
            created_evidence: dict[str, Any] = {}
            if rollout.start_when_ready:
                # It waits for its engines: ask for those it has none of (rollouts.engines).
                from rollouts.engines import rollout_engines_request

                requested = rollout_engines_request(rollout=rollout)
                if requested:
                    created_evidence["engines_requested"] = requested
            _event(rollout, kind=Kind.CREATED, from_state="", actor=who, reason="", evidence=created_evidence)
            if start:
                _start_locked(rollout, actor=who, reason="started on creation")
        return rollout

    result = idempotent_create(
        key=idempotency_key if who.user is not None else None,
        fingerprint=fingerprint,
        find=find,
        fingerprint_of=lambda r: r.idempotency_fingerprint,
        create=create,
    )
    return RolloutCreated(rollout=result.obj, replayed=result.replayed)


# --- the transition machinery --------------------------------------------------------------------------


@dataclass
class _Move:
    kind: str
    to_state: str
    step_index: int | None = None  # the step to enter (its window starts now); None keeps the current one
    reason: str = ""
    on_commit: list[Callable[[], None]] = field(default_factory=list)


def _event(
    rollout: Rollout, *, kind: str, from_state: str, actor: Actor, reason: str, evidence: dict[str, Any]
) -> RolloutEvent:
    event = RolloutEvent.objects.create(
        rollout=rollout,
        seq=rollout.version,
        kind=kind,
        from_state=from_state,
        to_state=rollout.state,
        step_index=rollout.step_index,
        actor=actor.name,
        actor_user=actor.user,
        via=actor.via,
        actor_detail=actor.detail[:200],
        reason=reason,
        evidence=evidence,
        # The clock read here rather than by the field's default: one clock for the event and the
        # approval expiry computed from it.
        created_at=timezone.now(),
    )
    notification_enqueue(event=event)
    return event


def _route_for(rollout: Rollout) -> RouteSplit | None:
    """The alias's split for the rollout's state, or None when a draft never touched the alias."""
    if rollout.state == State.DRAFT or (rollout.state == State.ABORTED and rollout.started_at is None):
        return None
    if rollout.state == State.PROMOTED:
        return RouteSplit(baseline=rollout.candidate, candidate=None, candidate_weight=0.0, shadow_rate=0.0, rollout_id=None)
    if rollout.state in (State.ROLLED_BACK, State.ABORTED):
        return RouteSplit(baseline=rollout.baseline, candidate=None, candidate_weight=0.0, shadow_rate=0.0, rollout_id=None)
    if rollout.state == State.BAKING:
        # The holdout is the sessions whose hash falls at or above 1 - holdout: those the earlier steps kept
        # on the baseline longest (the gateway's assignment is monotone in the weight).
        return RouteSplit(
            baseline=rollout.baseline, candidate=rollout.candidate, candidate_weight=round(1.0 - rollout.holdout, 6),
            shadow_rate=0.0, rollout_id=rollout.pk, failover_to_candidate=bool(rollout.plan.get("failover_to_candidate")),
        )  # fmt: skip
    step = rollout.current_step
    weight = float(step["weight"]) if step else 0.0
    shadow = float(step["shadow_rate"]) if step else 0.0
    return RouteSplit(
        baseline=rollout.baseline, candidate=rollout.candidate, candidate_weight=weight, shadow_rate=shadow,
        rollout_id=rollout.pk, failover_to_candidate=bool(rollout.plan.get("failover_to_candidate")),
    )  # fmt: skip


def _apply(locked: Rollout, move: _Move, *, actor: Actor, reason: str, evidence: dict[str, Any]) -> RolloutEvent:
    now = timezone.now()
    from_state = locked.state
    locked.state = move.to_state
    if move.step_index is not None:
        locked.step_index = move.step_index
        locked.step_started_at = now
    if move.to_state == State.BAKING and from_state != State.BAKING:
        locked.bake_started_at = now
    if move.to_state == State.PAUSED:
        locked.paused_from = from_state
    elif from_state == State.PAUSED:
        locked.paused_from = ""
    if locked.started_at is None and move.to_state not in (State.DRAFT, State.ABORTED):
        locked.started_at = now
    if move.to_state in Rollout.TERMINAL_STATES:
        locked.ended_at = now
    locked.state_reason = (move.reason or reason)[:500]
    locked.version += 1
    locked.save()
    split = _route_for(locked)
    if split is not None:
        # Under a plan's gpu_budget serving scales the arms to fit, and moves traffic once they are ready.
        route_set(alias_name=locked.alias_name, split=capacity.rollout_split(rollout=locked, split=split))
    quality = (locked.plan.get("shadow") or {}).get("quality")
    if quality and from_state == State.DRAFT and move.to_state not in Rollout.TERMINAL_STATES:
        gates.shadow_scoring_configure(rollout_id=locked.pk, scorer=quality["scorer"])
    if quality and move.to_state in Rollout.TERMINAL_STATES:
        rollout_id = locked.pk
        move.on_commit.append(lambda: gates.shadow_scoring_stop_safely(rollout_id=rollout_id))
    event = _event(locked, kind=move.kind, from_state=from_state, actor=actor, reason=move.reason or reason, evidence=evidence)
    for callback in move.on_commit:
        transaction.on_commit(callback)
    return event


def _rollout_id(rollout: Rollout | int) -> int:
    return rollout if isinstance(rollout, int) else int(rollout.pk)


def _lock(rollout_id: int) -> Rollout:
    locked = Rollout.objects.select_for_update().select_related("baseline", "candidate").filter(pk=rollout_id).first()
    if locked is None:
        raise NotFound(f"no rollout {rollout_id}")
    return locked


# Changes since the version a caller saw that do not change the question it answers: an approver's click
# on a request that has gathered other approvals meanwhile still approves (or rejects) the same request.
_TOLERATED_SINCE: dict[str, frozenset[str]] = {
    "approve": frozenset({Kind.APPROVAL_ADDED}),
    "reject": frozenset({Kind.APPROVAL_ADDED}),
}


def _check(locked: Rollout, action: str, expected_version: int | None) -> None:
    # A caller who says which version it saw is told first that the rollout moved on since, and how: that
    # is why its action no longer fits, whatever state the move left behind.
    if expected_version is not None and locked.version != expected_version:
        tolerated = _TOLERATED_SINCE.get(action)
        since = (
            set(RolloutEvent.objects.filter(rollout_id=locked.pk, seq__gt=expected_version).values_list("kind", flat=True))
            if tolerated and 0 < expected_version < locked.version else None
        )  # fmt: skip
        if not (tolerated and since and since <= tolerated):
            raise Conflict(rollout_changes_since(rollout=locked, seen_version=expected_version), field="version")
    allowed = ACTION_STATES[action]
    if action == "rollback" and locked.state == State.PROMOTED:
        ended = locked.ended_at.isoformat(timespec="seconds") if locked.ended_at else "already"
        how = f"its bake ended at {ended}" if locked.bake_started_at is not None else f"it was promoted at {ended} with no bake (bake_s: 0)"
        raise Conflict(
            f"cannot roll back rollout {locked.pk}: {how}; a promoted rollout can be rolled back only while it "
            f"bakes. To go back, start a new rollout of {locked.alias_name} to {locked.baseline.label}",
            field="state",
        )
    if locked.state not in allowed:
        raise Conflict(
            f"cannot {action.replace('_', ' ')} rollout {locked.pk}: expected state "
            f"{' or '.join(allowed)}, found {locked.state}",
            field="state",
        )


def _where(*, state: str, step_index: int, step_count: int, paused_from: str = "") -> str:
    """Where a rollout stands, in words: "step 2 of 3", "awaiting approval of step 3", "promoted"."""
    if state == State.RUNNING:
        return f"step {step_index + 1} of {step_count}"
    if state == State.AWAITING_APPROVAL:
        pending = step_index + 1
        return "awaiting approval of the promotion" if pending >= step_count else f"awaiting approval of step {pending + 1}"
    if state == State.PAUSED:
        return f"paused at step {step_index + 1} of {step_count}" if step_index >= 0 else "paused"
    if state == State.GATING:
        return "running its eval gate"
    return state.replace("_", " ")


_EVENT_WORDS = {
    Kind.STEP_STARTED: "moved to the next step", Kind.AWAITING_APPROVAL: "asked for an approval",
    Kind.APPROVAL_ADDED: "approved (more approvals needed)", Kind.EVAL_GATE_PASSED: "eval gate passed",
    Kind.EVAL_GATE_FAILED: "eval gate failed", Kind.GATING: "eval gate started",
}  # fmt: skip


def _event_phrase(event: RolloutEvent) -> str:
    words = _EVENT_WORDS.get(event.kind, str(event.kind).replace("_", " "))  # type: ignore[call-overload]
    who = event.actor if event.via == "system" else f"{event.actor} via {event.via}"
    reason = f" ({event.reason[:160]})" if event.reason else ""
    return f"{words} by {who}{reason}"


def rollout_changes_since(*, rollout: Rollout, seen_version: int) -> str:
    """What happened to the rollout since a caller saw `seen_version`: the text of a stale action's 409.

    "rollout 4 changed since it was read: expected version 7, found 8: it moved from step 2 of 3 to step
    3 of 3 since you looked: moved to the next step by analysis (every guardrail shown safe)"."""
    head = f"rollout {rollout.pk} changed since it was read: expected version {seen_version}, found {rollout.version}"
    if seen_version > rollout.version or seen_version < 1:
        return f"{head}: version {seen_version} never existed; read the rollout again and send the version it shows"
    steps = len(rollout.steps)
    then_event = RolloutEvent.objects.filter(rollout_id=rollout.pk, seq=seen_version).first()
    since = list(RolloutEvent.objects.filter(rollout_id=rollout.pk, seq__gt=seen_version).order_by("seq"))
    now = _where(state=rollout.state, step_index=rollout.step_index, step_count=steps)
    if then_event is not None:
        then = _where(state=then_event.to_state, step_index=then_event.step_index, step_count=steps)
        moved = f"it moved from {then} to {now}" if then != now else f"it is still {now}"
    else:
        moved = f"it is now {now}"
    shown = since[-3:]
    changes = "; ".join(_event_phrase(e) for e in shown)
    if len(since) > len(shown):
        changes = f"{len(since) - len(shown)} earlier changes, then {changes}"
    return f"{head}: {moved} since you looked: {changes}. Nothing was done: look again, and retry if it still makes sense"


def _evidence(rollout: Rollout | int, evidence: dict[str, Any] | None) -> dict[str, Any]:
    if evidence is not None:
        return evidence
    from rollouts.analysis import rollout_evidence

    try:
        return rollout_evidence(rollout_id=_rollout_id(rollout))
    except Exception:  # evidence is a record, never a reason for a transition to fail
        logger.exception("could not gather the evidence of rollout %s", _rollout_id(rollout))
        return {}


@dataclass(frozen=True)
class ActionKey:
    """An Idempotency-Key sent with an action, and the fingerprint of what it asked (config.idempotency)."""

    key: str
    fingerprint: str


def _action_key_record(key: ActionKey | None, *, actor: Actor, rollout: Rollout, action: str) -> None:
    """Inside the action's transaction: the key now names this action. A concurrent request with the same
    key that got here first makes this one fail whole (nothing done twice); its caller then replays."""
    if key is None or actor.user is None:
        return
    RolloutActionKey.objects.filter(user=actor.user, key=key.key, created_at__lt=timezone.now() - IDEMPOTENCY_TTL).delete()
    try:
        with transaction.atomic():
            RolloutActionKey.objects.create(
                user=actor.user, key=key.key, fingerprint=key.fingerprint, rollout=rollout, action=action,
                seq=rollout.version,
            )  # fmt: skip
    except IntegrityError:
        raise Conflict(
            "another request with this Idempotency-Key was done at the same moment; send it again to get its answer",
            field=IDEMPOTENCY_HEADER,
        ) from None


def rollout_action_replay(*, user: Any, key: str, fingerprint: str) -> RolloutActionKey | None:
    """The action `user` already did with `key` (within the TTL), or None. Raises IdempotencyKeyReused
    (422) when the key was used for a different action, rollout or body."""
    found = RolloutActionKey.objects.filter(
        user=user, key=key, created_at__gte=timezone.now() - IDEMPOTENCY_TTL
    ).first()
    if found is None:
        return None
    if found.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            f"this Idempotency-Key was already used for {found.action} of rollout {found.rollout_id} with a "
            "different request; use a new key",
            field=IDEMPOTENCY_HEADER,
        )
    return found


def rollout_action_answer_store(*, user: Any, key: str, answer: dict[str, Any]) -> None:
    """Keep the first answer to an action done with `key`, for its retries."""
    RolloutActionKey.objects.filter(user=user, key=key, answer__isnull=True).update(answer=answer)


def _transition(
    rollout: Rollout | int,
    *,
    action: str,
    actor: ActorLike,
    reason: str,
    decide: Callable[[Rollout, Actor], _Move],
    evidence: dict[str, Any] | None = None,
    expected_version: int | None = None,
    role_action: str | None = None,
    idempotency: ActionKey | None = None,
) -> Rollout:
    who = as_actor(actor)
    _require_role(who, role_action or action)
    reason = (reason or "").strip()
    # Gathered before the lock: a few aggregate queries that need not hold up other writers.
    gathered = _evidence(rollout, evidence)
    with transaction.atomic():
        locked = _lock(_rollout_id(rollout))
        _check(locked, action, expected_version)
        move = decide(locked, who)
        _apply(locked, move, actor=who, reason=reason, evidence=gathered)
        _action_key_record(idempotency, actor=who, rollout=locked, action=action)
    return locked


def _approved(rollout: Rollout, step_index: int) -> bool:
    """Whether some request for the step gathered the approvals the plan needs."""
    per_request: dict[int, set[int]] = {}
    for request_seq, user_id in RolloutApproval.objects.filter(rollout=rollout, step_index=step_index).values_list(
        "request_seq", "approved_by_id"
    ):
        per_request.setdefault(int(request_seq), set()).add(int(user_id))
    needed = approvals_required(rollout)
    # request_seq 0: an approval from before requests were numbered, which decided its step alone.
    return any(seq == 0 or len(users) >= needed for seq, users in per_request.items())


def _plan(rollout: Rollout) -> Plan:
    return plan_from_stored(rollout.plan)


def _next(locked: Rollout, next_index: int, *, kind: str = Kind.STEP_STARTED) -> _Move:
    """Where a rollout goes after finishing its current step: the next step, an approval, or promotion."""
    steps = locked.steps
    if next_index < len(steps):
        if steps[next_index]["requires_approval"] and not _approved(locked, next_index):
            return _Move(Kind.AWAITING_APPROVAL, State.AWAITING_APPROVAL, reason=f"step {next_index + 1} of {len(steps)} needs an approval")
        return _Move(kind, State.RUNNING, step_index=next_index)
    if locked.plan.get("promotion_requires_approval") and not _approved(locked, len(steps)):
        return _Move(Kind.AWAITING_APPROVAL, State.AWAITING_APPROVAL, reason="promotion needs an approval")
    return _promotion(locked)


def _promotion(locked: Rollout, reason: str = "") -> _Move:
    """Promote: into the bake (the candidate at 1 - holdout, watched) when the plan bakes, else at once."""
    # The caller's reason stands; the event's to_state (baking) and the rollout's page say the rest.
    if locked.bake_s > 0:
        return _Move(Kind.PROMOTED, State.BAKING, reason=reason)
    return _Move(Kind.PROMOTED, State.PROMOTED, reason=reason)


# --- transitions ---------------------------------------------------------------------------------------


def _start_locked(locked: Rollout, *, actor: Actor, reason: str, evidence: dict[str, Any] | None = None) -> None:
    _check(locked, "start", None)
    _start_preconditions(locked)
    if locked.plan.get("eval_gate"):
        rollout_id, spec = locked.pk, locked.plan["eval_gate"]
        baseline, candidate = locked.baseline, locked.candidate
        share = check_alpha_share(plan_from_stored(locked.plan))
        move = _Move(
            Kind.GATING, State.GATING, reason=reason or "the eval gate runs before any traffic moves",
            on_commit=[lambda: gates.eval_gate_start_safely(rollout_id=rollout_id, baseline=baseline, candidate=candidate,
                                                            spec=spec, alpha=share)],
        )  # fmt: skip
    else:
        move = _next(locked, 0, kind=Kind.STARTED)
        if move.kind == Kind.STEP_STARTED:
            move.kind = Kind.STARTED
    _apply(locked, move, actor=actor, reason=reason, evidence=evidence or {})


def _start_preconditions(locked: Rollout) -> None:
    for path, version in (("baseline", locked.baseline), ("candidate", locked.candidate)):
        if path == "candidate" and capacity.rollout_candidate_startable(rollout=locked):
            continue  # its GPU budget brings its replicas up once the baseline has given theirs
        if not model_version_is_ready(model_version=version):
            raise DomainError(f"no ready engine for {version.label}", field=path)
    alias = alias_get(name=locked.alias_name)
    if alias is not None and alias.baseline_id != locked.baseline_id:
        raise Conflict(
            f"the alias {locked.alias_name!r} serves {alias.baseline.label} now, but the plan's baseline is "
            f"{locked.baseline.label}",
            field="baseline",
        )


def rollout_start(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None,
    idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """draft -> gating (an eval gate) or the first step (or awaiting its approval). Both versions need a
    ready engine, and the alias must still serve the plan's baseline."""
    who = as_actor(actor)
    _require_role(who, "start")
    with transaction.atomic():
        locked = _lock(_rollout_id(rollout))
        _check(locked, "start", expected_version)
        _start_locked(locked, actor=who, reason=(reason or "").strip())
        _action_key_record(idempotency, actor=who, rollout=locked, action="start")
    return locked


def rollout_pause(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None, idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Freeze the rollout at its current weights (the analysis still rolls back on a breach)."""
    return _transition(
        rollout, action="pause", actor=actor, reason=reason, evidence=evidence, expected_version=expected_version,
        idempotency=idempotency,
        decide=lambda locked, who: _Move(Kind.PAUSED, State.PAUSED),
    )  # fmt: skip


def rollout_resume(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None,
    idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """paused -> where it was (running, awaiting approval, or gating, whose gate is asked for again)."""

    def decide(locked: Rollout, who: Actor) -> _Move:
        back = locked.paused_from or State.RUNNING
        move = _Move(Kind.RESUMED, back)
        if back == State.GATING:
            rollout_id, spec = locked.pk, locked.plan.get("eval_gate") or {}
            baseline, candidate = locked.baseline, locked.candidate
            share = check_alpha_share(plan_from_stored(locked.plan))
            move.on_commit.append(
                lambda: gates.eval_gate_start_safely(rollout_id=rollout_id, baseline=baseline, candidate=candidate,
                                                     spec=spec, alpha=share)
            )
        return move

    return _transition(
        rollout, action="resume", actor=actor, reason=reason, decide=decide, expected_version=expected_version,
        idempotency=idempotency,
    )


def _step_words(rollout: Rollout, step_index: int) -> str:
    return "the promotion" if step_index >= len(rollout.steps) else f"step {step_index + 1}"


def _decided_elsewhere(rollout_id: int, step_index: int) -> None:
    """A click on a step that is no longer waiting but was approved: say by whom, not "wrong state"."""
    rollout = Rollout.objects.filter(pk=rollout_id).first()
    if rollout is None or (rollout.state == State.AWAITING_APPROVAL and rollout.step_index + 1 == step_index):
        return
    rows = list(
        RolloutApproval.objects.select_related("approved_by").filter(rollout=rollout, step_index=step_index)
        .order_by("-request_seq", "created_at")
    )  # fmt: skip
    if not rows or not _approved(rollout, step_index):
        return
    latest = [row for row in rows if row.request_seq == rows[0].request_seq]
    names = ", ".join(dict.fromkeys(row.approved_by.get_username() for row in latest))
    raise Conflict(
        f"{_step_words(rollout, step_index)} was already approved by {names} "
        f"at {latest[-1].created_at.isoformat(timespec='seconds')}",
        field="step_index",
    )


def _expired_text(rollout: Rollout, what: str, expires_at: datetime) -> str:
    hours = approval_ttl(rollout).total_seconds() / 3600
    return (
        f"the approval request for {what} expired at {expires_at.isoformat(timespec='seconds')} (requests last "
        f"{hours:g} h): a release manager must ask again (`rolloutctl request-approval {rollout.pk}` or the page's "
        "Ask again button), and approvals of the expired request no longer count"
    )


def rollout_approve(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", step_index: int | None = None,
    expected_version: int | None = None, idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Approve the request the rollout waits for (step index len(steps) is the promotion).

    The step goes ahead once the plan's `approvals_required` different approvers approved the same
    unexpired request; until then each approval is recorded (an `approval_added` event) and the rollout
    keeps waiting. Refused: an expired request (it must be asked again), a second approval by the same
    person, and (four-eyes, unless the plan sets allow_self_approval) the rollout's creator or the person
    who asked for this approval. `step_index`, when given (a button carries it), must be the step waiting."""
    who = as_actor(actor)
    if step_index is not None:
        _decided_elsewhere(_rollout_id(rollout), step_index)

    def decide(locked: Rollout, who: Actor) -> _Move:
        pending = locked.step_index + 1
        if step_index is not None and step_index != pending:
            raise Conflict(
                f"expected an approval of step {step_index + 1}, but rollout {locked.pk} waits for step {pending + 1}",
                field="step_index",
            )
        if who.user is None:
            raise Forbidden("an approval needs a person")
        status = approval_status(rollout=locked)
        if status is None:
            raise Conflict(f"rollout {locked.pk} has no open approval request", field="state")
        if status.expired:
            raise Conflict(_expired_text(locked, status.what, status.request.expires_at), field="approval")
        refusal = self_approval_refusal(rollout=locked, request=status.request, user_id=who.user.pk)
        if refusal is not None:
            raise Forbidden(
                f"four-eyes rule: {refusal}, so another approver must approve it (or the plan sets allow_self_approval)"
            )
        mine = status.approved_by(who.user.pk)
        if mine is not None:
            raise Conflict(
                f"you approved {status.what} already at {mine.at.isoformat(timespec='seconds')}: each approver counts "
                f"once ({status.text})",
                field="approval",
            )
        RolloutApproval.objects.create(
            rollout=locked, step_index=pending, request_seq=status.request.seq, approved_by=who.user, via=who.via,
            reason=reason or "", created_at=timezone.now(),
        )  # fmt: skip
        names = ", ".join([g.username for g in status.given] + [who.name])
        count, required = len(status.given) + 1, status.required
        if count < required:
            left = required - count
            return _Move(
                Kind.APPROVAL_ADDED, State.AWAITING_APPROVAL,
                reason=reason or f"{status.what} approved by {names} ({count} of {required}; {left} more needed)",
            )  # fmt: skip
        if pending >= len(locked.steps):
            return _promotion(locked, reason or f"promotion approved by {names}")
        return _Move(Kind.APPROVED, State.RUNNING, step_index=pending, reason=reason or f"step {pending + 1} approved by {names}")

    return _transition(
        rollout, action="approve", actor=who, reason=reason, decide=decide, expected_version=expected_version,
        idempotency=idempotency,
    )  # fmt: skip


def rollout_reject(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", step_index: int | None = None,
    expected_version: int | None = None, idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Refuse the approval the rollout waits for: one rejection by any approver ends the wait, and the
    rollout rolls back (whatever approvals it had gathered). An expired request cannot be rejected either
    (roll back instead). `step_index`, when given, must be the step waiting."""

    def decide(locked: Rollout, who: Actor) -> _Move:
        pending = locked.step_index + 1
        if step_index is not None and step_index != pending:
            raise Conflict(f"rollout {locked.pk} no longer waits for step {step_index + 1}", field="step_index")
        request = approval_request_current(rollout=locked)
        if request is not None and timezone.now() >= request.expires_at:
            raise Conflict(
                _expired_text(locked, _step_words(locked, pending), request.expires_at) + "; to stop it, roll it back",
                field="approval",
            )
        return _Move(
            Kind.ROLLED_BACK, State.ROLLED_BACK,
            reason=reason or f"approval of {_step_words(locked, pending)} refused by {who.name}",
        )  # fmt: skip

    return _transition(
        rollout, action="reject", actor=actor, reason=reason, decide=decide, expected_version=expected_version,
        idempotency=idempotency,
    )  # fmt: skip


def rollout_approval_request(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None,
    idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Ask again for the approval the rollout waits for, once its request expired: a new request (a new
    notification, a new Slack message), whose approvals start from none. Refused while the request is open."""

    def decide(locked: Rollout, who: Actor) -> _Move:
        status = approval_status(rollout=locked)
        if status is None:
            raise Conflict(f"rollout {locked.pk} has no approval request", field="state")
        if not status.expired:
            raise Conflict(
                f"the approval request for {status.what} is open until "
                f"{status.request.expires_at.isoformat(timespec='seconds')}: {status.text}",
                field="approval",
            )
        return _Move(
            Kind.AWAITING_APPROVAL, State.AWAITING_APPROVAL,
            reason=reason or f"approval of {status.what} asked again by {who.name} (the request of "
            f"{status.request.requested_at.isoformat(timespec='seconds')} expired)",
        )  # fmt: skip

    return _transition(
        rollout, action="request_approval", actor=actor, reason=reason, decide=decide,
        expected_version=expected_version, idempotency=idempotency,
    )  # fmt: skip


def rollout_advance(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None, idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Finish the current step: enter the next one, wait for its approval, or promote after the last."""
    return _transition(
        rollout, action="advance", actor=actor, reason=reason, evidence=evidence, expected_version=expected_version,
        idempotency=idempotency,
        decide=lambda locked, who: _next(locked, locked.step_index + 1),
    )  # fmt: skip


def rollout_promote(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None, idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Promote now: into the bake when the plan bakes, else the candidate becomes the alias's baseline. Refused
    while a later step still needs an approval. While baking: end the bake now (the holdout goes too)."""

    def decide(locked: Rollout, who: Actor) -> _Move:
        if locked.state == State.BAKING:
            return _Move(Kind.BAKED, State.PROMOTED)
        if locked.state == State.PAUSED and locked.paused_from not in (State.RUNNING, ""):
            raise Conflict(
                f"cannot promote rollout {locked.pk}: it was paused while {locked.paused_from}", field="state"
            )
        steps = locked.steps
        for index in range(locked.step_index + 1, len(steps)):
            if steps[index]["requires_approval"] and not _approved(locked, index):
                raise Conflict(f"steps[{index}] requires an approval: approve it rather than promote", field="state")
        if locked.plan.get("promotion_requires_approval") and not _approved(locked, len(steps)):
            raise Conflict("the plan requires an approval of the promotion", field="state")
        return _promotion(locked)

    return _transition(
        rollout, action="promote", actor=actor, reason=reason, evidence=evidence,
        expected_version=expected_version, decide=decide, idempotency=idempotency,
    )  # fmt: skip


def _cancel_gate_if_gating(locked: Rollout) -> list[Callable[[], None]]:
    if locked.state == State.GATING or locked.paused_from == State.GATING:
        rollout_id = locked.pk
        return [lambda: gates.eval_gate_cancel_safely(rollout_id=rollout_id)]
    return []


def rollout_rollback(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None, idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Send every user back to the baseline (candidate weight 0) and end the rollout. A promoted rollout
    still baking may be rolled back (the alias's route goes back to the baseline, audited like any other);
    once its bake ended, it is refused."""
    return _transition(
        rollout, action="rollback", actor=actor, reason=reason, evidence=evidence, expected_version=expected_version,
        idempotency=idempotency,
        decide=lambda locked, who: _Move(Kind.ROLLED_BACK, State.ROLLED_BACK, on_commit=_cancel_gate_if_gating(locked)),
    )  # fmt: skip


def rollout_abort(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None,
    idempotency: ActionKey | None = None,
) -> Rollout:  # fmt: skip
    """Stop without a verdict: the baseline keeps (or gets back) all traffic."""
    return _transition(
        rollout, action="abort", actor=actor, reason=reason, expected_version=expected_version, idempotency=idempotency,
        decide=lambda locked, who: _Move(Kind.ABORTED, State.ABORTED, on_commit=_cancel_gate_if_gating(locked)),
    )  # fmt: skip


def rollout_eval_gate_decided(
    *, rollout: Rollout | int, passed: bool, reason: str, evidence: dict[str, Any], expected_version: int | None = None
) -> Rollout:
    """The analysis's verdict on the eval gate: passed -> the first step; failed -> rolled back."""

    def decide(locked: Rollout, who: Actor) -> _Move:
        if passed:
            move = _next(locked, 0, kind=Kind.EVAL_GATE_PASSED)
            if move.kind == Kind.STEP_STARTED:
                move.kind = Kind.EVAL_GATE_PASSED
            return move
        return _Move(Kind.EVAL_GATE_FAILED, State.ROLLED_BACK, reason=reason)

    from rollouts.actors import ANALYSIS

    return _transition(
        rollout, action="eval_gate", actor=ANALYSIS, reason=reason, decide=decide, evidence=evidence,
        expected_version=expected_version,
    )  # fmt: skip


def rollout_start_when_ready(*, rollout: Rollout) -> Rollout | None:
    """Start a draft marked start_when_ready once both versions have a ready engine; None while waiting."""
    if not rollout.start_when_ready or rollout.state != State.DRAFT:
        return None
    candidate_ok = model_version_is_ready(model_version=rollout.candidate) or capacity.rollout_candidate_startable(
        rollout=rollout)
    if not (model_version_is_ready(model_version=rollout.baseline) and candidate_ok):
        return None
    try:
        return rollout_start(rollout=rollout, actor=SYSTEM, reason="both versions have a ready engine", expected_version=rollout.version)
    except (Conflict, DomainError) as exc:
        logger.info("rollout %s not started yet: %s", rollout.pk, exc)
        return None


# --- analysis bookkeeping (not transitions) -------------------------------------------------------------


def rollout_analysis_claim(*, rollout_id: int, lease_s: float) -> datetime | None:
    """Compare-and-set lease: one analysis of a rollout at a time; a dead worker's lease runs out. The
    lease's end when claimed (what `rollout_analysis_renew` is given), None when another look holds it."""
    now = timezone.now()
    until = now + timedelta(seconds=lease_s)
    claimed = Rollout.objects.filter(
        Q(analysis_lease_until__isnull=True) | Q(analysis_lease_until__lt=now), pk=rollout_id
    ).update(analysis_lease_until=until)
    return until if claimed == 1 else None


def rollout_analysis_renew(*, rollout_id: int, held_until: datetime, lease_s: float) -> datetime | None:
    """Extend the lease of a look still running: compare-and-set on the end it was claimed or last renewed
    with (`held_until`), so a lease that ran out and was claimed by another look is never taken back. The
    new end, or None when the lease is no longer this look's."""
    until = timezone.now() + timedelta(seconds=lease_s)
    renewed = Rollout.objects.filter(pk=rollout_id, analysis_lease_until=held_until).update(analysis_lease_until=until)
    return until if renewed == 1 else None


def rollout_analysis_release(
    *, rollout_id: int, held_until: datetime, readiness: dict[str, Any] | None = None, analysed: bool = True
) -> None:
    """Let go of the lease, with the look's bookkeeping: when each version was first seen unready, and the
    planned sample of a step fixed at its first look (`planned_samples`); `analysed`: the look completed (the
    watchdog reads `last_analysed_at`). `held_until`: the lease's end as this look last claimed or renewed
    it; a lease that has another end by now (it ran out and another look claimed it) stays that look's."""
    lease = Case(When(analysis_lease_until=held_until, then=Value(None)), default=F("analysis_lease_until"))
    changes: dict[str, Any] = {"analysis_lease_until": lease}
    if analysed:
        changes["last_analysed_at"] = timezone.now()
    if readiness is not None:
        changes.update(readiness)
    Rollout.objects.filter(pk=rollout_id).update(**changes)
