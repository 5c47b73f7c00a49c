"""A lean HTTP/1.1 client for the gateway's calls to engines: keep-alive pool, streamed bodies.

Why not httpx: profiled under streaming load, httpx/httpcore spent more CPU per request than the rest of
the gateway together (anyio stream layers per chunk, and a readability poll of every pooled connection
on every request). On a machine where the gateway shares its cores with the engine, that CPU is taken
straight from the engine. This client writes a request with one `transport.write`, parses responses
with httptools (the parser uvicorn uses), hands body bytes over as they arrive, and reuses connections.

It speaks only what engines need: POST/GET with a body of known length, responses with a length or
chunked, keep-alive, TLS for https endpoints. No redirects, no proxies, no HTTP/2.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

# A consumer slower than the engine makes the gateway stop reading past this many buffered bytes.
_HIGH_WATER = 1 << 20


class UpstreamError(Exception):
    """The engine's answer failed."""


class UpstreamRefused(UpstreamError):
    """No connection could be made: nothing was sent, another engine may take the request."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamHeadTimeout(UpstreamTimeout):
    """No response head within the time-to-first-byte timeout: the engine may be hung."""


class Endpoint:
    """Where an engine listens, parsed once when the route table is built."""

    __slots__ = ("authority", "host", "key", "path", "port", "tls")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.path = parts.path.rstrip("/")
        self.authority = parts.netloc.rsplit("@", 1)[-1]
        self.key = (self.host, self.port, self.tls)


class Response:
    """One response; its body arrives while the caller iterates `chunks()`."""

    __slots__ = (
        "_buffered", "_chunks", "_conn", "_error", "_first_timer", "_last_data", "_timer", "_waiter", "complete",
        "headers", "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.complete = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Until the first body bytes, when the head timeout covers them too (a stream's first event).
        self._first_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0

    # -- fed by the connection --

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _body(self, data: bytes) -> None:
        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _done(self) -> None:
        self.complete = True
        self._stop_timer()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self.complete and self._error is None:
            self._error = exc
        self._stop_timer()
        self._wake()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None

    # -- read by the caller --

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; what arrived together comes out together."""
        chunks = self._chunks
        while True:
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join([chunks.popleft() for _ in range(len(chunks))])
                self._buffered -= len(data)
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                yield data
                continue
            if self._error is not None:
                raise self._error
            if self.complete:
                return
            await self._wait()

    @property
    def buffered(self) -> bool:
        """Body bytes are waiting to be read."""
        return bool(self._chunks)

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    def close(self) -> None:
        """Done with it. A body not read to the end closes the connection (the engine then aborts the request)."""
        self._stop_timer()
        conn, self._conn = self._conn, None
        if conn is not None and not self.complete:
            conn.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.received_any = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport, though they behave as one.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        response = self.response
        if response is not None:
            response._last_data = self.pool.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if response is not None:
                response._fail(UpstreamError(f"bad response from the engine: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        response = self.response
        if response is not None:
            self.response = None
            response._fail(UpstreamError("the engine closed the connection" + (f": {exc}" if exc else "")))

    # -- httptools callbacks --

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response.status = self.parser.get_status_code()
            self.response._wake()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._body(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        keep = self.parser.should_keep_alive()
        self.parser = httptools.HttpResponseParser(self)
        if response is not None:
            response._conn = None
            response._done()
        # The response holds its bytes now; a connection paused for it must read again for the next one.
        self.resume()
        if keep and not self.closed:
            self.pool._release(self)
        else:
            self.abort()

    # -- ours --

    def start(self, request: bytes, response: Response) -> None:
        assert self.transport is not None
        self.response = response
        self.received_any = False
        self.transport.write(request)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, max_idle_per_host: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(
        self, endpoint: Endpoint, method: str, path: str, *, body: bytes = b"", headers: tuple[str, ...] = (),
        head_timeout_s: float | None = None, body_in_time: bool = False,
    ) -> Response:
        """Send a request; returns once the status line and headers are in. Raises UpstreamRefused when no
        connection could be made, UpstreamHeadTimeout when no head came within `head_timeout_s` (from the
        first try), UpstreamError when the engine failed before answering. With `body_in_time` the first
        body bytes are due within `head_timeout_s` too (a stream's head comes as soon as the engine takes
        the request, its first event only once the engine works on it): the response's read then fails
        with UpstreamHeadTimeout."""
        head = (
            f"{method} {endpoint.path}{path} HTTP/1.1\r\nHost: {endpoint.authority}\r\n"
            f"Content-Length: {len(body)}\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
        )
        request = head.encode("latin-1") + body
        deadline = self.loop.time() + head_timeout_s if head_timeout_s is not None else None
        # A pooled connection the engine closed just now fails before any byte comes back: the engine
        # never saw the request, so it is sent once more on a new connection.
        for attempt in range(2):
            conn = self._take(endpoint.key) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(endpoint)
            response = Response(conn)
            conn.start(request, response)
            self._arm_timer(response)
            head_timer = self._arm_head_timer(response, deadline, head_timeout_s) if deadline is not None else None
            try:
                await self._headers(response)
                if body_in_time and head_timer is not None and not response.complete and not response._chunks:
                    response._first_timer, head_timer = head_timer, None
                return response
            except UpstreamHeadTimeout:
                response.close()
                raise
            except UpstreamError:
                response.close()
                if reused and not conn.received_any and attempt == 0:
                    continue
                raise
            except BaseException:
                response.close()
                raise
            finally:
                if head_timer is not None:
                    head_timer.cancel()
        raise AssertionError("unreachable")

    async def get(
        self, endpoint: Endpoint, path: str, *, headers: tuple[str, ...] = (), timeout_s: float
    ) -> tuple[int, bytes] | None:
        """A small GET (a health probe, a metrics scrape), its head and then its body each within
        `timeout_s`: (status, body), or None when the engine could not be reached or did not answer in time."""
        try:
            response = await self.request(endpoint, "GET", path, headers=headers, head_timeout_s=timeout_s)
        except UpstreamError:
            return None
        try:
            return response.status, await asyncio.wait_for(response.read(), timeout_s)
        except (UpstreamError, TimeoutError):
            return None
        finally:
            response.close()

    def _arm_head_timer(self, response: Response, deadline: float, timeout_s: float | None) -> asyncio.TimerHandle:
        def expire() -> None:
            response._first_timer = None
            if response.status == 0 or not (response.complete or response._chunks or response._buffered):
                what = "response head" if response.status == 0 else "answer (only its head)"
                response._fail(UpstreamHeadTimeout(f"no {what} from the engine within {timeout_s:g} s"))
                conn = response._conn
                response._conn = None
                if conn is not None:
                    conn.abort()

        return self.loop.call_at(deadline, expire)

    async def _headers(self, response: Response) -> None:
        while response.status == 0:
            if response._error is not None:
                raise response._error
            if response.complete:
                break
            await response._wait()

    def _arm_timer(self, response: Response) -> None:
        loop = self.loop
        response._last_data = loop.time()
        timeout = self.read_timeout_s

        def check() -> None:
            idle = loop.time() - response._last_data
            if response.complete or response._conn is None:
                return
            if idle >= timeout:
                response._fail(UpstreamTimeout(f"no data from the engine for {timeout:g} s"))
                conn = response._conn
                response._conn = None
                conn.abort()
            else:
                response._timer = loop.call_later(timeout - idle, check)

        response._timer = loop.call_later(timeout, check)

    async def _connect(self, endpoint: Endpoint) -> _Connection:
        loop = self.loop
        ssl_context = None
        if endpoint.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            ssl_context = self._tls
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, endpoint.key), endpoint.host, endpoint.port, ssl=ssl_context,
                    server_hostname=endpoint.host if ssl_context else None,
                ),
                timeout=self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamRefused(f"{endpoint.authority}: {exc or type(exc).__name__}") from exc
        return protocol

    def _take(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            conn.abort()
            return
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.abort()
        self._idle.clear()
