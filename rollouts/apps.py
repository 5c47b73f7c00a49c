from __future__ import annotations

from django.apps import AppConfig


class RolloutsConfig(AppConfig):
    name = "rollouts"

    def ready(self) -> None:
        # Slack's dispatcher, tasks and admin (rollouts/slack/connect.py).
        from rollouts.slack.connect import slack_connect

        slack_connect()
