"""A small stand-in for Slack's Web API and its webhooks, served over real HTTP on loopback.

Point `slack_sdk`'s WebClient at `standin.api_url` (settings.SLACK_API_BASE_URL). It checks the bearer
token like Slack (HTTP 200 with {"ok": false, "error": "invalid_auth"}), records every call (method,
JSON or form body), answers in Slack's shape ({"ok": true, "channel": ..., "ts": ...}), keeps posted
messages so chat.update of an unknown ts fails as on Slack, and can be told to fail the next calls with
429 (ratelimited, Retry-After) or 500. `webhook_url` and `response_url(...)` take webhook posts.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl


@dataclass
class Call:
    method: str  # "chat.postMessage", or "hook:<path>" for a webhook / response_url post
    body: dict[str, Any]
    authorized: bool
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Failure:
    status: int
    error: str
    retry_after: int | None


class SlackStandin:
    def __init__(self, *, token: str = "xoxb-standin-token") -> None:
        self.token = token
        self.calls: list[Call] = []
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self._failures: dict[str, list[_Failure]] = {}
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "the stand-in is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/hooks/webhook"

    def response_url(self, name: str = "click") -> str:
        return f"{self.url}/hooks/response/{name}"

    def fail_next(self, method: str, *, status: int = 429, error: str = "ratelimited", times: int = 1,
                  retry_after: int | None = 1) -> None:  # fmt: skip
        """The next `times` calls of `method` ("chat.postMessage", or "hook" for any webhook) fail."""
        with self._lock:
            self._failures.setdefault(method, []).extend(_Failure(status, error, retry_after) for _ in range(times))

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method or (method == "hook" and c.method.startswith("hook:"))]

    def wait_for(self, method: str, count: int = 1, timeout_s: float = 60.0) -> list[Call]:
        """For calls made by another process (a real Celery worker)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [c for c in self.calls_to(method) if c.authorized or c.method.startswith("hook:")]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def start(self) -> SlackStandin:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8") if length else ""
                if "json" in (self.headers.get("Content-Type") or ""):
                    body = json.loads(raw or "{}")
                else:
                    body = dict(parse_qsl(raw))
                standin._handle(self, self.path, body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="slack-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- serving ------------------------------------------------------------------------------------

    def _failure(self, method: str) -> _Failure | None:
        with self._lock:
            queue = self._failures.get(method) or self._failures.get("hook" if method.startswith("hook:") else "")
            return queue.pop(0) if queue else None

    def _handle(self, handler: BaseHTTPRequestHandler, path: str, body: dict[str, Any]) -> None:
        if path.startswith("/hooks/"):
            method = "hook:" + path[len("/hooks/"):]
            authorized = True
        elif path.startswith("/api/"):
            method = path[len("/api/"):].split("?", 1)[0]
            authorized = handler.headers.get("Authorization") == f"Bearer {self.token}"
        else:
            self._send(handler, 404, {"ok": False, "error": "unknown_method"})
            return
        headers = {k: v for k, v in handler.headers.items()}
        with self._lock:
            self.calls.append(Call(method=method, body=body, authorized=authorized, headers=headers))
        failure = self._failure(method)
        if failure is not None:
            extra = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else {}
            if failure.status >= 500:
                self._send_text(handler, failure.status, "upstream_error", extra)
            else:
                self._send(handler, failure.status, {"ok": False, "error": failure.error}, extra)
            return
        if method.startswith("hook:"):
            self._send_text(handler, 200, "ok")  # what Slack's webhooks answer
            return
        if not authorized:
            self._send(handler, 200, {"ok": False, "error": "invalid_auth" if handler.headers.get("Authorization") else "not_authed"})
            return
        self._send(handler, 200, self._api(method, body))

    def _api(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        channel = str(body.get("channel") or "")
        if method == "chat.postMessage":
            if not channel:
                return {"ok": False, "error": "channel_not_found"}
            # Slack answers with the channel's id, whatever name it was given.
            channel_id = channel if not channel.startswith("#") else f"C{zlib.crc32(channel.encode()):010d}"
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            with self._lock:
                self.messages[(channel_id, ts)] = body
            return {"ok": True, "channel": channel_id, "ts": ts, "message": {"text": body.get("text", "")}}
        if method == "chat.update":
            key = (channel, str(body.get("ts") or ""))
            with self._lock:
                if key not in self.messages:
                    return {"ok": False, "error": "message_not_found"}
                self.messages[key] = body
            return {"ok": True, "channel": channel, "ts": key[1]}
        if method == "auth.test":
            return {"ok": True, "team_id": "T0STANDIN", "user_id": "U0BOT"}
        return {"ok": False, "error": "unknown_method"}

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _send_text(handler: BaseHTTPRequestHandler, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        data = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain; charset=utf-8")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)


@contextmanager
def slack_standin(*, token: str = "xoxb-standin-token") -> Iterator[SlackStandin]:
    standin = SlackStandin(token=token).start()
    try:
        yield standin
    finally:
        standin.stop()
