"""uvicorn's httptools protocol with two bounds on a request's head (its request line and headers).

Stock uvicorn has neither: a client may trickle a head one byte a second and hold the connection for ever
(slow-loris; `--timeout-keep-alive` only covers the idle time between requests, and any byte cancels it),
or send one endless header that is buffered in full (seen here: 56 MB of header grew the process by
100 MB). With this protocol a head must arrive within HTTP_HEAD_TIMEOUT_S (else 408 and the connection
closes) and within HTTP_MAX_HEAD_BYTES (else 431). Bodies are bounded by the apps (the gateway's
GATEWAY_MAX_BODY_BYTES, Django's DATA_UPLOAD_MAX_MEMORY_SIZE); a slow body is a reverse proxy's to time
out (nginx's client_body_timeout), as it is in any production set-up with one in front.

Run: `uvicorn --http config.http_server:HeadBoundedProtocol ...` (Procfile, docker-compose.yml).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

_DEFAULT_TIMEOUT_S = 10.0
_DEFAULT_MAX_BYTES = 64 * 1024


def _limits() -> tuple[float, int]:
    # Read when the first connection comes in: by then uvicorn has loaded the app, and with it the settings.
    try:
        from django.conf import settings

        return float(settings.HTTP_HEAD_TIMEOUT_S), int(settings.HTTP_MAX_HEAD_BYTES)
    except Exception:
        return _DEFAULT_TIMEOUT_S, _DEFAULT_MAX_BYTES


class HeadBoundedProtocol(HttpToolsProtocol):
    _limits: tuple[float, int] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if HeadBoundedProtocol._limits is None:
            HeadBoundedProtocol._limits = _limits()
        self._head_timeout_s, self._max_head_bytes = HeadBoundedProtocol._limits
        self._head_timer: asyncio.TimerHandle | None = None
        # True while the next thing expected from the client is (the rest of) a request head.
        self._in_head = True
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None and self._no_response_in_flight():
                self._arm_head_timer()
        super().data_received(data)
        if self._in_head and self._head_bytes > self._max_head_bytes and not self.transport.is_closing():
            self._refuse(431, b"Request header fields too large.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined head that started while the response was going out gets its deadline now.
        if self._in_head and self._head_bytes and self._head_timer is None and not self.transport.is_closing():
            self._arm_head_timer()

    # --- ours -------------------------------------------------------------------------------------

    def _no_response_in_flight(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head or not self._no_response_in_flight():
            return
        if self._head_bytes == 0:
            # A connection opened and never used (browsers open spare ones): close it without a word.
            self.transport.close()
            return
        self._refuse(408, b"The request head did not arrive in time.")

    def _refuse(self, status: int, message: bytes) -> None:
        self.logger.warning("%s from %s: %s", status, self.client and self.client[0], message.decode())
        self._cancel_head_timer()
        self.transport.write(
            b"".join([
                STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: ", str(len(message)).encode(), b"\r\n", b"connection: close\r\n\r\n", message,
            ])
        )
        self.transport.close()
