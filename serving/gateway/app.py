"""The gateway's ASGI app.

Per request: authenticate against the in-memory key set, admit it under the key's limits (`admission`),
pick an arm (sticky) and hand it to the `forward.Forwarder` (replicas, retries, failover, streaming), then
leave a request record per attempt in the buffer. Everything that touches the database (route table
polls, record batches, shadow hand-offs, redaction of stored texts) runs in threads of its own; the route
table survives a database outage on its last-known-good copy on disk (`lastgood`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from config.log_context import request_id_var
from serving.gateway import metrics
from serving.gateway.admission import Limits, limits_for, refusal_error
from serving.gateway.config import GatewayConfig
from serving.gateway.errors import (
    GatewayError,
    RateLimited,
    bad_request,
    too_large,
    unauthorized,
    unknown_model,
)
from serving.gateway.forward import CANCELLED, ENGINE_ERROR, OK, Exchange, Forwarder
from serving.gateway.meter import tpot_ms
from serving.gateway.outliers import OutlierPolicy, OutlierProbe
from serving.gateway.parsing import CHAT, COMPLETIONS, body_parse, prefix_key, prompt_text
from serving.gateway.records import DatabaseDown, RecordBuffer, RecordDraft, records_write
from serving.gateway.replies import Message, Receive, Scope, Send, send_error, send_json
from serving.gateway.routing import (
    BASELINE,
    KeyRoute,
    RouteRows,
    RouteTable,
    arm_choose,
    route_table_build,
    session_of,
)
from serving.gateway.tracing import Tracing
from serving.gateway.upstream import UpstreamPool
from serving.hashing import session_hash

__all__ = ["Gateway", "GatewayConfig"]

log = logging.getLogger(__name__)

# Stored texts waiting for the redaction thread; past this a record is written without them (counted).
TEXTS_MAX_PENDING = 256

# The gateway started in this process, for the combined server's /readyz.
_RUNNING: Gateway | None = None


def gateway_running() -> Gateway | None:
    return _RUNNING


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
        self._shadow_enqueue = shadow_enqueue or self._celery_enqueue
        self._pool: UpstreamPool | None = None
        self.forwarder: Forwarder | None = None
        self.limits: Limits | None = None
        self.tracing = Tracing.from_environment()
        self.outliers = OutlierPolicy(
            eject_after=self.config.eject_after, base_s=self.config.eject_base_s, max_s=self.config.eject_max_s
        )
        self._latency = metrics.LatencyObserver()
        self._tasks: list[asyncio.Task[None]] = []
        self._routes_executor: ThreadPoolExecutor | None = None
        self._records_executor: ThreadPoolExecutor | None = None
        self._shadow_executor: ThreadPoolExecutor | None = None
        self._texts_executor: ThreadPoolExecutor | None = None
        self._texts_pending: set[asyncio.Future[tuple[str, str]]] = set()
        self.shadow: Any = None
        self._flush_wakeup: asyncio.Event | None = None
        self._rng = random.Random()
        self._request_id_key = os.urandom(32)
        self._request_count = itertools.count()
        # Where the table in use came from, and what the database said last.
        self.routes_source = "none"  # database | disk
        self.database_error = ""
        self.database_down_since: float | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        global _RUNNING
        from serving.gateway.queues import QueueWatcher
        from serving.gateway.shadow import ShadowQueue

        config = self.config
        # One thread each: a slow record batch (a locked SQLite file waits up to its busy timeout) must
        # never delay a route change, and each thread keeps one database connection.
        self._routes_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-routes")
        self._records_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-records")
        self._shadow_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-shadow")
        # Redaction is pure CPU on regexes (18-25 ms per 100 KB): off the event loop, where it would stall
        # every stream in the process.
        self._texts_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-redact")
        self.shadow = ShadowQueue(
            max_pending=config.shadow_max_pending, executor=self._shadow_executor, enqueue=self._shadow_enqueue
        )
        self._pool = UpstreamPool(connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s)
        self.forwarder = Forwarder(pool=self._pool, config=config, outliers=self.outliers, tracing=self.tracing)
        self.limits = limits_for(config.limits_redis_url)
        await self.limits.start()
        self._flush_wakeup = asyncio.Event()
        # The table is built before the first request is accepted: a gateway never routes on nothing.
        await self._routes_first_load()
        probe = OutlierProbe(policy=self.outliers, pool=self._pool, replicas=lambda: self.table.replicas,
                             timeout_s=min(config.ttfb_timeout_s, 5.0))
        self._tasks = [
            asyncio.create_task(self._poll_routes(), name="gateway-route-poll"),
            asyncio.create_task(self._flush_records(), name="gateway-record-flush"),
            asyncio.create_task(probe.run(), name="gateway-outlier-probe"),
        ]
        if config.max_queued_per_replica:
            watcher = QueueWatcher(pool=self._pool, replicas=lambda: self.table.replicas,
                                   interval_s=config.queue_poll_s)
            self._tasks.append(asyncio.create_task(watcher.run(), name="gateway-engine-queues"))
        _RUNNING = self

    async def shutdown(self) -> None:
        global _RUNNING
        from config.metrics import metrics_process_exit

        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._texts_pending:
            await asyncio.wait(list(self._texts_pending), timeout=10.0)
        # Whatever is buffered gets one last chance to reach the database.
        deadline = time.monotonic() + 10.0
        while len(self.records) and time.monotonic() < deadline:
            if not await self._flush_once():
                break
        if len(self.records):
            log.warning("%d request records not written at shutdown", len(self.records))
        if self.limits is not None:
            await self.limits.stop()
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        for executor in (self._routes_executor, self._records_executor, self._shadow_executor, self._texts_executor):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=False)
        self.tracing.shutdown()
        if _RUNNING is self:
            _RUNNING = None
        metrics_process_exit()

    async def _routes_first_load(self) -> None:
        """From the database; if it cannot be reached within a few seconds and a last-known-good copy is on
        disk, from that (the poll switches back to the database as soon as it answers)."""
        config = self.config
        cache = config.routes_cache
        start = time.monotonic()
        has_cache = cache is not None and cache.exists()
        database_deadline = start + (config.startup_database_wait_s if has_cache else config.startup_timeout_s)
        while True:
            try:
                await self._reload()
                return
            except Exception as exc:
                self._database_failed(exc)
                if time.monotonic() > database_deadline:
                    if has_cache and await self._routes_from_disk():
                        return
                    if time.monotonic() > start + config.startup_timeout_s:
                        raise
                log.warning("route table not loaded yet; retrying", exc_info=True)
                await asyncio.sleep(0.5)

    async def _routes_from_disk(self) -> bool:
        from serving.gateway.lastgood import route_rows_restore

        assert self.config.routes_cache is not None
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._routes_executor, route_rows_restore, self.config.routes_cache)
        if rows is None:
            return False
        self.table = route_table_build(rows, self.table)
        self.routes_source = "disk"
        metrics.routes_from_disk.set(1)
        metrics.route_generation.set(self.table.generation)
        log.warning("the database is unreachable (%s); serving the last-known-good route table from %s "
                    "(generation %d)", self.database_error, self.config.routes_cache, self.table.generation)
        return True

    def _database_failed(self, exc: BaseException) -> None:
        self.database_error = f"{type(exc).__name__}: {exc}".strip()[:300]
        if self.database_down_since is None:
            self.database_down_since = time.time()

    def _database_answered(self) -> None:
        self.database_error = ""
        self.database_down_since = None
        if self.routes_source == "disk":
            log.info("the database answers again; routes come from it")
        self.routes_source = "database"
        metrics.routes_from_disk.set(0)

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._routes_executor, self._load_rows)
        self.table = route_table_build(rows, self.table)
        self._database_answered()
        metrics.route_generation.set(self.table.generation)
        metrics.route_reloads_total.inc()

    def _load_rows(self) -> RouteRows:
        if self._rows_loader is not None:
            return self._rows_loader()
        from serving.gateway.lastgood import route_rows_save
        from serving.gateway.table import route_rows_load

        rows = route_rows_load()
        cache = self.config.routes_cache
        if cache is not None:
            try:
                route_rows_save(rows, cache)
            except OSError:
                log.warning("the last-known-good route table could not be saved to %s", cache, exc_info=True)
        return rows

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
                else:
                    self._database_answered()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.route_poll_failures_total.inc()
                self._database_failed(exc)
                if not failing:
                    log.warning("route table poll failed; keeping the table in use", exc_info=True)
                failing = True

    def routes_status(self) -> dict[str, Any]:
        """What /readyz says about the routes: their source, generation, and the database as last seen."""
        status: dict[str, Any] = {"source": self.routes_source, "generation": self.table.generation}
        if self.database_error:
            since = datetime.fromtimestamp(self.database_down_since or time.time(), UTC)
            status["database"] = f"unreachable since {since.isoformat(timespec='seconds')}: {self.database_error}"
        else:
            status["database"] = "ok"
        return status

    # --- request records ------------------------------------------------------------------------

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
            elif self.standalone and path in ("/metrics", "/healthz", "/readyz"):
                await self._operations(path, send)
                return
            else:
                await send_error(send, GatewayError(404, f"No route {path}.", code="not_found"))
                return
            await send_error(send, GatewayError(405, f"{method} is not allowed on {path}.", code="method_not_allowed"))
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
            await send_json(send, 200, b'{"status": "ok"}')
            return
        if path == "/readyz":
            # Serving on routes from disk is still serving: ready, and saying why it is degraded.
            routes = self.routes_status()
            body = {"status": "ok" if routes["source"] == "database" else "degraded", "routes": routes}
            await send_json(send, 200, json.dumps(body).encode())
            return
        from config.metrics import metrics_exposition

        content, content_type = metrics_exposition()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    def _authenticate(self, scope: Scope) -> KeyRoute:
        """The key; raises 401."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer" or not token.strip():
                    raise unauthorized()
                key = self.table.keys.get(hashlib.sha256(token.strip()).hexdigest())
                if key is None:
                    raise unauthorized("Incorrect gateway key provided.")
                return key
        raise unauthorized()

    async def _models(self, scope: Scope, send: Send, one: str | None) -> None:
        try:
            key = self._authenticate(scope)
        except GatewayError as exc:
            metrics.rejected_total.labels(str(exc.status)).inc()
            await send_error(send, exc)
            return
        names = self.table.aliases_for_key(key.key_hash)
        created = int(time.time())
        if one is not None:
            if one not in names:
                await send_error(send, unknown_model(one))
                return
            await send_json(send, 200, json.dumps({"id": one, "object": "model", "created": created, "owned_by": "ramp"}).encode())
            return
        data = [{"id": name, "object": "model", "created": created, "owned_by": "ramp"} for name in names]
        await send_json(send, 200, json.dumps({"object": "list", "data": data}).encode())

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
            key = self._authenticate(scope)
            raw = await self._read_body(scope, receive)
            body = body_parse(raw, endpoint)
            model = body["model"]
            route = self.table.aliases.get(model)
            if route is None or not key.may_call(model):
                raise unknown_model(model)
        except GatewayError as exc:
            metrics.rejected_total.labels(str(exc.status)).inc()
            await send_error(send, exc)
            return
        except asyncio.CancelledError:
            return

        session_header = None
        trace_headers: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == b"x-session-id":
                session_header = value.decode("latin-1")
            elif name in (b"traceparent", b"tracestate"):
                trace_headers.append((name, value))
        session = session_of(body.get("user"), session_header)
        # Unguessable (a keyed hash of a counter: outcome events name requests by it) without a getrandom
        # call per request.
        request_id = hashlib.blake2b(next(self._request_count).to_bytes(8, "big"), key=self._request_id_key,
                                     digest_size=12).hexdigest()
        request_id_var.set(request_id)  # this task's log lines carry it

        if key.limited:
            assert self.limits is not None
            refusal = await self.limits.admit(key, request_id)
            if refusal is not None:
                metrics.rejected_total.labels("429").inc()
                metrics.throttled_total.labels(key.name, route.name, refusal.limit).inc()
                await send_error(send, refusal_error(key, refusal), [(b"x-request-id", request_id.encode())])
                return

        stream = body.get("stream") is True
        shadow = route.candidate is not None and route.shadow_rate > 0.0 and self._rng.random() < route.shadow_rate
        ex = Exchange(
            request_id=request_id, route=route, key=key, endpoint=endpoint, body=body, stream=stream,
            session=session,
            affinity=session if session is not None else prefix_key(body, endpoint) if self.config.prefix_affinity else None,
            assigned_arm=arm_choose(route, session, rng=self._rng), collect=route.store_prompts or shadow,
        )
        if stream:
            options = body.get("stream_options")
            ex.client_usage = isinstance(options, dict) and options.get("include_usage") is True
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        span = self.tracing.request_start(ex, trace_headers) if self.tracing.enabled else None
        if span is None:
            ex.upstream_headers = tuple(f"{n.decode()}: {v.decode('latin-1')}" for n, v in trace_headers)

        # The client going away cancels this task, and with it the upstream request.
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task, ex))
        responded = False

        async def send_marking_the_end(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.start":
                responded = True
            # Once the last body message is handed over, uvicorn answers every receive() with a disconnect:
            # the exchange is finished then, not cancelled.
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ex.finished = True
            await send(message)

        assert self.forwarder is not None
        try:
            await self.forwarder.run(ex, send_marking_the_end)
        except RateLimited as exc:
            # Every replica of the arm has a full queue: nothing was sent anywhere.
            metrics.rejected_total.labels("429").inc()
            await send_error(send_marking_the_end, exc, ex.reply_headers())
        except asyncio.CancelledError:
            if not ex.disconnected:
                raise
            task.uncancel()
            attempt = ex.current
            if attempt is not None and attempt.outcome == OK:
                attempt.outcome, attempt.error_kind = CANCELLED, "client_disconnected"
                attempt.status = attempt.status or 499
                if attempt.e2e_ms is None and ex.started is not None:
                    attempt.e2e_ms = (time.perf_counter() - ex.started) * 1000.0
        except Exception:
            # A bug of ours: say so in OpenAI's shape if nothing was sent yet, and still record the request.
            log.exception("gateway failure on request %s", request_id)
            attempt = ex.current
            if attempt is not None:
                attempt.outcome, attempt.error_kind = ENGINE_ERROR, "gateway_error"
                attempt.status = attempt.status or 500
            if not responded:
                await send_error(send, GatewayError(500, "The gateway failed on this request.", code="gateway_error"),
                                 ex.reply_headers())
        finally:
            ex.finished = True
            watcher.cancel()

        self._finish(ex, shadow)
        if span is not None:
            self.tracing.request_end(span, ex)

    def _finish(self, ex: Exchange, shadow: bool) -> None:
        route = ex.route
        key = ex.key
        attempts = ex.attempts
        last = attempts[-1] if attempts else None
        if key.limited:
            assert self.limits is not None
            used = 0 if last is None else (last.prompt_tokens or 0) + (last.completion_tokens or 0)
            self.limits.release(key, ex.request_id, used)
        if last is None:
            return  # refused before any try (a full engine queue)
        last.final = True
        metrics.requests_total.labels(route.name, last.arm, last.outcome).inc()
        if last.failover:
            metrics.failovers_total.labels(route.name).inc()
        tpot = tpot_ms(last.ttft_ms, last.e2e_ms, last.completion_tokens)
        if last.outcome == OK:
            self._latency.observe(route.name, last.arm, last.version_label, last.ttft_ms, tpot, last.e2e_ms)
        prompt = prompt_text(ex.body, ex.endpoint)
        prompt_hash = hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest()
        session = self._session_hash(ex.session)
        drafts = [
            RecordDraft(
                request_id=ex.request_id,
                attempt=attempt.number,
                final=attempt.final,
                created_at=attempt.created_at,
                alias=route.name,
                rollout_id=route.rollout_id,
                arm=attempt.arm,
                assigned_arm=ex.assigned_arm,
                model_version_id=attempt.version_id,
                engine_worker_id=attempt.replica.worker_id if attempt.replica is not None else None,
                endpoint=ex.endpoint,
                stream=ex.stream,
                session_hash=session,
                prompt_hash=prompt_hash,
                prompt_chars=len(prompt),
                status_code=attempt.status,
                outcome=attempt.outcome,
                error_kind=attempt.error_kind,
                failover=attempt.failover,
                ttft_ms=attempt.ttft_ms,
                tpot_ms=tpot_ms(attempt.ttft_ms, attempt.e2e_ms, attempt.completion_tokens),
                e2e_ms=attempt.e2e_ms,
                prompt_tokens=attempt.prompt_tokens,
                completion_tokens=attempt.completion_tokens,
            )
            for attempt in attempts
        ]
        if route.store_prompts:
            self._record_with_texts(drafts, prompt, last.output_text)
        else:
            for draft in drafts:
                self._record(draft)
        if shadow and last.outcome == OK and last.arm == BASELINE and not last.failover and route.candidate is not None:
            client_body = dict(ex.body)
            client_body.pop("stream_options", None)
            client_body["model"] = route.name
            self.shadow.offer({
                "request_id": ex.request_id,
                "created_at": attempts[0].created_at.isoformat(),
                "alias": route.name,
                "rollout_id": route.rollout_id,
                "endpoint": ex.endpoint,
                "body": client_body,
                "store_prompts": route.store_prompts,
                "baseline_version_id": route.baseline.version.id,
                "candidate_version_id": route.candidate.version.id,
                "prompt_text": prompt,
                "baseline_output": last.output_text,
                "baseline_ttft_ms": last.ttft_ms,
                "baseline_e2e_ms": last.e2e_ms,
                "baseline_completion_tokens": last.completion_tokens,
            })

    def _record_with_texts(self, drafts: list[RecordDraft], prompt: str, output: str) -> None:
        """Redact the stored texts in their own thread, then buffer the records (the final one holds them)."""
        if self._texts_executor is None or len(self._texts_pending) >= TEXTS_MAX_PENDING:
            metrics.texts_unstored_total.inc()
            for draft in drafts:
                self._record(draft)
            return
        future = asyncio.get_running_loop().run_in_executor(self._texts_executor, _texts_redact, prompt, output)
        self._texts_pending.add(future)

        def redacted(done: asyncio.Future[tuple[str, str]]) -> None:
            self._texts_pending.discard(done)
            if done.cancelled() or done.exception() is not None:
                metrics.texts_unstored_total.inc()
                log.error("redacting stored texts failed", exc_info=None if done.cancelled() else done.exception())
            else:
                drafts[-1].prompt_text, drafts[-1].output_text = done.result()
            for draft in drafts:
                self._record(draft)

        future.add_done_callback(redacted)

    def _session_hash(self, session: str | None) -> str:
        if session is None:
            return ""
        return session_hash(session, key=self.config.secret)

    def _celery_enqueue(self, payload: dict[str, Any]) -> None:
        from serving.gateway.shadow import shadow_enqueue

        shadow_enqueue(payload, expires_s=self.config.shadow_expires_s)


def _texts_redact(prompt: str, output: str) -> tuple[str, str]:
    from serving.redaction import redact_in_slices

    return redact_in_slices(prompt), redact_in_slices(output)


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], ex: Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not ex.finished:
                ex.disconnected = True
                task.cancel()
            return

