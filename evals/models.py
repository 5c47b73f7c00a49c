"""Evals' data: suites and their items, runs with per-item results, eval gates of rollouts, and which
scorers a rollout wants on its shadow pairs. Other apps use these through `evals.services` and
`evals.selectors` only."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from serving.models import ModelVersion


class EvalSuite(models.Model):
    """A named, versioned dataset. Uploading under an existing name makes the next version; items of a
    version never change, so a run's results always refer to the data it was scored on."""

    class Source(models.TextChoices):
        UPLOAD = "upload"
        BUILTIN = "builtin"

    name = models.SlugField(max_length=64)
    version = models.PositiveIntegerField()
    description = models.TextField(blank=True)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.UPLOAD)
    # sha256 of the normalised items: the same upload twice is the same version, not a new one.
    content_hash = models.CharField(max_length=64)
    item_count = models.PositiveIntegerField(default=0)
    tags = models.JSONField(default=dict, blank=True, help_text="Items per tag.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("name", "-version")
        constraints = [models.UniqueConstraint(fields=("name", "version"), name="eval_suite_version_unique")]

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class EvalItem(models.Model):
    """One case: either a completion prompt or chat messages, an optional reference answer, and tags."""

    suite = models.ForeignKey(EvalSuite, on_delete=models.CASCADE, related_name="items")
    position = models.PositiveIntegerField(help_text="Line order in the upload, from 0.")
    key = models.CharField(max_length=128, help_text="The item's `id` in the upload, or its line number.")
    prompt = models.TextField(blank=True)
    messages = models.JSONField(null=True, blank=True)
    # None (no reference) differs from "" (the right answer is empty): scorers that need one say so.
    reference = models.TextField(null=True, blank=True)  # noqa: DJ001
    tags = models.JSONField(default=list, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ("suite", "position")
        constraints = [
            models.UniqueConstraint(fields=("suite", "position"), name="eval_item_position_unique"),
            models.UniqueConstraint(fields=("suite", "key"), name="eval_item_key_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.suite.label}#{self.key}"


class EvalRun(models.Model):
    """A suite run against one model version's engine, scored by a list of scorers."""

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)
    TERMINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED)

    suite = models.ForeignKey(EvalSuite, on_delete=models.PROTECT, related_name="runs")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    # The version's lineage when the run was made: a finished run is reused only for the same weights.
    lineage_hash = models.CharField(max_length=64, blank=True)
    scorers = models.JSONField(default=list, help_text="Normalised scorer specs: [{name, label, params}].")
    concurrency = models.PositiveSmallIntegerField(default=4)
    max_tokens = models.PositiveIntegerField(default=64)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    state_reason = models.CharField(max_length=500, blank=True)
    cancel_requested = models.BooleanField(default=False)
    total = models.PositiveIntegerField(default=0)
    # Written in batches by the runner (kind to SQLite); equals the number of stored results.
    done = models.PositiveIntegerField(default=0)
    failed_items = models.PositiveIntegerField(default=0, help_text="Items whose request failed after retries.")
    summary = models.JSONField(default=dict, blank=True)
    # Compare-and-set claim of the worker executing it; empty when no worker holds it.
    claim_token = models.CharField(max_length=64, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    executions = models.PositiveIntegerField(default=0, help_text="How many times a worker claimed it.")
    # Which rollout's eval gate made it, if any (cancelling the gate cancels only its own runs).
    gate_rollout_id = models.PositiveBigIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-id",)
        indexes = [
            models.Index(fields=("state", "heartbeat_at")),
            models.Index(fields=("suite", "model_version", "state")),
        ]

    def __str__(self) -> str:
        return f"eval run {self.pk} ({self.suite_id}, {self.state})"

    @property
    def is_finished(self) -> bool:
        return self.state in self.TERMINAL_STATES


class EvalResult(models.Model):
    """One item's answer and scores in one run: the run's checkpoint (finished items are never re-run)."""

    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="results")
    item = models.ForeignKey(EvalItem, on_delete=models.CASCADE, related_name="+")
    output = models.TextField(blank=True)
    # {label: {"value": float | None, "passed": bool | None, "error": str}}
    scores = models.JSONField(default=dict)
    error = models.CharField(max_length=500, blank=True, help_text="Why the request failed, after retries.")
    latency_ms = models.FloatField(null=True)
    prompt_tokens = models.PositiveIntegerField(null=True)
    completion_tokens = models.PositiveIntegerField(null=True)
    attempts = models.PositiveSmallIntegerField(default=1, help_text="Requests sent, retries included.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("run", "item__position")
        constraints = [models.UniqueConstraint(fields=("run", "item"), name="eval_result_unique")]

    def __str__(self) -> str:
        return f"result of item {self.item_id} in run {self.run_id}"


class EvalGate(models.Model):
    """A rollout's eval gate: the candidate against the baseline on a suite, before traffic moves."""

    class Status(models.TextChoices):
        PENDING = "pending"
        PASSED = "passed"
        FAILED = "failed"
        # The suite cannot show non-inferiority at the margin (too few items): not a pass.
        UNDECIDED = "undecided"
        ERROR = "error"
        CANCELLED = "cancelled"

    rollout_id = models.PositiveBigIntegerField(unique=True)
    spec = models.JSONField(help_text="The normalised gate spec (see evals.services.eval_gate_validate).")
    baseline = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    candidate = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    baseline_run = models.ForeignKey(EvalRun, null=True, on_delete=models.SET_NULL, related_name="+")
    candidate_run = models.ForeignKey(EvalRun, null=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    reason = models.TextField(blank=True)
    evidence = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"eval gate of rollout {self.rollout_id} ({self.status})"


class ShadowScoring(models.Model):
    """Which scorers a rollout wants on its shadow pairs (set when the rollout starts)."""

    rollout_id = models.PositiveBigIntegerField(unique=True)
    scorers = models.JSONField(default=list, help_text="Normalised scorer specs; the first is the primary one.")
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"shadow scoring of rollout {self.rollout_id}"
