"""A small ASGI router: the gateway's hot path bypasses Django's request machinery entirely."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)


class LifespanHooks(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...


class PathRouter:
    def __init__(
        self,
        *,
        default: ASGIApp,
        mounts: Sequence[tuple[str, ASGIApp]] = (),
        lifespan: Sequence[LifespanHooks] = (),
    ) -> None:
        self.default = default
        self.mounts = tuple(mounts)
        self.lifespan_hooks = tuple(lifespan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope.get("path", "")
        for prefix, app in self.mounts:
            if path.startswith(prefix):
                await app(scope, receive, send)
                return
        await self.default(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for hook in self.lifespan_hooks:
                        await hook.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in reversed(self.lifespan_hooks):
                    try:
                        await hook.shutdown()
                    except Exception:
                        log.exception("shutdown hook failed")
                await send({"type": "lifespan.shutdown.complete"})
                return
