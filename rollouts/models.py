"""Rollouts: a plan moving an alias's traffic from a baseline to a candidate, its audit trail, approvals,
analyses and notifications. Every write goes through `rollouts.services`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NoReturn

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from rollouts.plans.model import DEFAULT_BAKE_S, DEFAULT_HOLDOUT
from serving.models import ModelVersion


class Rollout(models.Model):
    class Strategy(models.TextChoices):
        CANARY = "canary"
        SHADOW = "shadow"
        AB = "ab", "A/B"
        BLUE_GREEN = "blue_green", "blue-green"

    class State(models.TextChoices):
        DRAFT = "draft"
        GATING = "gating"  # the eval gate runs before any traffic moves
        RUNNING = "running"  # step `step_index` is live
        AWAITING_APPROVAL = "awaiting_approval"  # step `step_index + 1` (or promotion) waits for an approver
        PAUSED = "paused"  # frozen at its current weights; `paused_from` says where resume goes
        # Promoted, and watched for the plan's `bake_s` against a holdout of sessions left on the baseline:
        # a breach rolls it back, and so may a person, until the bake ends (then: promoted).
        BAKING = "baking"
        PROMOTED = "promoted"
        ROLLED_BACK = "rolled_back"
        ABORTED = "aborted"

    # Live: holds its alias. A draft holds it too, so a plan cannot be started over another one.
    LIVE_STATES = (State.DRAFT, State.GATING, State.RUNNING, State.AWAITING_APPROVAL, State.PAUSED, State.BAKING)
    # Analysed every interval (a draft is not; a paused one still rolls back on a breach).
    ANALYSED_STATES = (State.GATING, State.RUNNING, State.AWAITING_APPROVAL, State.PAUSED, State.BAKING)
    TERMINAL_STATES = (State.PROMOTED, State.ROLLED_BACK, State.ABORTED)

    name = models.CharField(max_length=100, blank=True)
    alias_name = models.SlugField(max_length=64)
    baseline = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    candidate = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    strategy = models.CharField(max_length=16, choices=Strategy.choices)
    # The normalised plan (rollouts.plans.Plan.to_dict()): every default written out, steps compiled.
    plan = models.JSONField()
    state = models.CharField(max_length=24, choices=State.choices, default=State.DRAFT)
    state_reason = models.CharField(max_length=500, blank=True)
    # The step whose weights are live; -1 before the first one starts.
    step_index = models.IntegerField(default=-1)
    step_started_at = models.DateTimeField(null=True, blank=True)
    paused_from = models.CharField(max_length=24, blank=True)
    # Bumped by every transition; an analysis applies its decision only if the version it read is current.
    version = models.PositiveIntegerField(default=0)
    start_when_ready = models.BooleanField(
        default=False, help_text="Start by itself once both versions have a ready engine (the demo uses this)."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="rollouts_created"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # An Idempotency-Key replays the creation it first made (config.idempotency).
    idempotency_key = models.CharField(max_length=255, blank=True, default="")
    idempotency_fingerprint = models.CharField(max_length=64, blank=True)
    # Analysis bookkeeping (not transitions): a lease so one worker analyses at a time, and when each
    # version was first seen without a ready engine (grace period before acting).
    analysis_lease_until = models.DateTimeField(null=True, blank=True)
    last_analysed_at = models.DateTimeField(null=True, blank=True)
    candidate_unready_since = models.DateTimeField(null=True, blank=True)
    baseline_unready_since = models.DateTimeField(null=True, blank=True)
    # When the engines of the version this rollout retired were let go (rollouts.engines): once per rollout.
    engines_released_at = models.DateTimeField(null=True, blank=True)
    # Per step index (as text): the candidate requests the step was planned to need (rollouts.planning),
    # fixed at the first look after the step's minimums are met; reaching it undecided applies on_inconclusive.
    planned_samples = models.JSONField(default=dict, blank=True)
    # When the promotion's bake began (state baking); it ends `plan.bake_s` later.
    bake_started_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = [
            # One live rollout per alias, in the database too: a race of two creations leaves one.
            models.UniqueConstraint(
                fields=("alias_name",),
                condition=Q(state__in=["draft", "gating", "running", "awaiting_approval", "paused", "baking"]),
                name="rollout_one_live_per_alias",
            ),
            models.UniqueConstraint(
                fields=("created_by", "idempotency_key"),
                condition=~Q(idempotency_key=""),
                name="rollout_idempotency_key_unique",
            ),
            models.CheckConstraint(condition=~Q(baseline=models.F("candidate")), name="rollout_versions_differ"),
        ]
        indexes = [models.Index(fields=("state",)), models.Index(fields=("alias_name", "-created_at"))]

    def __str__(self) -> str:
        return f"rollout {self.pk} ({self.alias_name}: {self.baseline_id} -> {self.candidate_id}, {self.state})"

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.plan.get("steps") or [])

    @property
    def is_live(self) -> bool:
        return self.state in self.LIVE_STATES

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL_STATES

    @property
    def current_step(self) -> dict[str, Any] | None:
        steps = self.steps
        return steps[self.step_index] if 0 <= self.step_index < len(steps) else None

    @property
    def holdout(self) -> float:
        """The share of sessions the baseline keeps while the promotion bakes (the plan's `holdout`)."""
        return float(self.plan.get("holdout", DEFAULT_HOLDOUT) or 0.0)

    @property
    def bake_s(self) -> int:
        return int(self.plan.get("bake_s", DEFAULT_BAKE_S) or 0)

    @property
    def bake_ends_at(self) -> datetime | None:
        if self.bake_started_at is None:
            return None
        return self.bake_started_at + timedelta(seconds=self.bake_s)


class _AppendOnlyQuerySet(models.QuerySet):
    """The audit trail is never rewritten: no bulk update or delete through the ORM."""

    def update(self, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{self.model.__name__} is append-only: it cannot be updated")

    def delete(self) -> NoReturn:
        raise TypeError(f"{self.model.__name__} is append-only: it cannot be deleted")


class _AppendOnly(models.Model):
    """A row of the audit trail: written once, never changed or deleted through the ORM; on PostgreSQL a
    trigger refuses UPDATE and DELETE below it too (migration rollouts 0003)."""

    objects = _AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True
        # Django's own cascades and related lookups go through the base manager: the same refusal there.
        base_manager_name = "objects"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise TypeError(f"{type(self).__name__} is append-only: it cannot be updated")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is append-only: it cannot be deleted")


class RolloutEvent(_AppendOnly):
    """One transition of a rollout: who, why, and the per-arm evidence at that moment. Append-only."""

    class Kind(models.TextChoices):
        CREATED = "created"
        STARTED = "started"
        GATING = "gating"
        EVAL_GATE_PASSED = "eval_gate_passed"
        EVAL_GATE_FAILED = "eval_gate_failed"
        STEP_STARTED = "step_started"
        AWAITING_APPROVAL = "awaiting_approval"  # an approval request: asked (or asked again after it expired)
        APPROVAL_ADDED = "approval_added"  # one approver's go-ahead, while more are needed
        APPROVED = "approved"
        PAUSED = "paused"
        RESUMED = "resumed"
        PROMOTED = "promoted"
        ROLLED_BACK = "rolled_back"
        ABORTED = "aborted"
        BAKED = "baked"  # the promotion's bake ended with no breach: the holdout goes to the candidate too

    # Events people want to hear about (rollouts.notifications).
    NOTABLE_KINDS = (
        Kind.AWAITING_APPROVAL, Kind.APPROVAL_ADDED, Kind.ROLLED_BACK, Kind.PROMOTED, Kind.EVAL_GATE_FAILED, Kind.PAUSED,
    )  # fmt: skip

    rollout = models.ForeignKey(Rollout, on_delete=models.PROTECT, related_name="events")
    # The rollout's version after this transition: one event per version, in order.
    seq = models.PositiveIntegerField()
    kind = models.CharField(max_length=24, choices=Kind.choices)
    from_state = models.CharField(max_length=24, blank=True)
    to_state = models.CharField(max_length=24)
    step_index = models.IntegerField()
    # "alice", or "system" / "analysis" for the platform's own decisions.
    actor = models.CharField(max_length=150)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    via = models.CharField(max_length=16, default="api", help_text="api, ui, slack, cli or system")
    actor_detail = models.CharField(max_length=200, blank=True, help_text="e.g. the Slack user id")
    reason = models.TextField(blank=True)
    evidence = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta(_AppendOnly.Meta):
        ordering = ("rollout_id", "seq")
        constraints = [models.UniqueConstraint(fields=("rollout", "seq"), name="rollout_event_seq_unique")]
        indexes = [models.Index(fields=("kind", "-created_at"))]

    def __str__(self) -> str:
        return f"rollout {self.rollout_id} #{self.seq} {self.kind} by {self.actor}"


class RolloutApproval(_AppendOnly):
    """One approver's go-ahead for one step (index len(steps) means the promotion), given to one approval
    request (`request_seq`: the seq of the awaiting_approval event that asked). A step moves on once the
    plan's `approvals_required` different people approved the same, unexpired request. Append-only."""

    rollout = models.ForeignKey(Rollout, on_delete=models.PROTECT, related_name="approvals")
    step_index = models.IntegerField()
    # 0 for approvals given before requests were numbered (each of those completed its step alone).
    request_seq = models.PositiveIntegerField(default=0)
    approved_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    via = models.CharField(max_length=16, default="api")
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(_AppendOnly.Meta):
        constraints = [
            # Each approver counts once per request.
            models.UniqueConstraint(
                fields=("rollout", "step_index", "request_seq", "approved_by"), name="rollout_approval_once_per_person"
            )
        ]

    def __str__(self) -> str:
        return f"rollout {self.rollout_id} step {self.step_index + 1} approved by {self.approved_by_id}"


class RolloutActionKey(models.Model):
    """An action done with an Idempotency-Key: a retry with the same key gets the first answer back
    (config.idempotency; keys are honoured for IDEMPOTENCY_TTL). Written in the action's transaction; the
    answer is stored just after."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="+")
    action = models.CharField(max_length=24)
    seq = models.PositiveIntegerField(help_text="The version the action left the rollout at (its event's seq).")
    answer = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=("user", "key"), name="rollout_action_key_unique")]
        indexes = [models.Index(fields=("created_at",))]

    def __str__(self) -> str:
        return f"{self.action} of rollout {self.rollout_id} with key {self.key[:20]}"


class RolloutAnalysis(models.Model):
    """One look of the analysis loop: per-arm statistics, each check's interval and decision, the outcome.

    Kept compact (a few hundred bytes of JSON): the UI charts these over time."""

    class Decision(models.TextChoices):
        HOLD = "hold"
        ADVANCE = "advance"
        AWAIT_APPROVAL = "await_approval"
        PROMOTE = "promote"
        ROLLBACK = "rollback"
        PAUSE = "pause"
        GATE_PASSED = "gate_passed"
        GATE_FAILED = "gate_failed"

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="analyses")
    created_at = models.DateTimeField(default=timezone.now)
    rollout_version = models.PositiveIntegerField()
    state = models.CharField(max_length=24)
    step_index = models.IntegerField()
    window_start = models.DateTimeField(null=True, blank=True)
    decision = models.CharField(max_length=16, choices=Decision.choices)
    reason = models.CharField(max_length=500, blank=True)
    # Whether the decision changed the rollout (False for a hold, or when another look got there first).
    applied = models.BooleanField(default=False)
    arms = models.JSONField(default=dict, help_text="Per arm: n, error rate, latency means and tails, ...")
    checks = models.JSONField(default=list, help_text="Each SLO/guardrail/primary check with its bounds.")
    srm = models.JSONField(null=True, blank=True)
    # Metrics no check decides on, compared both ways for the experiments page (a report: never a decision).
    comparisons = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ("rollout_id", "created_at", "id")
        indexes = [models.Index(fields=("rollout", "created_at"))]
        verbose_name_plural = "rollout analyses"

    def __str__(self) -> str:
        return f"rollout {self.rollout_id} look at {self.created_at:%H:%M:%S}: {self.decision}"


class Notification(models.Model):
    """The delivery of one notable event to the registered dispatchers (an outbox row, written with the event)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"
        FAILED = "failed"

    event = models.OneToOneField(RolloutEvent, on_delete=models.PROTECT, related_name="notification")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    # Per dispatcher name: "sent" once delivered, so a retry after a partial failure resends nothing.
    deliveries = models.JSONField(default=dict, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=("status", "created_at"))]

    def __str__(self) -> str:
        return f"notification of event {self.event_id} ({self.status})"


from rollouts.slack.models import SlackIdentity, SlackMessage  # noqa: E402,F401
