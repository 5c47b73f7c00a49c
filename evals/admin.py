from __future__ import annotations

from django.contrib import admin

from evals.models import EvalGate, EvalRun, EvalSuite, ShadowScoring


@admin.register(EvalSuite)
class EvalSuiteAdmin(admin.ModelAdmin):
    list_display = ("name", "version", "source", "item_count", "created_at")
    list_filter = ("source",)
    search_fields = ("name",)


@admin.register(EvalRun)
class EvalRunAdmin(admin.ModelAdmin):
    list_display = ("id", "suite", "model_version", "state", "done", "total", "created_at")
    list_filter = ("state",)
    readonly_fields = ("claim_token", "heartbeat_at", "executions", "summary")


@admin.register(EvalGate)
class EvalGateAdmin(admin.ModelAdmin):
    list_display = ("rollout_id", "baseline", "candidate", "status", "decided_at")
    list_filter = ("status",)


@admin.register(ShadowScoring)
class ShadowScoringAdmin(admin.ModelAdmin):
    list_display = ("rollout_id", "active", "updated_at")
