"""Read-only admin: rollouts change through their services (the API, the UI, Slack), never by editing rows,
and the audit trail is append-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from rollouts.models import Notification, Rollout, RolloutAnalysis, RolloutApproval, RolloutEvent


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Rollout)
class RolloutAdmin(ReadOnlyAdmin):
    list_display = ("id", "alias_name", "strategy", "state", "step_index", "baseline", "candidate", "created_by", "created_at")
    list_filter = ("state", "strategy")
    search_fields = ("alias_name", "name")


@admin.register(RolloutEvent)
class RolloutEventAdmin(ReadOnlyAdmin):
    list_display = ("rollout", "seq", "kind", "from_state", "to_state", "actor", "via", "created_at")
    list_filter = ("kind", "via")
    search_fields = ("actor", "reason")


@admin.register(RolloutApproval)
class RolloutApprovalAdmin(ReadOnlyAdmin):
    list_display = ("rollout", "step_index", "approved_by", "via", "created_at")


@admin.register(RolloutAnalysis)
class RolloutAnalysisAdmin(ReadOnlyAdmin):
    list_display = ("rollout", "created_at", "step_index", "decision", "applied", "reason")
    list_filter = ("decision", "applied")


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    list_display = ("event", "status", "attempts", "sent_at", "last_error")
    list_filter = ("status",)
