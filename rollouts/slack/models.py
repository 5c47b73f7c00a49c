"""Slack's rows, in the rollouts app (imported by rollouts/models.py so migrations see them).

`SlackIdentity` maps a Slack user to a platform user; `SlackMessage` is one message the platform posts
(or tried to post): what it is about, where it went, and its delivery state, so a task that runs twice
posts once and a later decision can update the message in place."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class SlackIdentity(models.Model):
    """A Slack user (workspace id + user id) acting as a platform user. Proven by `/rollout link CODE`
    from Slack itself, or set by an admin."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="slack_identities")
    team_id = models.CharField(max_length=32, help_text="The Slack workspace id, e.g. T0123ABCD.")
    slack_user_id = models.CharField(max_length=32, help_text="The Slack user id, e.g. U0123ABCD.")
    slack_username = models.CharField(max_length=150, blank=True, help_text="As Slack last reported it.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "rollouts"
        verbose_name = "Slack identity"
        verbose_name_plural = "Slack identities"
        constraints = [
            # One platform user per Slack user; one Slack user per platform user and workspace.
            models.UniqueConstraint(fields=("team_id", "slack_user_id"), name="slack_identity_unique"),
            models.UniqueConstraint(fields=("user", "team_id"), name="slack_identity_one_per_team"),
        ]

    def __str__(self) -> str:
        return f"{self.team_id}/{self.slack_user_id} -> {self.user_id}"


class SlackMessage(models.Model):
    class Kind(models.TextChoices):
        APPROVAL = "approval"  # asks for an approval, with buttons; updated with the decision
        ROLLED_BACK = "rolled_back"
        PROMOTED = "promoted"
        EVAL_GATE_FAILED = "eval_gate_failed"
        PAUSED = "paused"
        ENGINE_FAILED = "engine_failed"

    class Status(models.TextChoices):
        PENDING = "pending"  # to be posted (again, after a transient failure)
        POSTING = "posting"  # claimed by one task (compare-and-set)
        POSTED = "posted"
        FAILED = "failed"  # a permanent error, or out of attempts

    # What the message is about, unique: "event:<id>" or "engine:<worker id>:<failure time>". A second
    # task for the same key finds the row and posts nothing.
    key = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=24, choices=Kind.choices)
    rollout = models.ForeignKey(
        "rollouts.Rollout", null=True, blank=True, on_delete=models.CASCADE, related_name="slack_messages"
    )
    event = models.ForeignKey("rollouts.RolloutEvent", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    # For an approval: the step it asks about (len(steps) is the promotion) and the rollout's version then.
    step_index = models.IntegerField(null=True, blank=True)
    rollout_version = models.PositiveIntegerField(null=True, blank=True)
    engine_worker_id = models.PositiveBigIntegerField(null=True, blank=True)
    # "bot" (chat.postMessage: has a ts, can be updated) or "webhook" (notify-only: cannot be updated).
    via = models.CharField(max_length=16, blank=True)
    channel = models.CharField(max_length=80, blank=True)
    ts = models.CharField(max_length=32, blank=True, help_text="Slack's id of the posted message.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    claimed_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    posted_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    # The decision shown on an approval message, once made (who, when, how), and whether the message says
    # so yet. `response_url` is the click's, for messages without a ts (valid for 30 minutes).
    outcome = models.CharField(max_length=40, blank=True, help_text="approved, rejected, rolled back, ...")
    outcome_by = models.CharField(max_length=300, blank=True)
    outcome_at = models.DateTimeField(null=True, blank=True)
    outcome_shown = models.BooleanField(default=False)
    response_url = models.URLField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "rollouts"
        indexes = [
            models.Index(fields=("rollout", "kind", "step_index")),
            models.Index(fields=("kind", "status", "created_at")),
        ]

    def __str__(self) -> str:
        return f"slack {self.kind} {self.key} ({self.status})"
