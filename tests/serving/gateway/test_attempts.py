"""Retries, failover and the records they leave: every try is a record, against the arm and replica it went
to; the answer's record is timed from the first try. The engines here are the loopback stand-in
(tests/support/fake_engine.py), told to fail the way each test needs; the real-engine versions of these
faults are in tests/faults/test_gateway_faults.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from serving.gateway.routing import BASELINE, CANDIDATE
from serving.gateway.tracing import Tracing
from tests.serving.gateway.inprocess import (
    CHAT,
    alias,
    rows,
    running,
    timed_out_on_1_then_answered_by_2,
    workers,
)
from tests.support.engines import free_port
from tests.support.fake_engine import FakeEngine


@pytest.fixture
def engine(standin_engine: Callable[..., FakeEngine]) -> Callable[..., FakeEngine]:
    return standin_engine


def nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_a_candidate_failure_is_recorded_against_the_candidate_and_the_baseline_answers(
    engine: Callable[..., FakeEngine],
) -> None:
    baseline, candidate = engine(), engine("error")
    table = rows(
        alias(weight=1.0), workers(1, baseline.base_url) + workers(2, candidate.base_url, first_id=10)
    )

    async def scenario() -> None:
        async with running(table) as gw:
            reply = await gw.call({**CHAT, "user": "u1", "stream": True})
            assert reply.status == 200 and b"[DONE]" in reply.body
            assert (reply.headers["x-rollout-arm"], reply.headers["x-model-version"]) == (
                BASELINE,
                "adder-v1",
            )
            await gw.settled()
            failed, served = gw.attempts(reply.headers["x-request-id"])
            assert (failed.attempt, failed.arm, failed.assigned_arm, failed.outcome, failed.error_kind) == (
                1,
                CANDIDATE,
                CANDIDATE,
                "engine_error",
                "http_500",
            )
            assert (failed.final, failed.failover, failed.engine_worker_id, failed.model_version_id) == (
                False,
                False,
                10,
                2,
            )
            assert failed.e2e_ms is not None and failed.ttft_ms is None
            assert (
                served.attempt,
                served.arm,
                served.assigned_arm,
                served.outcome,
                served.final,
                served.failover,
            ) == (2, BASELINE, CANDIDATE, "ok", True, True)
            # Timed from the first try: the time lost on the candidate is in the answer's TTFT and E2E.
            assert served.ttft_ms is not None and served.e2e_ms is not None
            assert served.ttft_ms >= failed.e2e_ms and served.e2e_ms >= served.ttft_ms
            assert served.created_at >= failed.created_at

    asyncio.run(scenario())


def test_before_the_first_byte_a_failure_is_tried_on_another_replica_of_the_same_arm(
    engine: Callable[..., FakeEngine],
) -> None:
    hung, reset, good = engine("hang"), engine("reset"), engine()
    table = rows(alias(ttfb=0.3), workers(1, hung.base_url, reset.base_url, good.base_url))

    async def scenario() -> None:
        async with running(table, max_attempts=3) as gw:
            for n in range(6):
                started = time.monotonic()
                reply = await gw.call({**CHAT, "stream": n % 2 == 0})
                assert reply.status == 200, reply.body
                assert time.monotonic() - started < 2.0  # at most one TTFB timeout per request
            records = await gw.settled()
            kinds = {r.error_kind for r in records if not r.final}
            assert kinds == {"ttfb_timeout", "ConnectionResetError"} or kinds <= {
                "ttfb_timeout",
                "UpstreamError",
                "ConnectionResetError",
            }
            timed_out = [r for r in records if r.error_kind == "ttfb_timeout"]
            assert timed_out and all(
                r.status_code == 504 and 250 <= (r.e2e_ms or 0) < 1000 for r in timed_out
            )
            assert all(r.arm == BASELINE and not r.failover for r in records)
            assert sum(r.final and r.outcome == "ok" for r in records) == 6

    asyncio.run(scenario())


def test_a_stream_whose_head_came_but_no_event_within_the_ttfb_timeout_is_tried_elsewhere(
    engine: Callable[..., FakeEngine],
) -> None:
    """vLLM sends a stream's head as soon as it takes the request: an engine core that hangs behind a live API
    server shows up as a head and then silence."""
    mute, good = engine("mute"), engine()
    table = rows(alias(ttfb=0.3), workers(1, mute.base_url, good.base_url))

    async def scenario() -> None:
        async with running(table, eject_after=100) as gw:
            for n in range(8):
                started = time.monotonic()
                reply = await gw.call({**CHAT, "stream": True, "user": f"user-{n}"})
                assert reply.status == 200 and b"[DONE]" in reply.body, reply.body
                assert time.monotonic() - started < 2.0
            timed_out = timed_out_on_1_then_answered_by_2(await gw.settled())
        assert mute.seen.cancelled == 0 and len(mute.seen.requests) == len(timed_out)

    asyncio.run(scenario())


def test_after_the_first_byte_nothing_is_sent_again(engine: Callable[..., FakeEngine]) -> None:
    cut, good = engine("cut"), engine()
    table = rows(alias(), workers(1, cut.base_url))

    async def scenario() -> None:
        async with running(table) as gw:
            reply = await gw.call({**CHAT, "stream": True})
            assert reply.status == 200 and b'"upstream_error"' in reply.body and b"[DONE]" not in reply.body
            await gw.settled()
            (record,) = gw.attempts(reply.headers["x-request-id"])
            assert (record.outcome, record.final, record.attempt) == ("engine_error", True, 1)
        assert len(cut.seen.requests) == 1 and not good.seen.requests

    asyncio.run(scenario())


def test_when_every_try_fails_the_client_is_told_why_and_the_last_try_is_the_final_record(
    engine: Callable[..., FakeEngine],
) -> None:
    broken = engine("error")
    table = rows(alias(weight=1.0), workers(1, nowhere()) + workers(2, broken.base_url, first_id=10))

    async def scenario() -> None:
        async with running(table) as gw:
            reply = await gw.call({**CHAT, "user": "u1"})
            assert reply.status == 503, reply.body  # the baseline refused: nothing is there at all
            message = reply.json()["error"]["message"]
            assert "candidate adder-v2: engines answered 500" in message
            assert "baseline adder-v1: engines refused the connection" in message
            await gw.settled()
            first, last = gw.attempts(reply.headers["x-request-id"])
            assert (first.arm, first.error_kind, first.final) == (CANDIDATE, "http_500", False)
            assert (last.arm, last.error_kind, last.final, last.status_code) == (
                BASELINE,
                "connect_refused",
                True,
                503,
            )

    asyncio.run(scenario())


def test_an_arm_without_a_ready_engine_is_a_failure_of_that_arm(engine: Callable[..., FakeEngine]) -> None:
    baseline = engine()
    table = rows(alias(weight=1.0), workers(1, baseline.base_url))  # the candidate has no engine at all

    async def scenario() -> None:
        async with running(table) as gw:
            reply = await gw.call({**CHAT, "user": "u1"})
            assert reply.status == 200
            await gw.settled()
            missing, served = gw.attempts(reply.headers["x-request-id"])
            assert (missing.arm, missing.outcome, missing.error_kind, missing.engine_worker_id) == (
                CANDIDATE,
                "no_engine",
                "no_ready_engine",
                None,
            )
            assert (served.arm, served.outcome, served.final) == (BASELINE, "ok", True)

    asyncio.run(scenario())


def test_a_replica_failing_in_a_row_is_ejected_and_comes_back_after_a_good_probe(
    engine: Callable[..., FakeEngine],
) -> None:
    flaky, good = engine("error"), engine()
    table = rows(alias(), workers(1, flaky.base_url, good.base_url))

    async def scenario() -> None:
        async with running(table, eject_after=2, eject_base_s=0.3) as gw:
            flaky.health_status = 500
            replica = gw.gateway.table.replicas[1]
            for n in range(12):  # sessions spread over both replicas
                assert (await gw.call({**CHAT, "user": f"user-{n}"})).status == 200
                if replica.ejected:
                    break
            assert replica.ejected
            tried = len(flaky.seen.requests)
            for n in range(10):
                assert (await gw.call({**CHAT, "user": f"user-{n}"})).status == 200
            assert len(flaky.seen.requests) == tried  # out of routing
            await asyncio.sleep(0.8)
            assert flaky.seen.probes >= 1 and replica.ejected  # the probe failed: still out, for longer
            flaky.mode, flaky.health_status = "ok", 200
            deadline = time.monotonic() + 5
            while replica.ejected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not replica.ejected
            for n in range(12):
                assert (await gw.call({**CHAT, "user": f"user-{n}"})).status == 200
            assert len(flaky.seen.requests) > tried  # back in routing

    asyncio.run(scenario())


def test_client_trace_context_reaches_the_engine_when_tracing_is_off(
    engine: Callable[..., FakeEngine],
) -> None:
    fake = engine()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def scenario() -> None:
        async with running(rows(alias(), workers(1, fake.base_url))) as gw:
            reply = await gw.call(CHAT, headers={"traceparent": parent, "tracestate": "ramp=1"})
            assert reply.status == 200

    asyncio.run(scenario())
    assert fake.seen.headers[-1]["traceparent"] == parent and fake.seen.headers[-1]["tracestate"] == "ramp=1"
    assert len(fake.seen.headers[-1]["x-request-id"]) == 24


def test_traces_follow_the_request_and_each_try_into_the_engine(engine: Callable[..., FakeEngine]) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing = Tracing(provider.get_tracer("tests"), provider)
    broken, good = engine("error"), engine()
    table = rows(alias(weight=1.0), workers(1, good.base_url) + workers(2, broken.base_url, first_id=10))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def scenario() -> str:
        async with running(table, tracing=tracing) as gw:
            reply = await gw.call({**CHAT, "user": "u1", "temperature": 0.5}, headers={"traceparent": parent})
            assert reply.status == 200
            return reply.headers["x-request-id"]

    request_id = asyncio.run(scenario())
    spans = {span.name: span for span in exported.get_finished_spans()}
    server, failed, served = spans["chat adder"], spans["chat adder-v2"], spans["chat adder-v1"]
    assert f"{server.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert server.parent is not None and f"{server.parent.span_id:016x}" == "b7ad6b7169203331"
    assert failed.parent.span_id == served.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert server.attributes is not None
    attributes = dict(server.attributes)
    # Asked of the engine as a stream (three tokens from the stand-in) and timed like one.
    ttft_ms = attributes.pop("ramp.ttft_ms")
    assert isinstance(ttft_ms, float) and ttft_ms > 0
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "adder",
        "gen_ai.request.max_tokens": 4,
        "gen_ai.request.temperature": 0.5,
        "ramp.request_id": request_id,
        "ramp.rollout.assigned_arm": "candidate",
        "ramp.rollout.id": 7,
        "ramp.rollout.arm": "baseline",
        "ramp.attempts": 2,
        "gen_ai.response.model": "adder-v1",
        "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 3,
    }
    assert failed.attributes is not None and failed.attributes["error.type"] == "http_500"
    assert failed.status.status_code.name == "ERROR"
    # Each engine got the context of its own try, not the client's.
    for fake, span in ((broken, failed), (good, served)):
        trace_id, span_id = fake.seen.headers[-1]["traceparent"].split("-")[1:3]
        assert (trace_id, span_id) == ("0af7651916cd43dd8448eb211c80319c", f"{span.context.span_id:016x}")


def test_every_log_line_of_a_request_carries_its_request_id(engine: Callable[..., FakeEngine]) -> None:
    import logging

    from config.log_context import RequestIdFilter

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(name)s%(request_tag)s: %(message)s"))
    logger = logging.getLogger("serving.gateway")
    logger.addHandler(handler)
    table = rows(alias(), workers(1, nowhere(), engine().base_url))
    try:

        async def scenario() -> str:
            async with running(table, eject_after=1) as gw:
                for n in range(8):  # until one is sent to the refusing replica first
                    reply = await gw.call({**CHAT, "user": f"u{n}"})
                    assert reply.status == 200
                    if lines:
                        return reply.headers["x-request-id"]
            raise AssertionError("no request met the refusing replica")

        request_id = asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)
    tried = [line for line in lines if "failed before its first byte" in line]
    ejected = [line for line in lines if "ejected" in line]
    assert tried and tried[0].startswith(f"serving.gateway.forward [{request_id}]: ")
    assert ejected and f"[{request_id}]" in ejected[0]
