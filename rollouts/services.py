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
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.roles import Role
from accounts.selectors import user_roles
from config.errors import Conflict, DomainError, Forbidden, NotFound
from config.idempotency import IDEMPOTENCY_TTL, idempotent_create, request_fingerprint
from rollouts import capacity, gates
from rollouts.actors import SYSTEM, Actor, ActorLike, as_actor
from rollouts.models import Rollout, RolloutApproval, RolloutEvent
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
}

# From which states each action may be taken.
ACTION_STATES: dict[str, tuple[str, ...]] = {
    "start": (State.DRAFT,),
    "pause": (State.GATING, State.RUNNING, State.AWAITING_APPROVAL),
    "resume": (State.PAUSED,),
    "approve": (State.AWAITING_APPROVAL,),
    "reject": (State.AWAITING_APPROVAL,),
    "advance": (State.RUNNING,),
    # From baking: end the bake now.
    "promote": (State.RUNNING, State.PAUSED, State.BAKING),
    "rollback": (State.GATING, State.RUNNING, State.AWAITING_APPROVAL, State.PAUSED, State.BAKING),
    "abort": (State.DRAFT, State.GATING, State.RUNNING, State.AWAITING_APPROVAL, State.PAUSED),
    # The analysis's own transitions.
    "eval_gate": (State.GATING,),
}

ACTIONS = ("start", "pause", "resume", "approve", "reject", "advance", "promote", "rollback", "abort")


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


def _check(locked: Rollout, action: str, expected_version: int | None) -> None:
    # A caller who says which version it saw is told first that the rollout moved on since: that is why
    # its action no longer fits, whatever state the move left behind.
    if expected_version is not None and locked.version != expected_version:
        raise Conflict(
            f"rollout {locked.pk} changed since it was read: expected version {expected_version}, found {locked.version}",
            field="version",
        )
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


def _evidence(rollout: Rollout | int, evidence: dict[str, Any] | None) -> dict[str, Any]:
    if evidence is not None:
        return evidence
    from rollouts.analysis import rollout_evidence

    try:
        return rollout_evidence(rollout_id=_rollout_id(rollout))
    except Exception:  # evidence is a record, never a reason for a transition to fail
        logger.exception("could not gather the evidence of rollout %s", _rollout_id(rollout))
        return {}


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
    return locked


def _approved(rollout: Rollout, step_index: int) -> bool:
    return RolloutApproval.objects.filter(rollout=rollout, step_index=step_index).exists()


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
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None
) -> Rollout:
    """draft -> gating (an eval gate) or the first step (or awaiting its approval). Both versions need a
    ready engine, and the alias must still serve the plan's baseline."""
    who = as_actor(actor)
    _require_role(who, "start")
    with transaction.atomic():
        locked = _lock(_rollout_id(rollout))
        _check(locked, "start", expected_version)
        _start_locked(locked, actor=who, reason=(reason or "").strip())
    return locked


def rollout_pause(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None,
) -> Rollout:  # fmt: skip
    """Freeze the rollout at its current weights (the analysis still rolls back on a breach)."""
    return _transition(
        rollout, action="pause", actor=actor, reason=reason, evidence=evidence, expected_version=expected_version,
        decide=lambda locked, who: _Move(Kind.PAUSED, State.PAUSED),
    )  # fmt: skip


def rollout_resume(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None
) -> Rollout:
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
        rollout, action="resume", actor=actor, reason=reason, decide=decide, expected_version=expected_version
    )


def rollout_approval_get(*, rollout: Rollout | int, step_index: int) -> RolloutApproval | None:
    return (
        RolloutApproval.objects.select_related("approved_by")
        .filter(rollout_id=_rollout_id(rollout), step_index=step_index)
        .first()
    )


def rollout_approve(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", step_index: int | None = None,
    expected_version: int | None = None,
) -> Rollout:
    """Approve the step the rollout waits for (index len(steps) is the promotion) and enter it.

    `step_index`, when given (a Slack button carries it), must be the step waiting: a second click on a
    step already decided gets a Conflict naming who decided it. Four-eyes: the rollout's creator cannot
    approve it unless the plan sets allow_self_approval."""
    who = as_actor(actor)
    if step_index is not None:
        done = rollout_approval_get(rollout=rollout, step_index=step_index)
        if done is not None:
            raise Conflict(
                f"step {step_index + 1} was already approved by {done.approved_by.get_username()} "
                f"at {done.created_at.isoformat(timespec='seconds')}",
                field="step_index",
            )

    def decide(locked: Rollout, who: Actor) -> _Move:
        pending = locked.step_index + 1
        if step_index is not None and step_index != pending:
            raise Conflict(
                f"expected an approval of step {step_index + 1}, but rollout {locked.pk} waits for step {pending + 1}",
                field="step_index",
            )
        if who.user is None:
            raise Forbidden("an approval needs a person")
        if locked.created_by_id == who.user.pk and not locked.plan.get("allow_self_approval"):
            raise Forbidden(
                "four-eyes rule: you created this rollout, so another approver must approve it "
                "(or the plan sets allow_self_approval)"
            )
        RolloutApproval.objects.create(
            rollout=locked, step_index=pending, approved_by=who.user, via=who.via, reason=reason or ""
        )
        if pending >= len(locked.steps):
            return _promotion(locked, reason or f"promotion approved by {who.name}")
        return _Move(Kind.APPROVED, State.RUNNING, step_index=pending, reason=reason or f"step {pending + 1} approved by {who.name}")

    return _transition(
        rollout, action="approve", actor=who, reason=reason, decide=decide, expected_version=expected_version
    )


def rollout_reject(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None
) -> Rollout:
    """Refuse the approval the rollout waits for: it rolls back."""

    def decide(locked: Rollout, who: Actor) -> _Move:
        return _Move(Kind.ROLLED_BACK, State.ROLLED_BACK, reason=reason or f"approval refused by {who.name}")

    return _transition(
        rollout, action="reject", actor=actor, reason=reason, decide=decide, expected_version=expected_version
    )


def rollout_advance(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None,
) -> Rollout:  # fmt: skip
    """Finish the current step: enter the next one, wait for its approval, or promote after the last."""
    return _transition(
        rollout, action="advance", actor=actor, reason=reason, evidence=evidence, expected_version=expected_version,
        decide=lambda locked, who: _next(locked, locked.step_index + 1),
    )  # fmt: skip


def rollout_promote(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None,
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
        expected_version=expected_version, decide=decide,
    )  # fmt: skip


def _cancel_gate_if_gating(locked: Rollout) -> list[Callable[[], None]]:
    if locked.state == State.GATING or locked.paused_from == State.GATING:
        rollout_id = locked.pk
        return [lambda: gates.eval_gate_cancel_safely(rollout_id=rollout_id)]
    return []


def rollout_rollback(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", evidence: dict[str, Any] | None = None,
    expected_version: int | None = None,
) -> Rollout:  # fmt: skip
    """Send every user back to the baseline (candidate weight 0) and end the rollout. A promoted rollout
    still baking may be rolled back (the alias's route goes back to the baseline, audited like any other);
    once its bake ended, it is refused."""
    return _transition(
        rollout, action="rollback", actor=actor, reason=reason, evidence=evidence, expected_version=expected_version,
        decide=lambda locked, who: _Move(Kind.ROLLED_BACK, State.ROLLED_BACK, on_commit=_cancel_gate_if_gating(locked)),
    )  # fmt: skip


def rollout_abort(
    *, rollout: Rollout | int, actor: ActorLike, reason: str = "", expected_version: int | None = None
) -> Rollout:
    """Stop without a verdict: the baseline keeps (or gets back) all traffic."""
    return _transition(
        rollout, action="abort", actor=actor, reason=reason, expected_version=expected_version,
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


def rollout_analysis_claim(*, rollout_id: int, lease_s: float) -> bool:
    """Compare-and-set lease: one analysis of a rollout at a time; a dead worker's lease runs out."""
    from datetime import timedelta

    from django.db.models import Q

    now = timezone.now()
    claimed = Rollout.objects.filter(
        Q(analysis_lease_until__isnull=True) | Q(analysis_lease_until__lt=now), pk=rollout_id
    ).update(analysis_lease_until=now + timedelta(seconds=lease_s))
    return claimed == 1


def rollout_analysis_release(
    *, rollout_id: int, readiness: dict[str, Any] | None = None, analysed: bool = True
) -> None:
    """Let go of the lease, with the look's bookkeeping: when each version was first seen unready, and the
    planned sample of a step fixed at its first look (`planned_samples`); `analysed`: the look completed (the
    watchdog reads `last_analysed_at`)."""
    changes: dict[str, Any] = {"analysis_lease_until": None}
    if analysed:
        changes["last_analysed_at"] = timezone.now()
    if readiness is not None:
        changes.update(readiness)
    Rollout.objects.filter(pk=rollout_id).update(**changes)
