"""Non-streamed requests: the gateway asks the engine for a stream, times its first event like a stream's
(a hung engine is caught within the TTFB timeout, a long answer is not cut by it) and sends the client the
non-streamed answer the engine would have sent. The engines are the loopback stand-in
(tests/support/fake_engine.py), whose "paced" answer comes both ways, shaped as vLLM shapes it; the real
engine's side by side is in test_gateway_engines.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from serving.gateway.assemble import Assembler, needs_whole
from serving.gateway.meter import StreamMeter
from tests.serving.gateway.inprocess import (
    CHAT,
    alias,
    rows,
    running,
    timed_out_on_1_then_answered_by_2,
    workers,
)
from tests.support.fake_engine import FakeEngine

PACED_CHAT = {**CHAT, "messages": [{"role": "user", "content": "paced"}]}
PACED_TEXT = {"model": "adder", "prompt": "paced", "max_tokens": 20}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture
def engine(standin_engine: Callable[..., FakeEngine]) -> Callable[..., FakeEngine]:
    return standin_engine


def direct(fake: FakeEngine, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(fake.base_url + path, json={**body, "model": "adder-v1"}, timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", PACED_CHAT),
        ("/v1/chat/completions", {**PACED_CHAT, "n": 2, "logprobs": True, "top_logprobs": 0}),
        ("/v1/chat/completions", {**PACED_CHAT, "tools": TOOLS}),
        ("/v1/completions", PACED_TEXT),
        ("/v1/completions", {**PACED_TEXT, "n": 3, "logprobs": 1}),
    ],
    ids=["chat", "chat-n2-logprobs", "chat-tool-call", "completion", "completion-n3-logprobs"],
)
def test_the_answer_is_the_one_the_engine_gives_unstreamed(
    engine: Callable[..., FakeEngine], path: str, body: dict[str, Any]
) -> None:
    fake = engine()
    fake.paced_tokens = 7

    async def scenario() -> dict[str, Any]:
        async with running(rows(alias(), workers(1, fake.base_url))) as gw:
            reply = await gw.call(body, path=path)
            assert reply.status == 200, reply.body
            assert reply.headers["content-type"] == "application/json"
            assert int(reply.headers["content-length"]) == len(reply.body)
            answer: dict[str, Any] = reply.json()
            return answer

    through = asyncio.run(scenario())
    sent = fake.seen.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert through == direct(fake, path, body)
    parsed = (ChatCompletion if path.endswith("chat/completions") else Completion).model_validate(through)
    assert parsed.usage is not None and parsed.usage.completion_tokens == (body.get("n") or 1) * (
        9 if "tools" in body else 7)


def test_a_long_answer_is_not_cut_by_the_ttfb_timeout_and_is_timed(engine: Callable[..., FakeEngine]) -> None:
    fake = engine()
    fake.paced_tokens, fake.paced_pause_s = 12, 0.05  # 0.6 s of generation, the TTFB timeout 0.3 s

    async def scenario() -> None:
        async with running(rows(alias(ttfb=0.3), workers(1, fake.base_url))) as gw:
            started = time.monotonic()
            reply = await gw.call(PACED_CHAT)
            assert reply.status == 200, reply.body
            assert time.monotonic() - started >= 0.55
            assert reply.json()["choices"][0]["message"]["content"] == "012345678901"
            (record,) = await gw.settled()
            assert (record.outcome, record.stream, record.completion_tokens) == ("ok", False, 12)
            assert record.ttft_ms is not None and record.ttft_ms < 300
            assert record.e2e_ms is not None and record.e2e_ms >= 550
            assert record.tpot_ms is not None and 40 <= record.tpot_ms < 200

    asyncio.run(scenario())
    assert len(fake.seen.requests) == 1


@pytest.mark.parametrize("mode", ["hang", "mute"])
def test_a_hung_engine_is_left_within_the_ttfb_timeout(engine: Callable[..., FakeEngine], mode: str) -> None:
    """"hang": no head at all; "mute": a stream's head and then nothing (an engine core hung behind a live
    API server)."""
    hung, good = engine(mode), engine()
    good.paced_tokens, good.paced_pause_s = 12, 0.05

    async def scenario() -> None:
        async with running(rows(alias(ttfb=0.3), workers(1, hung.base_url, good.base_url)), eject_after=100) as gw:
            for n in range(4):
                started = time.monotonic()
                reply = await gw.call({**PACED_CHAT, "user": f"user-{n}"})
                assert reply.status == 200, reply.body
                assert time.monotonic() - started < 0.3 + 0.6 + 1.0  # one TTFB timeout, then the answer
            timed_out_on_1_then_answered_by_2(await gw.settled())

    asyncio.run(scenario())


def test_with_every_engine_hung_the_client_gets_504_after_the_ttfb_timeouts(
    engine: Callable[..., FakeEngine],
) -> None:
    first, second = engine("mute"), engine("mute")

    async def scenario() -> None:
        async with running(rows(alias(ttfb=0.3), workers(1, first.base_url, second.base_url))) as gw:
            started = time.monotonic()
            reply = await gw.call(PACED_CHAT)
            assert time.monotonic() - started < 1.5
            assert reply.status == 504 and reply.json()["error"]["code"] == "upstream_timeout"
            assert "0.3 s" in reply.json()["error"]["message"]

    asyncio.run(scenario())


def test_a_stream_that_breaks_off_is_tried_elsewhere_since_the_client_has_nothing_yet(
    engine: Callable[..., FakeEngine],
) -> None:
    cut, good = engine("cut"), engine()

    async def scenario() -> None:
        async with running(rows(alias(), workers(1, cut.base_url, good.base_url)), eject_after=100) as gw:
            for n in range(4):
                reply = await gw.call({**CHAT, "user": f"user-{n}"})
                assert reply.status == 200, reply.body
                assert reply.json()["choices"][0]["message"]["content"] == "444"
            records = await gw.settled()
            assert {(r.outcome, r.engine_worker_id) for r in records if r.final} == {("ok", 2)}
            assert {r.outcome for r in records if not r.final} == {"engine_error"}

    asyncio.run(scenario())
    assert cut.seen.requests


def test_what_a_stream_cannot_give_is_passed_through_unstreamed(engine: Callable[..., FakeEngine]) -> None:
    """Prompt log-probabilities (vLLM refuses them on a stream), and stream_options on a request that asks
    for no stream (the engine's to refuse): asked of the engine as the client asked, with no first-byte
    timeout (the head of such an answer comes when it is complete), the read timeout only."""
    fake = engine()
    fake.paced_tokens, fake.paced_pause_s = 12, 0.05

    async def scenario() -> None:
        async with running(rows(alias(ttfb=0.3), workers(1, fake.base_url))) as gw:
            for extra in ({"prompt_logprobs": 1}, {"stream_options": {"include_usage": True}}):
                reply = await gw.call({**PACED_TEXT, **extra}, path="/v1/completions")
                assert reply.status == 200, reply.body
                assert reply.json()["choices"][0]["text"] == "012345678901"
            records = await gw.settled()
            assert [(r.outcome, r.completion_tokens, r.ttft_ms) for r in records] == [("ok", 12, None)] * 2

    asyncio.run(scenario())
    assert [r.get("stream") for r in fake.seen.requests] == [None, None]


@pytest.mark.parametrize(("body", "whole"), [
    ({}, False),
    ({"n": 2, "logprobs": True}, False),
    ({"prompt_logprobs": 0}, True),
    ({"use_beam_search": True}, True),
    ({"stream_options": {"include_usage": True}}, True),
    ({"best_of": 3, "n": 2}, True),
    ({"best_of": 2, "n": 2}, False),
    ({"best_of": "3", "n": None}, False),  # the engine's to refuse
])
def test_what_is_passed_through_unstreamed(body: dict[str, Any], whole: bool) -> None:
    assert needs_whole(body) is whole


def test_the_assembly_keeps_what_an_engine_adds_and_skips_what_is_not_a_chunk() -> None:
    def event(payload: str) -> bytes:
        return b"data: " + payload.encode() + b"\n\n"

    assembler = Assembler(chat=True)
    # As the gateway feeds it: the meter parses each event once and hands the assembler the chunks.
    StreamMeter(sent_at=0.0, assembler=assembler).feed(
        b": a comment\n\n"
        + event('{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","prompt_token_ids":[1,2],'
                '"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"hm"},'
                '"token_ids":[7]}]}')
        + event('{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":"fp",'
                '"choices":[{"index":0,"delta":{"content":"ok"},"token_ids":[8],"finish_reason":"stop",'
                '"stop_reason":42,"routed_experts":"x"}]}')
        + event("not json")
        + event('{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[],'
                '"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}')
        + event("[DONE]"),
        0.0,
    )
    assert assembler.body() == {
        "id": "c1", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok", "reasoning": "hm"},
                     "logprobs": None, "finish_reason": "stop", "stop_reason": 42, "token_ids": [7, 8],
                     "routed_experts": "x"}],
        "prompt_token_ids": [1, 2], "system_fingerprint": "fp",
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    assert assembler.text() == "ok" and assembler.events == 3
