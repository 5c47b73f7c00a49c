"""Celery tasks of the Slack integration: thin, take ids and plain values, safe to run twice.

Retries are for transient failures only (rate limits, Slack's 5xx, the network), bounded, with backoff
that honours Slack's Retry-After."""

from __future__ import annotations

import logging

from celery import shared_task

from rollouts.slack.client import SlackTransientError

logger = logging.getLogger(__name__)

MAX_RETRIES = 5


def _countdown(retries: int, exc: SlackTransientError) -> float:
    return max(exc.retry_after_s or 0.0, min(300.0, 5.0 * 2**retries))


@shared_task(name="rollouts.slack.message_refresh", bind=True, ignore_result=True, max_retries=MAX_RETRIES)
def slack_message_refresh(self, message_id: int) -> str:  # type: ignore[no-untyped-def]
    """Show the decision on an approval message (who, when) in place of its buttons."""
    from rollouts.slack.services import slack_message_refresh as refresh

    try:
        return refresh(message_id=message_id)
    except SlackTransientError as exc:
        if self.request.retries >= MAX_RETRIES:
            logger.error("slack message %s not updated after %s retries: %s", message_id, MAX_RETRIES, exc.message)
            return "failed"
        raise self.retry(exc=exc, countdown=_countdown(self.request.retries, exc)) from exc


@shared_task(name="rollouts.slack.respond", bind=True, ignore_result=True, max_retries=MAX_RETRIES)
def slack_respond(self, response_url: str, text: str) -> str:  # type: ignore[no-untyped-def]
    """An ephemeral reply to the person who clicked (a refusal, and why)."""
    from rollouts.slack.services import slack_respond as respond

    try:
        respond(response_url=response_url, text=text)
    except SlackTransientError as exc:
        if self.request.retries >= MAX_RETRIES:
            logger.error("slack reply not sent after %s retries: %s", MAX_RETRIES, exc.message)
            return "failed"
        raise self.retry(exc=exc, countdown=_countdown(self.request.retries, exc)) from exc
    return "sent"


@shared_task(name="rollouts.slack.engine_failures_notify", ignore_result=True)
def slack_engine_failures_notify() -> int:
    """Beat: tell Slack about engines the agent gave up on, once per failure episode."""
    from rollouts.slack.services import slack_engine_failures_notify as notify

    return notify()


@shared_task(name="rollouts.slack.approval_messages_expire", ignore_result=True)
def slack_approval_messages_expire() -> int:
    """Beat: approval messages whose request expired show it (their buttons go)."""
    from rollouts.slack.services import approval_messages_expire as expire

    try:
        return expire()
    except SlackTransientError as exc:  # the next beat tries again
        logger.warning("approval messages not all updated: %s", exc.message)
        return 0
