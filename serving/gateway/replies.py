"""Writing the gateway's own answers to the ASGI `send` channel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving.gateway.errors import GatewayError, RateLimited

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


async def send_json(send: Send, status: int, body: bytes, extra: Headers | None = None) -> None:
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: GatewayError, extra: Headers | None = None) -> None:
    if isinstance(error, RateLimited):
        extra = [*(extra or ()), *error.headers()]
    await send_json(send, error.status, error.body(), extra)
