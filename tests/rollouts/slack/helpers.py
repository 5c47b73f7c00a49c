"""Requests as Slack makes them: form bodies signed with the v0 scheme (computed here, independently of
the code under test), button clicks and slash commands."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from django.test.client import Client as DjangoClient

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TEAM = "T0RAMP01"


def sign(body: bytes, *, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = b"v0:" + ts.encode() + b":" + body
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"HTTP_X_SLACK_REQUEST_TIMESTAMP": ts, "HTTP_X_SLACK_SIGNATURE": f"v0={digest}"}


def post(client: DjangoClient, path: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
    """POST a raw form body as Slack does (signed now, unless `headers` says otherwise)."""
    extra: dict[str, Any] = sign(body) if headers is None else headers
    return client.post(path, data=body, content_type="application/x-www-form-urlencoded", **extra)


def click_payload(
    *, user: str, action_id: str = "rollout_approve", value: dict[str, Any] | str | None = None, team: str = TEAM,
    response_url: str = "", channel: str = "C0CHANNEL", ts: str = "", username: str = "",
) -> dict[str, Any]:  # fmt: skip
    raw_value = value if isinstance(value, str) else json.dumps(value or {})
    return {
        "type": "block_actions",
        "team": {"id": team, "domain": "ramp"},
        "user": {"id": user, "username": username or user.lower(), "team_id": team},
        "api_app_id": "A0APP",
        "container": {"type": "message", "channel_id": channel, "message_ts": ts},
        "channel": {"id": channel},
        "response_url": response_url,
        "actions": [{"type": "button", "action_id": action_id, "block_id": "b", "value": raw_value,
                     "action_ts": str(time.time())}],
    }  # fmt: skip


def click_body(**kwargs: Any) -> bytes:
    return urlencode({"payload": json.dumps(click_payload(**kwargs))}).encode()


def command_body(text: str, *, user: str, team: str = TEAM, username: str = "") -> bytes:
    return urlencode({
        "token": "deprecated-verification-token", "team_id": team, "team_domain": "ramp", "channel_id": "C0CHANNEL",
        "user_id": user, "user_name": username or user.lower(), "command": "/rollout", "text": text,
        "response_url": "https://hooks.slack.invalid/commands/1", "trigger_id": uuid.uuid4().hex,
    }).encode()  # fmt: skip


def block_texts(blocks: list[dict[str, Any]]) -> str:
    """Every piece of text a person would read in the blocks, one per line."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") in ("plain_text", "mrkdwn") and isinstance(node.get("text"), str):
                out.append(node["text"])
                return
            for key, value in node.items():
                if key not in ("confirm",):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(blocks)
    return "\n".join(out)


def buttons(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for b in blocks if b.get("type") == "actions" for e in b.get("elements", []) if e.get("type") == "button"]

