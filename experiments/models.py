"""Outcome events: what the application reports about a served request or a session (thumbs, success,
a number). They join to the rollout arm that served the request through serving's request records."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class OutcomeEvent(models.Model):
    class Kind(models.TextChoices):
        THUMBS = "thumbs"  # value 1 = up, 0 = down
        SUCCESS = "success"  # value 1 = success, 0 = failure
        VALUE = "value"  # any finite number

    # The application's own id for the event, if it sends one: a retried batch is not counted twice.
    event_id = models.CharField(max_length=64, null=True, blank=True, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=64, blank=True, help_text="Optional label, e.g. 'checkout'.")
    value = models.FloatField()
    # What it is about: a request id (X-Request-Id from the gateway) or a session (the `user` field or
    # X-Session-Id), stored as the gateway's session hash.
    request_id = models.CharField(max_length=64, blank=True, db_index=True)
    session_hash = models.CharField(max_length=32, blank=True)
    occurred_at = models.DateTimeField(help_text="When the outcome happened (the client's clock), else receipt time.")
    created_at = models.DateTimeField(auto_now_add=True)
    # The aliases the reporting gateway key may call, when it is limited (empty: any): the event joins only
    # a request served on one of them, so one application cannot score another's rollout.
    allowed_aliases = models.JSONField(default=list, blank=True)
    # Resolved from the request records (at once when the record is already written, else by a later pass):
    # the rollout and arm that served it, and when that request was sent (the analysis windows on it).
    rollout_id = models.PositiveBigIntegerField(null=True, blank=True)
    arm = models.CharField(max_length=16, blank=True)
    model_version_id = models.PositiveBigIntegerField(null=True, blank=True)
    request_created_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=("rollout_id", "arm", "request_created_at")),
            models.Index(fields=("created_at",), condition=Q(resolved_at__isnull=True), name="outcome_unresolved"),
        ]

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g} ({self.request_id or self.session_hash})"


class RollupWindow(models.Model):
    """What the looks of one analysis window have folded so far (experiments.rollups): per arm, the merged
    per-session moments and the latency sketches of every request record up to `watermark` in the
    records' commit order. The next look reads only the records past it."""

    rollout_id = models.PositiveBigIntegerField()
    since = models.DateTimeField()
    until = models.DateTimeField(null=True, blank=True)
    # The columns, products and sketches the window keeps (they follow the plan's thresholds): another
    # spec is another window.
    spec_hash = models.CharField(max_length=64)
    spec = models.JSONField(default=dict)
    # Exclusive: every record whose commit order is below it has been folded, none at or above it.
    watermark = models.BigIntegerField(default=0)
    max_created_at = models.DateTimeField(null=True, blank=True)
    records = models.BigIntegerField(default=0)
    # Per arm: {"units", "exposed", "sums": {column: x}, "products": {"a|b": x}, "sketches": {field: {key: n}}}
    arms = models.JSONField(default=dict)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("rollout_id", "since", "spec_hash"), name="rollup_window_unique"),
        ]

    def __str__(self) -> str:
        return f"rollup of rollout {self.rollout_id} since {self.since:%Y-%m-%d %H:%M:%S} to {self.watermark}"


ROLLUP_SLOTS = 48


class RollupUnit(models.Model):
    """One session (or sessionless request) of one arm of a window: its per-session sums, in the slots the
    window's spec names (`v0`... in the order of its columns), and its first non-failover request time."""

    # No index of its own: the unique constraint's index starts with the window. No constraint in the
    # database either: its check ran once per inserted row at commit (a quarter of the cost of inserting
    # a window's first rows, 600,000 at 20 million records); only experiments.rollups writes these rows,
    # for the window it holds locked, deleting a window deletes its units (Django's cascade), and
    # retention prunes any left without one.
    window = models.ForeignKey(
        RollupWindow, on_delete=models.CASCADE, related_name="units", db_index=False, db_constraint=False
    )
    arm = models.CharField(max_length=16)
    unit = models.CharField(max_length=100)
    first_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        # Unit before arm: a fold looks a touched session up in every arm (exposure follows its first request).
        constraints = [models.UniqueConstraint(fields=("window", "unit", "arm"), name="rollup_unit_unique")]

    def __str__(self) -> str:
        return f"{self.arm} {self.unit} of {self.window_id}"


for _slot in range(ROLLUP_SLOTS):
    RollupUnit.add_to_class(f"v{_slot}", models.FloatField(null=True, blank=True))

# The tail checks' sample (experiments.analysis.tails): per latency field the window's spec names in
# `firsts` (in that order), the unit's first request that measured it: its time and id (the order: earliest
# time, then lowest id), its latency and its sketch bucket. Set when that request is folded, replaced only
# by an earlier one (a batch committed late). A live window keeps at most three fields; a shadow step's
# window up to nine (experiments.analysis.shadow: both sides of each session's first pair, and the
# candidate's first reply).
FIRST_SLOTS = 9
for _slot in range(FIRST_SLOTS):
    RollupUnit.add_to_class(f"first{_slot}_at", models.DateTimeField(null=True, blank=True))
    RollupUnit.add_to_class(f"first{_slot}_id", models.BigIntegerField(null=True, blank=True))
    RollupUnit.add_to_class(f"first{_slot}_x", models.FloatField(null=True, blank=True))
    RollupUnit.add_to_class(f"first{_slot}_k", models.IntegerField(null=True, blank=True))
