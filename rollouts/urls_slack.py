from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from rollouts.slack import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("slack/interactions", views.slack_interactions, name="slack-interactions"),
    path("slack/commands", views.slack_commands, name="slack-commands"),
    path("account/slack", views.slack_account, name="slack-account"),
]
