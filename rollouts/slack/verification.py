"""Is this request from Slack, now, and the first time? Checked on the raw body before anything is parsed.

Slack's v0 scheme: X-Slack-Signature = "v0=" + hex(HMAC-SHA256(signing secret, "v0:{timestamp}:{body}")),
X-Slack-Request-Timestamp within five minutes of now. A signature is remembered (in the shared database
cache) for longer than it can be valid, so a captured request replayed inside the window is refused too.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from django.conf import settings
from django.core.cache import cache

WINDOW_S = 5 * 60
# A timestamp up to WINDOW_S in the future is accepted too, so a signature stays valid for up to
# 2 * WINDOW_S; remember it a little longer than that.
REMEMBER_S = 2 * WINDOW_S + 60


class RequestRefused(Exception):
    """Not a genuine, fresh, first-time request from Slack (401). `reason` is for logs and the body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SlackNotConfigured(Exception):
    """No signing secret: nothing from Slack can be trusted (503)."""


def slack_request_verify(*, body: bytes, timestamp: str | None, signature: str | None, now: float | None = None) -> None:
    """Raise `RequestRefused` unless the request is signed with our secret, fresh and not seen before."""
    secret = settings.SLACK_SIGNING_SECRET
    if not secret:
        raise SlackNotConfigured("SLACK_SIGNING_SECRET is not set")
    if not timestamp or not signature:
        raise RequestRefused("missing X-Slack-Request-Timestamp or X-Slack-Signature")
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise RequestRefused("X-Slack-Request-Timestamp is not a Unix time")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > WINDOW_S:
        raise RequestRefused("stale timestamp: more than five minutes from now")
    if not signature.startswith("v0=") or len(signature) > 100:
        raise RequestRefused("X-Slack-Signature is not a v0 signature")
    # Over the raw bytes as received (slack_sdk's SignatureVerifier decodes them as UTF-8 first, and
    # raises on a body that is not), compared in constant time.
    expected = "v0=" + hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise RequestRefused("bad signature")
    # cache.add is an INSERT on the database cache: of two concurrent replays exactly one gets True.
    key = "slack:seen:" + hashlib.sha256(signature.encode()).hexdigest()
    if not cache.add(key, timestamp, timeout=REMEMBER_S):
        raise RequestRefused("replayed request: this signature was already accepted")
