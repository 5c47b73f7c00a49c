from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from experiments.models import OutcomeEvent


@admin.register(OutcomeEvent)
class OutcomeEventAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "value", "request_id", "rollout_id", "arm", "created_at")
    list_filter = ("kind", "arm")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
