from __future__ import annotations

from django.contrib import admin

from rollouts.slack.models import SlackIdentity, SlackMessage


@admin.register(SlackIdentity)
class SlackIdentityAdmin(admin.ModelAdmin):
    list_display = ("user", "team_id", "slack_user_id", "slack_username", "created_at")
    search_fields = ("user__username", "slack_user_id", "slack_username", "team_id")
    raw_id_fields = ("user",)


@admin.register(SlackMessage)
class SlackMessageAdmin(admin.ModelAdmin):
    list_display = ("key", "kind", "rollout", "status", "channel", "ts", "outcome", "attempts", "created_at")
    list_filter = ("kind", "status")
    search_fields = ("key", "ts")
    readonly_fields = [f.name for f in SlackMessage._meta.fields]

    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def,override]
        return False
