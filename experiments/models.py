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
