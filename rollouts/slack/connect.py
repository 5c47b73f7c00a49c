"""Plugging Slack into the rollouts app, from RolloutsConfig.ready(): the notification dispatcher, the
Celery tasks (rollouts.slack is not an app of its own, so autodiscovery does not find them) and the admin."""

from __future__ import annotations


def slack_connect() -> None:
    from rollouts.notifications import dispatcher_register
    from rollouts.slack import admin, tasks  # noqa: F401  (registers the admin and the tasks)
    from rollouts.slack.services import slack_event_dispatch

    dispatcher_register("slack", slack_event_dispatch)
