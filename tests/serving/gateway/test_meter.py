"""Measuring streams and bodies as DESIGN.md defines, on vLLM-shaped chunks."""

from __future__ import annotations

import json

from serving.gateway.meter import StreamMeter, body_measure, tpot_ms


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chat_chunk(content: str | None = None, role: str | None = None, finish: str | None = None) -> bytes:
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return event({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE = event({"id": "c1", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}})
DONE = b"data: [DONE]\n\n"

CHAT_STREAM = [
    chat_chunk(role="assistant", content=""),  # the role-only first chunk
    chat_chunk(content=""),  # a partial UTF-8 character: empty content
    chat_chunk(content="8"),
    chat_chunk(content="5"),
    chat_chunk(content="", finish="stop"),
    USAGE,
    DONE,
]


def run(chunks: list[bytes], **kwargs: bool) -> tuple[StreamMeter, bytes]:
    meter = StreamMeter(sent_at=0.0, **kwargs)
    out = b""
    for t, chunk in enumerate(chunks, start=1):
        out += meter.feed(chunk, float(t))
    out += meter.finish(float(len(chunks) + 1))
    return meter, out


def test_ttft_is_the_first_chunk_with_content_and_e2e_the_done_event() -> None:
    meter, _ = run(CHAT_STREAM)
    assert meter.first_token_at == 3.0
    assert meter.done_at == 7.0
    assert meter.completion_tokens == 3
    assert meter.prompt_tokens == 6
    assert meter.error is None


def test_the_usage_chunk_only_reaches_clients_that_asked_for_it() -> None:
    _, stripped = run(CHAT_STREAM, strip_usage=True)
    assert stripped == b"".join(c for c in CHAT_STREAM if c is not USAGE)
    _, kept = run(CHAT_STREAM, strip_usage=False)
    assert kept == b"".join(CHAT_STREAM)


def test_events_cut_at_any_byte_give_the_same_stream_and_figures() -> None:
    whole = b"".join(CHAT_STREAM)
    meter = StreamMeter(sent_at=0.0, strip_usage=True, collect_text=True)
    out = b"".join(meter.feed(whole[i:i + 1], float(i)) for i in range(len(whole)))
    out += meter.finish(float(len(whole)))
    assert out == b"".join(c for c in CHAT_STREAM if c is not USAGE)
    # The first content event ends at this byte.
    first_content_end = len(b"".join(CHAT_STREAM[:3])) - 1
    assert meter.first_token_at == float(first_content_end)
    assert meter.text == "85"
    assert meter.completion_tokens == 3


def test_several_events_in_one_chunk() -> None:
    meter, out = run([b"".join(CHAT_STREAM)], collect_text=True)
    assert meter.first_token_at == 1.0 and meter.done_at == 1.0
    assert meter.text == "85"
    assert out == b"".join(CHAT_STREAM)


def test_completion_text_chunks_and_crlf_line_endings() -> None:
    chunks = [
        event({"choices": [{"index": 0, "text": ""}]}).replace(b"\n", b"\r\n"),
        event({"choices": [{"index": 0, "text": "4"}]}).replace(b"\n", b"\r\n"),
        event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}).replace(b"\n", b"\r\n"),
        DONE.replace(b"\n", b"\r\n"),
    ]
    meter, _ = run(chunks, collect_text=True)
    assert meter.first_token_at == 2.0
    assert meter.text == "4"
    assert meter.completion_tokens == 1
    assert meter.done_at == 4.0


def test_an_error_event_and_a_stream_cut_before_done() -> None:
    error = b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'
    meter, out = run([chat_chunk(content="1"), error])
    assert meter.error == "engine died"
    assert meter.done_at is None
    assert error in out
    cut, _ = run([chat_chunk(content="1"), chat_chunk(content="2")])
    assert cut.error is None and cut.done_at is None


def test_a_last_event_without_its_blank_line_still_counts() -> None:
    meter, out = run([chat_chunk(content="1"), b"data: [DONE]"])
    assert meter.done_at is not None
    assert out.endswith(b"data: [DONE]\n\n")


def test_tpot_needs_two_tokens() -> None:
    assert tpot_ms(10.0, 70.0, 4) == 20.0
    assert tpot_ms(10.0, 70.0, 1) is None
    assert tpot_ms(None, 70.0, 4) is None


def test_non_streamed_bodies() -> None:
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "85"}}],
            "usage": {"prompt_tokens": 6, "completion_tokens": 3}}
    assert body_measure(json.dumps(chat).encode()) == (chat["usage"], "85")
    completion = {"choices": [{"index": 0, "text": "12"}], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    assert body_measure(json.dumps(completion).encode()) == (completion["usage"], "12")
    assert body_measure(b"not json") == (None, "")
