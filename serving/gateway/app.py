"""The gateway's ASGI app.

Per request: authenticate against the in-memory key set, admit it under the key's limits (`admission`),
pick an arm (sticky) and hand it to the `forward.Forwarder` (replicas, retries, failover, streaming), then
leave a request record per attempt with the `recorder.Recorder`. The route table comes from the
`route_keeper.RouteKeeper`; everything that touches the database or blocks (route polls, record batches,
shadow hand-offs, redaction of stored texts) runs in threads of its own.
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
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from config.log_context import request_id_var
from serving.gateway import metrics
from serving.gateway.admission import Limits, limits_for, refusal_error
from serving.gateway.assemble import needs_whole
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
from serving.gateway.recorder import Recorder
from serving.gateway.records import RecordDraft
from serving.gateway.replies import Message, Receive, Scope, Send, send_error, send_json
from serving.gateway.route_keeper import RouteKeeper
from serving.gateway.routing import BASELINE, KeyRoute, RouteRows, RouteTable, arm_choose, session_of
from serving.gateway.tracing import Tracing
from serving.gateway.upstream import UpstreamPool
from serving.hashing import session_hash

__all__ = ["Gateway", "GatewayConfig"]

log = logging.getLogger(__name__)

# The gateway started in this process, for the combined server's /readyz.
_RUNNING: Gateway | None = None

# How long a thread holding the GIL keeps it while another waits (Python's default: 5 ms). The event loop
# that relays every stream shares the process with threads that run Python for a while (the record writer's
# batches, route polls, and in the combined server Django's views): at the default, a stream's next event
# can wait up to 5 ms for the GIL behind one of them (benchmarks/README.md, "Gateway").
GIL_SWITCH_INTERVAL_S = 0.0005


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
        self.routes = RouteKeeper(self.config, rows_loader=rows_loader, version_reader=version_reader)
        self.recorder = Recorder(self.config, writer=records_writer)
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
        self._shadow_executor: ThreadPoolExecutor | None = None
        self.shadow: Any = None
        self._rng = random.Random()
        self._request_id_key = os.urandom(32)
        self._request_count = itertools.count()
        # The switch interval this gateway's start-up lowered, put back at its shutdown (tests start many).
        self._switch_interval: float | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        global _RUNNING
        from serving.gateway.queues import QueueWatcher
        from serving.gateway.shadow import ShadowQueue

        config = self.config
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._shadow_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-shadow")
        self.shadow = ShadowQueue(
            max_pending=config.shadow_max_pending, executor=self._shadow_executor, enqueue=self._shadow_enqueue
        )
        self.recorder.start()
        self._pool = UpstreamPool(connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s)
        self.forwarder = Forwarder(pool=self._pool, config=config, outliers=self.outliers, tracing=self.tracing)
        self.limits = limits_for(config.limits_redis_url)
        await self.limits.start()
        await self.routes.start()
        probe = OutlierProbe(policy=self.outliers, pool=self._pool, replicas=lambda: self.table.replicas,
                             timeout_s=min(config.ttfb_timeout_s, 5.0))
        self._tasks = [
            asyncio.create_task(self.routes.poll(), name="gateway-route-poll"),
            asyncio.create_task(self.recorder.run(), name="gateway-record-flush"),
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
        await self.recorder.close()
        if self.limits is not None:
            await self.limits.stop()
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        self.routes.close()
        if self._shadow_executor is not None:
            self._shadow_executor.shutdown(wait=True, cancel_futures=False)
        self.tracing.shutdown()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        if _RUNNING is self:
            _RUNNING = None
        metrics_process_exit()

    @property
    def table(self) -> RouteTable:
        return self.routes.table

    def routes_status(self) -> dict[str, Any]:
        return self.routes.status()

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
        # A non-streamed answer is asked of the engine as a stream, so that its first event can be timed.
        ex.assemble = not stream and not needs_whole(body)
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
            self.recorder.add_with_texts(drafts, prompt, last.output_text)
        else:
            for draft in drafts:
                self.recorder.add(draft)
        if shadow and last.outcome == OK and last.arm == BASELINE and not last.failover and route.candidate is not None:
            client_body = dict(ex.body)
            client_body.pop("stream_options", None)
            client_body["model"] = route.name
            self.shadow.offer({
                "request_id": ex.request_id,
                "created_at": attempts[0].created_at.isoformat(),
                "alias": route.name,
                "rollout_id": route.rollout_id,
                "session_hash": session,
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

    def _session_hash(self, session: str | None) -> str:
        if session is None:
            return ""
        return session_hash(session, key=self.config.secret)

    def _celery_enqueue(self, payload: dict[str, Any]) -> None:
        from serving.gateway.shadow import shadow_enqueue

        shadow_enqueue(payload, expires_s=self.config.shadow_expires_s)


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], ex: Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not ex.finished:
                ex.disconnected = True
                task.cancel()
            return

