"""Sending a request to the engines: tries, retries, failover, and passing the answer through.

A request is tried on a replica of the arm its session was assigned to. Until a byte of the answer has
gone to the client, a refused connection, a reset, a 5xx or no first event within the TTFB timeout (a
stream's head comes as soon as the engine takes the request, its first event once the engine works on it;
a non-streamed request is asked of the engine as a stream too and assembled, `assemble.py`, so it is timed
the same way, however long its answer takes) is tried again on another replica of the same arm, then on the other arm where the plan allows (a candidate's
users always fall back to the baseline; the baseline's go to the candidate only with
`failover_to_candidate`), at most `max_attempts` tries in all. Once a byte has gone, never again: an error
then ends the stream with an error event, as OpenAI's API does.

Every try is an `Attempt`, and every attempt becomes a request record: a failed one against the arm and
replica that failed (its error kind, and in `e2e_ms` the time it cost), the one that answered against the
arm that answered, timed from the first try's send so the time lost before it is in its TTFT and E2E.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

from serving.gateway import metrics
from serving.gateway.assemble import Assembler
from serving.gateway.config import GatewayConfig
from serving.gateway.errors import GatewayError, RateLimited, no_engine, upstream_failed, upstream_timeout
from serving.gateway.meter import StreamMeter, body_measure, usage_tokens
from serving.gateway.outliers import OutlierPolicy
from serving.gateway.parsing import CHAT
from serving.gateway.replies import JSON, SSE_HEADERS, Headers, Send, send_error
from serving.gateway.routing import (
    BASELINE,
    CANDIDATE,
    AliasRoute,
    ArmRoute,
    KeyRoute,
    Replica,
    replica_choose,
)
from serving.gateway.tracing import Tracing
from serving.gateway.upstream import (
    Response,
    UpstreamError,
    UpstreamHeadTimeout,
    UpstreamPool,
    UpstreamRefused,
)

log = logging.getLogger(__name__)

OK = "ok"
ENGINE_ERROR = "engine_error"
CLIENT_ERROR = "client_error"
CANCELLED = "cancelled"
NO_ENGINE = "no_engine"

# What a failed try says in the final error, by its error kind.
_FAILURE_WORDS = {
    "connect_refused": "engines refused the connection",
    "ttfb_timeout": "no engine answered in time",
    "no_ready_engine": "no ready engine",
    "replicas_ejected": "every replica ejected after failing",
}


@dataclass(slots=True)
class Attempt:
    """One try of a request on one replica (or on none: an arm with no ready engine)."""

    number: int
    arm: str
    version_id: int
    version_label: str
    replica: Replica | None
    failover: bool  # on an arm other than the one the session was assigned to
    created_at: datetime
    sent: float  # perf_counter
    final: bool = False
    status: int = 0
    outcome: str = OK
    error_kind: str = ""
    detail: str = ""
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    output_text: str = ""


@dataclass(slots=True)
class Exchange:
    """One client request, from routing to its records; mutated as it goes along."""

    request_id: str
    route: AliasRoute
    key: KeyRoute
    endpoint: str
    body: dict[str, Any]
    stream: bool
    session: str | None
    affinity: str | None  # the session, or the prompt-prefix hash without one
    assigned_arm: str
    collect: bool = False  # keep the output text (stored prompts, shadow pairs)
    client_usage: bool = False  # the client asked for the usage chunk itself
    # Not streamed to the client, but asked of the engine as a stream and assembled (assemble.py).
    assemble: bool = False
    upstream_headers: tuple[str, ...] = ()  # passed to the engine (trace context)
    started: float | None = None  # perf_counter of the first try's send
    attempts: list[Attempt] = field(default_factory=list)
    finished: bool = False
    disconnected: bool = False
    span: Any = None  # the request's trace span, when tracing is on

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def attempt_begin(self, arm: ArmRoute, replica: Replica | None) -> Attempt:
        now = time.perf_counter()
        attempt = Attempt(
            number=len(self.attempts) + 1,
            arm=arm.arm,
            version_id=arm.version.id,
            version_label=arm.version.label,
            replica=replica,
            failover=arm.arm != self.assigned_arm,
            created_at=datetime.now(UTC),
            sent=now,
        )
        self.attempts.append(attempt)
        return attempt

    def reply_headers(self) -> Headers:
        attempt = self.current
        arm = attempt.arm if attempt is not None else self.assigned_arm
        label = attempt.version_label if attempt is not None else ""
        return [
            (b"x-rollout-arm", arm.encode()),
            (b"x-model-version", label.encode()),
            (b"x-request-id", self.request_id.encode()),
        ]


class _Retry(Exception):
    """The try failed before any byte reached the client: another replica or arm may take the request."""


class Forwarder:
    def __init__(
        self,
        *,
        pool: UpstreamPool,
        config: GatewayConfig,
        outliers: OutlierPolicy,
        tracing: Tracing | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.outliers = outliers
        self.tracing = tracing or Tracing()

    async def run(self, ex: Exchange, send: Send) -> None:
        route = ex.route
        arms = [ex.assigned_arm]
        if ex.assigned_arm == CANDIDATE:
            arms.append(BASELINE)
        elif route.failover_to_candidate and route.candidate is not None:
            arms.append(CANDIDATE)
        assigned = route.arm(ex.assigned_arm)
        if assigned is not None:
            self._queue_check(ex, assigned)
        ttfb = route.ttfb_timeout_s or self.config.ttfb_timeout_s
        budget = self.config.max_attempts
        reasons: list[str] = []
        for position, arm_name in enumerate(arms):
            arm = route.arm(arm_name)
            if arm is None:
                continue
            # The arms after this one keep a try each: a candidate's users always reach the baseline.
            allowance = max(1, budget - (len(arms) - position - 1))
            tried: set[int] = set()
            failures: list[str] = []
            while len(tried) < allowance:
                replica = replica_choose(arm.replicas, ex.affinity, time.monotonic(), exclude=tried)
                if replica is None:
                    if not tried:
                        # Nothing to send it to on this arm: a failure of the arm all the same, recorded so.
                        attempt = ex.attempt_begin(arm, None)
                        kind = "replicas_ejected" if arm.replicas else "no_ready_engine"
                        attempt.status, attempt.outcome, attempt.error_kind = 503, NO_ENGINE, kind
                        failures.append(kind)
                    break
                tried.add(replica.id)
                attempt = ex.attempt_begin(arm, replica)
                span, trace_headers = (
                    self.tracing.attempt_start(ex, attempt)
                    if ex.span is not None
                    else (None, ex.upstream_headers)
                )
                try:
                    await self._try(ex, attempt, arm, replica, ttfb, trace_headers, send)
                    return
                except _Retry:
                    log.warning("try %d of %s on engine %s (%s %s) failed before its first byte: %s", attempt.number,
                                ex.request_id, replica.id, arm_name, arm.version.label, attempt.detail)
                    failures.append(attempt.error_kind)
                    self.outliers.failed(replica, time.monotonic())
                    metrics.retries_total.labels(route.name, arm_name, attempt.error_kind).inc()
                finally:
                    if span is not None:
                        self.tracing.attempt_end(span, attempt)
            budget -= len(tried)
            reasons.append(f"{arm_name} {arm.version.label}: {_failure_words(failures, ttfb)}")
        await self._give_up(ex, reasons, ttfb, send)

    def _queue_check(self, ex: Exchange, arm: ArmRoute) -> None:
        """429 when every replica of the arm has a full queue (GATEWAY_MAX_QUEUED_PER_REPLICA)."""
        bound = self.config.max_queued_per_replica
        if not bound or not arm.replicas:
            return
        queues = [r.queued() for r in arm.replicas if r.ejected_until is None]
        if queues and all(q is not None and q >= bound for q in queues):
            metrics.throttled_total.labels(ex.key.name, ex.route.name, "engine_queue").inc()
            raise RateLimited(
                f"The engines of '{ex.route.name}' have {bound} or more requests waiting each; try again shortly.",
                retry_after_s=1.0,
                code="engine_overloaded",
            )

    async def _try(
        self,
        ex: Exchange,
        attempt: Attempt,
        arm: ArmRoute,
        replica: Replica,
        ttfb: float,
        trace_headers: tuple[str, ...],
        send: Send,
    ) -> None:
        """Answer the client from this replica, or raise _Retry having sent it nothing."""
        body = ex.body
        body["model"] = arm.version.served_model_name
        if ex.assemble:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        streamed = ex.stream or ex.assemble
        path = "/v1/chat/completions" if ex.endpoint == CHAT else "/v1/completions"
        headers = (*replica.headers, f"X-Request-Id: {ex.request_id}", *trace_headers)
        if ex.started is None:
            ex.started = attempt.sent
        replica.outstanding += 1
        try:
            try:
                # A non-streamed answer passed through whole has its head only once it is complete: no
                # first-byte timeout can tell a long answer from a hung engine there, only the read timeout.
                response = await self.pool.request(
                    replica.endpoint, "POST", path, body=payload, headers=headers,
                    head_timeout_s=ttfb if streamed else None, body_in_time=streamed,
                )
            except UpstreamRefused as exc:
                replica.refused(time.monotonic())
                self._failed(attempt, 503, "connect_refused", str(exc))
            except UpstreamHeadTimeout as exc:
                self._failed(attempt, 504, "ttfb_timeout", str(exc))
            except UpstreamError as exc:
                self._failed(attempt, 502, _kind(exc), str(exc))
            try:
                if response.status >= 500:
                    detail = await _error_detail(response, ttfb)
                    self._failed(
                        attempt,
                        502,
                        f"http_{response.status}",
                        f"the engine answered {response.status}: {detail}",
                    )
                if response.status != 200 or not streamed:
                    await self._whole(ex, attempt, response, send)
                elif ex.stream:
                    await self._stream(ex, attempt, response, send)
                elif _is_sse(response):
                    await self._assembled(ex, attempt, response, send)
                else:
                    await self._whole(ex, attempt, response, send)  # an engine that answered whole all the same
            finally:
                response.close()
        finally:
            replica.outstanding -= 1
        if attempt.outcome == ENGINE_ERROR:
            self.outliers.failed(replica, time.monotonic())
        elif attempt.outcome in (OK, CLIENT_ERROR):
            self.outliers.succeeded(replica)

    def _failed(self, attempt: Attempt, status: int, kind: str, detail: str) -> NoReturn:
        attempt.status, attempt.outcome, attempt.error_kind = status, ENGINE_ERROR, kind
        attempt.detail = detail
        attempt.e2e_ms = (time.perf_counter() - attempt.sent) * 1000.0
        raise _Retry(detail)

    async def _whole(self, ex: Exchange, attempt: Attempt, response: Response, send: Send) -> None:
        try:
            content = await response.read()
        except UpstreamError as exc:
            self._failed(attempt, 502, _kind(exc), f"the engine's answer broke off: {_kind(exc)}")
        assert ex.started is not None
        attempt.e2e_ms = (time.perf_counter() - ex.started) * 1000.0
        status = response.status
        attempt.status = status
        if status >= 400:
            attempt.outcome, attempt.error_kind = CLIENT_ERROR, f"http_{status}"
        else:
            usage, text = body_measure(content)
            attempt.prompt_tokens, attempt.completion_tokens = usage_tokens(usage)
            if ex.collect:
                attempt.output_text = text
        content_type = response.headers.get(b"content-type", JSON)
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(content)).encode()),
            *ex.reply_headers(),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _stream(self, ex: Exchange, attempt: Attempt, response: Response, send: Send) -> None:
        assert ex.started is not None
        meter = StreamMeter(sent_at=ex.started, strip_usage=not ex.client_usage, collect_text=ex.collect)
        perf = time.perf_counter
        started = False
        last = b""
        try:
            async for chunk in response.chunks():
                out = meter.feed(chunk, perf())
                if response.complete and not response.buffered:
                    # The engine's answer is all in (vLLM's [DONE] often comes with the end of its body): it
                    # goes out with the end of the client's response, in one write and one wake-up.
                    last = out
                    continue
                if not out:
                    continue
                if not started:
                    # The answer's head goes out with its first event: until then a failure may still be
                    # tried elsewhere, and the headers name the arm that really answers.
                    attempt.status = 200
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [*SSE_HEADERS, *ex.reply_headers()],
                        }
                    )
                    started = True
                if meter.done_at is not None:
                    # This hands the client `[DONE]`: it has the whole answer, and a client (the openai SDK
                    # among them) may hang up now, before the stream's last empty chunk.
                    ex.finished = True
                await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = last + meter.finish(perf())
        except UpstreamError as exc:
            if not started:
                if isinstance(exc, UpstreamHeadTimeout):
                    self._failed(attempt, 504, "ttfb_timeout", str(exc))
                self._failed(
                    attempt,
                    502,
                    _kind(exc),
                    f"the engine's stream broke off before its first event: {_kind(exc)}",
                )
            # Bytes already reached the client: the error goes in the stream, as OpenAI sends it.
            attempt.outcome, attempt.error_kind = ENGINE_ERROR, _kind(exc)
            event = {
                "error": {
                    "message": f"The engine failed mid-stream: {_kind(exc)}.",
                    "type": "server_error",
                    "param": None,
                    "code": "upstream_error",
                }
            }
            tail = b"data: " + json.dumps(event).encode() + b"\n\n"
        if not started:
            attempt.status = 200
            await send(
                {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *ex.reply_headers()]}
            )
        _stream_settle(attempt, meter, ex.collect)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _assembled(self, ex: Exchange, attempt: Attempt, response: Response, send: Send) -> None:
        """The engine's stream, read to its end and sent as one non-streamed answer. Nothing has reached the
        client until then, so a stream that breaks off or ends in an error event is tried again elsewhere,
        as a failed non-streamed answer would be."""
        assert ex.started is not None
        assembler = Assembler(chat=ex.endpoint == CHAT)
        meter = StreamMeter(sent_at=ex.started, assembler=assembler)  # it hands the assembler each parsed chunk
        perf = time.perf_counter
        try:
            async for chunk in response.chunks():
                meter.feed(chunk, perf())
            meter.finish(perf())
        except UpstreamHeadTimeout as exc:
            self._failed(attempt, 504, "ttfb_timeout", str(exc))
        except UpstreamError as exc:
            self._failed(attempt, 502, _kind(exc), f"the engine's stream broke off: {_kind(exc)}")
        if meter.error is not None:
            self._failed(attempt, 502, "stream_error", f"the engine's stream ended in an error: {meter.error}")
        if meter.done_at is None or not assembler.events:
            self._failed(attempt, 502, "stream_cut", "the engine's stream ended without [DONE]")
        _stream_settle(attempt, meter, collect=False)
        if ex.collect:
            attempt.output_text = assembler.text()
        content = assembler.dumps()
        attempt.status = 200
        headers = [(b"content-type", JSON), (b"content-length", str(len(content)).encode()), *ex.reply_headers()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _give_up(self, ex: Exchange, reasons: list[str], ttfb: float, send: Send) -> None:
        """Every try failed before answering: the last one decides the status (503 when nothing could be
        reached, 504 when nothing answered in time, else 502); the message says what each arm did."""
        route = ex.route
        last = ex.current
        detail = "; ".join(reasons)
        error: GatewayError
        if last is None or last.error_kind in ("connect_refused", "no_ready_engine", "replicas_ejected"):
            hint = ""
            if (
                not route.failover_to_candidate
                and ex.assigned_arm == BASELINE
                and route.candidate is not None
            ):
                hint = " (failover to the candidate is off for this alias)"
            error = no_engine(f"No healthy engine for '{route.name}': {detail}{hint}.")
        elif last.error_kind == "ttfb_timeout":
            error = upstream_timeout(f"No engine of '{route.name}' answered within {ttfb:g} s: {detail}.")
        else:
            error = upstream_failed(
                f"The engines of '{route.name}' failed before answering: {detail}. Last: {last.detail}"
            )
        if last is not None:
            last.status = error.status
        await send_error(send, error, ex.reply_headers())


def _stream_settle(attempt: Attempt, meter: StreamMeter, collect: bool) -> None:
    sent = meter.sent_at
    if meter.first_token_at is not None:
        attempt.ttft_ms = (meter.first_token_at - sent) * 1000.0
    end = meter.done_at if meter.done_at is not None else time.perf_counter()
    attempt.e2e_ms = (end - sent) * 1000.0
    attempt.prompt_tokens, attempt.completion_tokens = meter.prompt_tokens, meter.completion_tokens
    if collect:
        attempt.output_text = meter.text
    if attempt.outcome != OK:
        return
    if meter.error is not None:
        attempt.outcome, attempt.error_kind = ENGINE_ERROR, "stream_error"
    elif meter.done_at is None:
        attempt.outcome, attempt.error_kind = ENGINE_ERROR, "stream_cut"


async def _error_detail(response: Response, timeout_s: float) -> str:
    try:
        content = await asyncio.wait_for(response.read(), timeout_s)
    except (UpstreamError, TimeoutError):
        return ""
    return content[:300].decode("utf-8", "replace")


def _is_sse(response: Response) -> bool:
    return response.headers.get(b"content-type", b"").startswith(b"text/event-stream")


def _failure_words(kinds: list[str], ttfb: float) -> str:
    if not kinds:
        return "not tried"
    last = kinds[-1]
    if last == "ttfb_timeout":
        return f"no answer within {ttfb:g} s"
    if last.startswith("http_"):
        return f"engines answered {last[5:]}"
    return _FAILURE_WORDS.get(last, f"engines failed ({last})")


def _kind(exc: BaseException) -> str:
    return type(exc).__name__
