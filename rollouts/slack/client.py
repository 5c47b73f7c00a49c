"""Talking to Slack: the Web API with the bot token, or an incoming webhook in notify-only mode.

Every failure is sorted into transient (rate limited, Slack's 5xx, a network error: worth retrying with
backoff) and permanent (a bad token, an unknown channel: retrying would only repeat it). Callers retry
the first and record the second."""

from __future__ import annotations

import logging
import urllib.error
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.webhook import WebhookClient

logger = logging.getLogger(__name__)

# Slack answers in well under a second; a worker should not hang on it much longer.
TIMEOUT_S = 10
# Error codes Slack returns for a condition that passes by itself.
_TRANSIENT_CODES = {"ratelimited", "rate_limited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}


class SlackError(Exception):
    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class SlackTransientError(SlackError):
    """Try again later (after `retry_after_s` when Slack said so)."""


class SlackPermanentError(SlackError):
    """Retrying will not help: a bad token, an unknown channel, a message that is gone."""


def mode() -> str:
    """ "bot" (a bot token: messages with buttons, updated later), "webhook" (notify-only) or "off"."""
    if settings.SLACK_BOT_TOKEN:
        return "bot"
    if settings.SLACK_WEBHOOK_URL:
        return "webhook"
    return "off"


def channel_for(*, alias: str | None) -> str:
    channels: dict[str, str] = getattr(settings, "SLACK_ALIAS_CHANNELS", {}) or {}
    if alias and alias in channels:
        return channels[alias]
    return str(settings.SLACK_DEFAULT_CHANNEL)


def _web() -> WebClient:
    return WebClient(token=settings.SLACK_BOT_TOKEN, base_url=str(settings.SLACK_API_BASE_URL or "https://slack.com/api/"), timeout=TIMEOUT_S)


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    for name in ("Retry-After", "retry-after"):
        value = headers.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


def _api_error(method: str, exc: SlackApiError) -> SlackError:
    response = exc.response
    status = int(getattr(response, "status_code", 0) or 0)
    data = getattr(response, "data", None)
    code = data.get("error", "") if isinstance(data, dict) else ""
    message = f"{method}: HTTP {status} {code}".strip()
    if status == 429 or status >= 500 or code in _TRANSIENT_CODES:
        return SlackTransientError(message, retry_after_s=_retry_after(getattr(response, "headers", None)))
    return SlackPermanentError(message)


def _network_error(method: str, exc: Exception) -> SlackError:
    # URLError, a socket timeout, a refused connection: the network or Slack is down for now.
    return SlackTransientError(f"{method}: {type(exc).__name__}: {exc}"[:300])


@dataclass(frozen=True)
class Posted:
    channel: str
    ts: str


def post_message(*, channel: str, text: str, blocks: list[dict[str, Any]]) -> Posted:
    """chat.postMessage with the bot token; Slack's channel id and the message's ts come back."""
    try:
        response = _web().chat_postMessage(channel=channel, text=text, blocks=blocks, unfurl_links=False)
    except SlackApiError as exc:
        raise _api_error("chat.postMessage", exc) from exc
    except (urllib.error.URLError, OSError, SlackRequestError) as exc:
        raise _network_error("chat.postMessage", exc) from exc
    return Posted(channel=str(response.get("channel") or channel), ts=str(response.get("ts") or ""))


def update_message(*, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
    try:
        _web().chat_update(channel=channel, ts=ts, text=text, blocks=blocks)
    except SlackApiError as exc:
        raise _api_error("chat.update", exc) from exc
    except (urllib.error.URLError, OSError, SlackRequestError) as exc:
        raise _network_error("chat.update", exc) from exc


def webhook_send(*, url: str, text: str, blocks: list[dict[str, Any]] | None = None, **options: Any) -> None:
    """An incoming webhook, or a click's response_url (`replace_original`, `response_type` in options)."""
    try:
        response = WebhookClient(url, timeout=TIMEOUT_S).send(text=text, blocks=blocks, **options)
    except (urllib.error.URLError, OSError, SlackRequestError) as exc:
        raise _network_error("webhook", exc) from exc
    if response.status_code == 200:
        return
    message = f"webhook: HTTP {response.status_code} {str(response.body)[:100]}"
    if response.status_code == 429 or response.status_code >= 500:
        raise SlackTransientError(message, retry_after_s=_retry_after(response.headers))
    raise SlackPermanentError(message)
