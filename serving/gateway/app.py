"""The gateway's ASGI app.

Per request: authenticate against the in-memory key set, pick an arm (sticky) and a replica (fewest
outstanding, session affinity), proxy to the engine over one shared keep-alive client, pass the stream
through event by event while measuring it, and leave a request record in the buffer. Everything that
touches the database (route table polls, record batches, shadow hand-offs) runs in threads of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from serving.gateway import metrics
from serving.gateway.errors import (
    GatewayError,
    bad_request,
    no_engine,
    too_large,
    unauthorized,
    unknown_model,
    upstream_failed,
)
from serving.gateway.meter import StreamMeter, body_measure, tpot_ms, usage_tokens
from serving.gateway.records import DatabaseDown, RecordBuffer, RecordDraft, records_write
from serving.gateway.routing import (
    BASELINE,
    CANDIDATE,
    AliasRoute,
    ArmRoute,
    Replica,
    RouteRows,
    RouteTable,
    arm_choose,
    replica_choose,
    route_table_build,
    session_of,
)
from serving.gateway.upstream import Response, UpstreamError, UpstreamPool, UpstreamRefused
from serving.hashing import session_hash, session_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger(__name__)

CHAT = "chat.completions"
COMPLETIONS = "completions"

OK = "ok"
ENGINE_ERROR = "engine_error"
CLIENT_ERROR = "client_error"
CANCELLED = "cancelled"
NO_ENGINE = "no_engine"

_JSON = b"application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


@dataclass
class GatewayConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    route_poll_s: float = 0.25
    record_buffer: int = 20000
    record_batch: int = 500
    record_flush_s: float = 0.5
    shadow_max_pending: int = 64
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    startup_timeout_s: float = 30.0
    secret: bytes = b""

    @classmethod
    def from_settings(cls) -> GatewayConfig:
        from django.conf import settings

        return cls(
            max_body_bytes=settings.GATEWAY_MAX_BODY_BYTES,
            route_poll_s=settings.GATEWAY_ROUTE_POLL_S,
            record_buffer=settings.GATEWAY_RECORD_BUFFER,
            record_batch=settings.GATEWAY_RECORD_BATCH,
            record_flush_s=settings.GATEWAY_RECORD_FLUSH_S,
            shadow_max_pending=settings.GATEWAY_SHADOW_MAX_PENDING,
            connect_timeout_s=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S,
            read_timeout_s=settings.GATEWAY_UPSTREAM_READ_TIMEOUT_S,
            secret=session_key(settings.SECRET_KEY),
        )


class _Refused(Exception):
    """The engine could not be reached: nothing was sent, so another replica or arm may take the request."""


class _Exchange:
    """What one request did, for its record; mutated as the request goes along."""

    __slots__ = (
        "arm", "client_usage", "collect", "completion_tokens", "created_at", "disconnected", "e2e_ms", "error_kind",
        "failover", "finished", "outcome", "output_text", "prompt_tokens", "replica", "status", "ttft_ms",
        "version_id", "version_label",
    )

    def __init__(self) -> None:
        self.arm = BASELINE
        self.version_id: int | None = None
        self.version_label = ""
        self.replica: Replica | None = None
        self.failover = False
        self.created_at: datetime | None = None
        self.status = 0
        self.outcome = OK
        self.error_kind = ""
        self.ttft_ms: float | None = None
        self.e2e_ms: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.output_text = ""
        self.collect = False
        self.client_usage = False
        self.finished = False
        self.disconnected = False


class Gateway:
    """The ASGI app. Standalone it answers lifespan itself; mounted, the router calls startup/shutdown."""

    def __init__(
        self,
        config: GatewayConfig | None = None,
        *,
        rows_loader: Callable[[], RouteRows] | None = None,
        version_reader: Callable[[], tuple[int, str]] | None = None,
        records_writer: Callable[[list[RecordDraft]], int] | None = None,
        shadow_enqueue: Callable[[dict[str, Any]], None] | None = None,
        standalone: bool = False,
    ) -> None:
        self.config = config or GatewayConfig.from_settings()
        self.standalone = standalone
        self.table = RouteTable()
        self.records = RecordBuffer(self.config.record_buffer, on_drop=metrics.records_dropped_total.inc)
        self._rows_loader = rows_loader
        self._version_reader = version_reader
        self._records_writer = records_writer or records_write
        self._shadow_enqueue = shadow_enqueue or _celery_enqueue
        self._pool: UpstreamPool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._routes_executor: ThreadPoolExecutor | None = None
        self._records_executor: ThreadPoolExecutor | None = None
        self._shadow_executor: ThreadPoolExecutor | None = None
        self.shadow: Any = None
        self._flush_wakeup: asyncio.Event | None = None
        self._rng = random.Random()

    # --- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        from serving.gateway.shadow import ShadowQueue

        config = self.config
        # One thread each: a slow record batch (a locked SQLite file waits up to its busy timeout) must
        # never delay a route change, and each thread keeps one database connection.
        self._routes_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-routes")
        self._records_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-records")
        self._shadow_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-shadow")
        self.shadow = ShadowQueue(
            max_pending=config.shadow_max_pending, executor=self._shadow_executor, enqueue=self._shadow_enqueue
        )
        self._pool = UpstreamPool(connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s)
        self._flush_wakeup = asyncio.Event()
        # The table is built before the first request is accepted: a gateway never routes on nothing.
        deadline = time.monotonic() + config.startup_timeout_s
        while True:
            try:
                await self._reload()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                log.warning("route table not loaded yet; retrying", exc_info=True)
                await asyncio.sleep(0.5)
        self._tasks = [
            asyncio.create_task(self._poll_routes(), name="gateway-route-poll"),
            asyncio.create_task(self._flush_records(), name="gateway-record-flush"),
        ]

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        # Whatever is buffered gets one last chance to reach the database.
        deadline = time.monotonic() + 10.0
        while len(self.records) and time.monotonic() < deadline:
            if not await self._flush_once():
                break
        if len(self.records):
            log.warning("%d request records not written at shutdown", len(self.records))
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        for executor in (self._routes_executor, self._records_executor, self._shadow_executor):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=False)

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._routes_executor, self._load_rows)
        self.table = route_table_build(rows, self.table)
        metrics.route_generation.set(self.table.generation)
        metrics.route_reloads_total.inc()

    def _load_rows(self) -> RouteRows:
        if self._rows_loader is not None:
            return self._rows_loader()
        from serving.gateway.table import route_rows_load

        return route_rows_load()

    def _read_version(self) -> tuple[int, str]:
        if self._version_reader is not None:
            return self._version_reader()
        from serving.gateway.table import route_version_read

        return route_version_read()

    async def _poll_routes(self) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            await asyncio.sleep(self.config.route_poll_s)
            try:
                version = await loop.run_in_executor(self._routes_executor, self._read_version)
                if version != self.table.version:
                    await self._reload()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.route_poll_failures_total.inc()
                if not failing:
                    log.warning("route table poll failed; keeping the table in use", exc_info=True)
                failing = True

    async def _flush_records(self) -> None:
        assert self._flush_wakeup is not None
        backoff = self.config.record_flush_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wakeup.wait(), timeout=backoff)
            self._flush_wakeup.clear()
            while len(self.records):
                if not await self._flush_once():
                    # The database is down: keep the records, try again later, a little less often.
                    backoff = min(backoff * 2, 5.0)
                    break
            else:
                backoff = self.config.record_flush_s

    async def _flush_once(self) -> bool:
        batch = self.records.take(self.config.record_batch)
        if not batch:
            return True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._records_executor, self._records_writer, batch)
        try:
            await asyncio.wait([future])  # a cancel (shutdown) ends the wait, never the write
        except asyncio.CancelledError:
            # Stopped mid-write (shutdown): the batch's fate is settled before this task ends. Cancelling
            # the write itself could drop a batch whose thread had not started yet, with nobody to know.
            await asyncio.wait([future])
            self._batch_settle(batch, future)
            raise
        return self._batch_settle(batch, future)

    def _batch_settle(self, batch: list[RecordDraft], future: asyncio.Future[int]) -> bool:
        """Count a written batch, or put a failed one back for the next try; True when it was written."""
        error = future.exception()
        if error is None:
            metrics.records_written_total.inc(future.result())
            metrics.records_buffered.set(len(self.records))
            return True
        metrics.record_write_failures_total.inc()
        if not isinstance(error, DatabaseDown):
            log.error("writing request records failed", exc_info=error)
        self.records.put_back(batch)
        metrics.records_buffered.set(len(self.records))
        return False

    def _record(self, draft: RecordDraft) -> None:
        self.records.add(draft)
        size = len(self.records)
        metrics.records_buffered.set(size)
        if size >= self.config.record_batch and self._flush_wakeup is not None:
            self._flush_wakeup.set()

    # --- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            method = scope["method"]
            if path == "/v1/chat/completions":
                if method == "POST":
                    await self._proxy(scope, receive, send, CHAT)
                    return
            elif path == "/v1/completions":
                if method == "POST":
                    await self._proxy(scope, receive, send, COMPLETIONS)
                    return
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                if method == "GET":
                    await self._models(scope, send, path[len("/v1/models/"):] if path != "/v1/models" else None)
                    return
            elif self.standalone and path in ("/metrics", "/healthz"):
                await self._operations(path, send)
                return
            else:
                await _send_error(send, GatewayError(404, f"No route {path}.", code="not_found"))
                return
            await _send_error(send, GatewayError(405, f"{method} is not allowed on {path}.", code="method_not_allowed"))
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _operations(self, path: str, send: Send) -> None:
        if path == "/healthz":
            await _send_json(send, 200, b'{"status": "ok"}')
            return
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        body = generate_latest(REGISTRY)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _authenticate(self, scope: Scope) -> str:
        """The key's hash; raises 401."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer" or not token.strip():
                    raise unauthorized()
                digest = hashlib.sha256(token.strip()).hexdigest()
                if digest not in self.table.keys:
                    raise unauthorized("Incorrect gateway key provided.")
                return digest
        raise unauthorized()

    async def _models(self, scope: Scope, send: Send, one: str | None) -> None:
        try:
            digest = self._authenticate(scope)
        except GatewayError as exc:
            metrics.rejected_total.labels(str(exc.status)).inc()
            await _send_error(send, exc)
            return
        names = self.table.aliases_for_key(digest)
        created = int(time.time())
        if one is not None:
            if one not in names:
                await _send_error(send, unknown_model(one))
                return
            await _send_json(send, 200, json.dumps({"id": one, "object": "model", "created": created, "owned_by": "ramp"}).encode())
            return
        data = [{"id": name, "object": "model", "created": created, "owned_by": "ramp"} for name in names]
        await _send_json(send, 200, json.dumps({"object": "list", "data": data}).encode())

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        raise too_large(limit)
                except ValueError:
                    raise bad_request("Content-Length is not a number.", param=None) from None
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        try:
            key_hash = self._authenticate(scope)
            raw = await self._read_body(scope, receive)
            body = _parse_body(raw, endpoint)
            model = body["model"]
            route = self.table.aliases.get(model)
            if route is None:
                raise unknown_model(model)
            allowed = self.table.keys.get(key_hash)
            if allowed is not None and model not in allowed:
                raise unknown_model(model)
        except GatewayError as exc:
            metrics.rejected_total.labels(str(exc.status)).inc()
            await _send_error(send, exc)
            return
        except asyncio.CancelledError:
            return

        session_header = None
        for name, value in scope["headers"]:
            if name == b"x-session-id":
                session_header = value.decode("latin-1")
                break
        session = session_of(body.get("user"), session_header)
        request_id = os.urandom(12).hex()
        ex = _Exchange()
        ex.arm = arm_choose(route, session, rng=self._rng)
        stream = body.get("stream") is True
        if stream:
            options = body.get("stream_options")
            ex.client_usage = isinstance(options, dict) and options.get("include_usage") is True
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        shadow = (
            route.candidate is not None and route.shadow_rate > 0.0 and self._rng.random() < route.shadow_rate
        )
        ex.collect = route.store_prompts or shadow

        # The client going away cancels this task, and with it the upstream request.
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task, ex))

        async def send_marking_the_end(message: Message) -> None:
            # Once the last body message is handed over, uvicorn answers every receive() with a disconnect:
            # the exchange is finished then, not cancelled.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ex.finished = True
            await send(message)

        try:
            await self._attempt(route, ex, body, stream, session, request_id, endpoint, send_marking_the_end)
        except asyncio.CancelledError:
            if not ex.disconnected:
                raise
            task.uncancel()
            ex.outcome = CANCELLED
            ex.error_kind = "client_disconnected"
            if not ex.status:
                ex.status = 499
        except Exception:
            # A bug of ours: say so in OpenAI's shape if nothing was sent yet (every path sets the
            # status before its first send), and still record the request.
            log.exception("gateway failure on request %s", request_id)
            ex.outcome, ex.error_kind = ENGINE_ERROR, "gateway_error"
            if not ex.status:
                ex.status = 500
                await _send_error(send, GatewayError(500, "The gateway failed on this request.", code="gateway_error"),
                                  _arm_headers(ex, request_id))
        finally:
            ex.finished = True
            watcher.cancel()

        self._finish(route, ex, body, stream, session, request_id, endpoint, shadow and ex.arm == BASELINE)

    async def _attempt(
        self, route: AliasRoute, ex: _Exchange, body: dict[str, Any], stream: bool, session: str | None,
        request_id: str, endpoint: str, send: Send,
    ) -> None:
        """Send to the chosen arm; fail over to the other arm only before any byte reached the client."""
        arms = [ex.arm]
        if ex.arm == CANDIDATE:
            arms.append(BASELINE)
        elif route.failover_to_candidate and route.candidate is not None:
            arms.append(CANDIDATE)
        refused: list[str] = []
        for position, arm_name in enumerate(arms):
            arm = route.arm(arm_name)
            if arm is None:
                continue
            ex.arm = arm_name
            ex.version_id = arm.version.id
            ex.version_label = arm.version.label
            ex.failover = position > 0
            tried: set[int] = set()
            while True:
                now = time.monotonic()
                replica = replica_choose(tuple(r for r in arm.replicas if r.id not in tried), session, now)
                if replica is None:
                    refused.append(f"{arm_name} {arm.version.label}: no ready engine" if not tried else
                                   f"{arm_name} {arm.version.label}: engines refused the connection")
                    break
                tried.add(replica.id)
                try:
                    await self._forward(arm, replica, ex, body, stream, request_id, endpoint, send)
                    return
                except _Refused as exc:
                    replica.refused(time.monotonic())
                    log.warning("engine %s refused %s: %s", replica.id, request_id, exc)
        ex.status = 503
        ex.outcome = NO_ENGINE
        ex.error_kind = "no_engine"
        hint = "" if route.failover_to_candidate or ex.arm == CANDIDATE else " (failover to the candidate is off for this alias)"
        error = no_engine(f"No healthy engine for '{route.name}': {'; '.join(refused)}{hint}.")
        await _send_error(send, error, _arm_headers(ex, request_id))

    async def _forward(
        self, arm: ArmRoute, replica: Replica, ex: _Exchange, body: dict[str, Any], stream: bool, request_id: str,
        endpoint: str, send: Send,
    ) -> None:
        pool = self._pool
        assert pool is not None
        body["model"] = arm.version.served_model_name
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        path = "/v1/chat/completions" if endpoint == CHAT else "/v1/completions"
        ex.replica = replica
        replica.outstanding += 1
        try:
            sent = time.perf_counter()
            ex.created_at = datetime.now(UTC)
            try:
                response = await pool.request(
                    replica.endpoint, "POST", path, body=payload, headers=(*replica.headers, f"X-Request-Id: {request_id}")
                )
            except UpstreamRefused as exc:
                raise _Refused(str(exc)) from exc
            except UpstreamError as exc:
                ex.status, ex.outcome, ex.error_kind = 502, ENGINE_ERROR, _kind(exc)
                await _send_error(send, upstream_failed(f"The engine failed before answering: {exc}."),
                                  _arm_headers(ex, request_id))
                return
            try:
                if response.status != 200 or not stream:
                    await self._forward_whole(response, ex, sent, request_id, send)
                else:
                    await self._forward_stream(response, ex, sent, request_id, send)
            finally:
                response.close()
        finally:
            replica.outstanding -= 1

    async def _forward_whole(
        self, response: Response, ex: _Exchange, sent: float, request_id: str, send: Send
    ) -> None:
        try:
            content = await response.read()
        except UpstreamError as exc:
            ex.status, ex.outcome, ex.error_kind = 502, ENGINE_ERROR, _kind(exc)
            await _send_error(send, upstream_failed(f"The engine's answer broke off: {_kind(exc)}."),
                              _arm_headers(ex, request_id))
            return
        ex.e2e_ms = (time.perf_counter() - sent) * 1000.0
        status = response.status
        if status >= 500:
            ex.status, ex.outcome, ex.error_kind = 502, ENGINE_ERROR, f"http_{status}"
            detail = content[:300].decode("utf-8", "replace")
            await _send_error(send, upstream_failed(f"The engine answered {status}: {detail}"), _arm_headers(ex, request_id))
            return
        ex.status = status
        if status >= 400:
            ex.outcome, ex.error_kind = CLIENT_ERROR, f"http_{status}"
        else:
            usage, text = body_measure(content)
            ex.prompt_tokens, ex.completion_tokens = usage_tokens(usage)
            if ex.collect:
                ex.output_text = text
        content_type = response.headers.get(b"content-type", _JSON)
        headers = [(b"content-type", content_type), (b"content-length", str(len(content)).encode()),
                   *_arm_headers(ex, request_id)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _forward_stream(
        self, response: Response, ex: _Exchange, sent: float, request_id: str, send: Send
    ) -> None:
        meter = StreamMeter(sent_at=sent, strip_usage=not ex.client_usage, collect_text=ex.collect)
        ex.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *_arm_headers(ex, request_id)]})
        perf = time.perf_counter
        try:
            async for chunk in response.chunks():
                out = meter.feed(chunk, perf())
                if out:
                    if meter.done_at is not None:
                        # This hands the client `[DONE]`: it has the whole answer, and a client (the openai
                        # SDK among them) may hang up now, before the stream's last empty chunk.
                        ex.finished = True
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = meter.finish(perf())
        except UpstreamError as exc:
            # Bytes already reached the client: the error goes in the stream, as OpenAI sends it.
            ex.outcome, ex.error_kind = ENGINE_ERROR, _kind(exc)
            event = {"error": {"message": f"The engine failed mid-stream: {_kind(exc)}.", "type": "server_error",
                               "param": None, "code": "upstream_error"}}
            tail = b"data: " + json.dumps(event).encode() + b"\n\n"
        _settle_stream(ex, meter)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _finish(
        self, route: AliasRoute, ex: _Exchange, body: dict[str, Any], stream: bool, session: str | None,
        request_id: str, endpoint: str, shadow: bool,
    ) -> None:
        metrics.requests_total.labels(route.name, ex.arm, ex.outcome).inc()
        if ex.failover:
            metrics.failovers_total.labels(route.name).inc()
        prompt = _prompt_text(body, endpoint)
        store = route.store_prompts
        if store:
            from serving.redaction import redact

            prompt_text, output_text = redact(prompt), redact(ex.output_text)
        else:
            prompt_text = output_text = ""
        ttft, e2e = ex.ttft_ms, ex.e2e_ms
        self._record(RecordDraft(
            request_id=request_id,
            created_at=ex.created_at or datetime.now(UTC),
            alias=route.name,
            rollout_id=route.rollout_id,
            arm=ex.arm,
            model_version_id=ex.version_id,
            engine_worker_id=ex.replica.id if ex.replica is not None else None,
            endpoint=endpoint,
            stream=stream,
            session_hash=self._session_hash(session),
            prompt_hash=hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest(),
            prompt_chars=len(prompt),
            status_code=ex.status,
            outcome=ex.outcome,
            error_kind=ex.error_kind,
            failover=ex.failover,
            ttft_ms=ttft,
            tpot_ms=tpot_ms(ttft, e2e, ex.completion_tokens),
            e2e_ms=e2e,
            prompt_tokens=ex.prompt_tokens,
            completion_tokens=ex.completion_tokens,
            prompt_text=prompt_text,
            output_text=output_text,
        ))
        if shadow and ex.outcome == OK and route.candidate is not None and self.shadow is not None:
            client_body = dict(body)
            client_body.pop("stream_options", None)
            client_body["model"] = route.name
            self.shadow.offer({
                "request_id": request_id,
                "created_at": (ex.created_at or datetime.now(UTC)).isoformat(),
                "alias": route.name,
                "rollout_id": route.rollout_id,
                "endpoint": endpoint,
                "body": client_body,
                "baseline_version_id": route.baseline.version.id,
                "candidate_version_id": route.candidate.version.id,
                "prompt_text": prompt,
                "baseline_output": ex.output_text,
                "baseline_ttft_ms": ttft,
                "baseline_e2e_ms": e2e,
                "baseline_completion_tokens": ex.completion_tokens,
            })

    def _session_hash(self, session: str | None) -> str:
        if session is None:
            return ""
        return session_hash(session, key=self.config.secret)


def _settle_stream(ex: _Exchange, meter: StreamMeter) -> None:
    sent = meter.sent_at
    if meter.first_token_at is not None:
        ex.ttft_ms = (meter.first_token_at - sent) * 1000.0
    end = meter.done_at if meter.done_at is not None else time.perf_counter()
    ex.e2e_ms = (end - sent) * 1000.0
    ex.prompt_tokens, ex.completion_tokens = meter.prompt_tokens, meter.completion_tokens
    if ex.collect:
        ex.output_text = meter.text
    if ex.outcome != OK:
        return
    if meter.error is not None:
        ex.outcome, ex.error_kind = ENGINE_ERROR, "stream_error"
    elif meter.done_at is None:
        ex.outcome, ex.error_kind = ENGINE_ERROR, "stream_cut"


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], ex: _Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not ex.finished:
                ex.disconnected = True
                task.cancel()
            return


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


def _arm_headers(ex: _Exchange, request_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-rollout-arm", ex.arm.encode()),
        (b"x-model-version", ex.version_label.encode()),
        (b"x-request-id", request_id.encode()),
    ]


async def _send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: GatewayError, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send_json(send, error.status, error.body(), extra)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_body(raw: bytes, endpoint: str) -> dict[str, Any]:
    """The request's JSON, checked as far as routing needs; the engine validates the rest."""
    if not raw:
        raise bad_request("The request body is empty; expected a JSON object.", param=None)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.", param=None) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", param=None) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", param=None)
    # JSON may escape half of a UTF-16 surrogate pair ("\ud800"): valid JSON, but no text, and the body
    # could not be encoded again for the engine (nor the prompt hashed). Only bodies with such an escape
    # pay for the check; escaped emoji are whole pairs and pass.
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise bad_request("The request body has an unpaired UTF-16 surrogate escape (\\ud800 to \\udfff) in a "
                              "string; that is not text.", param=None) from None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the public alias to call, as a string.", param="model")
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' is required: a non-empty list of messages.", param="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"messages[{index}] must be an object with a 'role'.", param=f"messages[{index}]")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise bad_request("'prompt' is required: a string or a non-empty list.", param="prompt")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            # Whether it fits the model's context is the engine's to say; a count of tokens is ours.
            raise bad_request(f"'{name}' must be a whole number of tokens, at least 1.", param=name)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be true or false.", param="stream")
    if "stream_options" in body and body["stream_options"] is not None and not isinstance(body["stream_options"], dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise bad_request("'user' must be a string.", param="user")
    return body


def _prompt_text(body: dict[str, Any], endpoint: str) -> str:
    if endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        return "\n".join(p if isinstance(p, str) else json.dumps(p) for p in prompt or ())
    parts = []
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        parts.append(f"{message.get('role')}: {content if isinstance(content, str) else ''}")
    return "\n".join(parts)


def _celery_enqueue(payload: dict[str, Any]) -> None:
    from serving.tasks import shadow_mirror

    shadow_mirror.apply_async(args=[payload])
