"""Measuring a response as it goes past, as DESIGN.md's "Metric definitions" say. Pure Python.

TTFT = first chunk with non-empty content - sent upstream; E2E = `[DONE]` (or the end of a non-streamed
body) - sent; TPOT = (E2E - TTFT) / (n - 1) with n = `usage.completion_tokens`, undefined for n <= 1.

Parsing every chunk's JSON would be the most expensive thing the gateway does per token, so a stream is
cut into whole SSE events with byte searches only, and an event's JSON is parsed only while the first
token is still awaited, when it may carry `usage` or an `error`, or when the text is wanted (stored
prompts, shadow pairs) or the whole answer is (a non-streamed request asked of the engine as a stream: each
chunk, parsed once here, goes to its `Assembler`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.gateway.assemble import Assembler

_DONE = b"[DONE]"
_USAGE = b'"usage"'
_ERROR = b'"error"'


class StreamMeter:
    __slots__ = (
        "_assembler", "_collect", "_every", "_parts", "_pending", "_strip_usage", "done_at", "error",
        "first_token_at", "sent_at", "usage",
    )

    def __init__(
        self, *, sent_at: float, strip_usage: bool = False, collect_text: bool = False,
        assembler: Assembler | None = None,
    ) -> None:
        self.sent_at = sent_at
        self.first_token_at: float | None = None
        self.done_at: float | None = None
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self._strip_usage = strip_usage
        self._collect = collect_text
        self._assembler = assembler
        # Every event's JSON is wanted, not only until the first token.
        self._every = collect_text or assembler is not None
        self._parts: list[str] = []
        self._pending = b""

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Take bytes from upstream; return the whole events to pass on (a partial event waits for the rest)."""
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b""
        cut += 2
        ready, self._pending = data[:cut], data[cut:]
        if (
            self.first_token_at is not None
            and not self._every
            and _USAGE not in ready
            and _ERROR not in ready
            and _DONE not in ready
        ):
            return ready
        return self._events(ready, now)

    def finish(self, now: float) -> bytes:
        """The stream ended: account for (and return) a last event that had no blank line after it."""
        rest, self._pending = self._pending, b""
        if not rest.strip():
            return rest
        return self._events(rest + b"\n\n", now)

    def _events(self, ready: bytes, now: float) -> bytes:
        kept: list[bytes] = []
        dropped = False
        for event in ready.split(b"\n\n"):
            if not event:
                continue
            if self._event(event, now):
                kept.append(event)
            else:
                dropped = True
        if not dropped:
            return ready
        return b"".join(event + b"\n\n" for event in kept)

    def _event(self, event: bytes, now: float) -> bool:
        """Account for one event; False when it is to be left out of the client's stream."""
        payload = _data_of(event)
        if payload is None:
            return True
        if payload == _DONE:
            if self.done_at is None:
                self.done_at = now
            return True
        if not (self.first_token_at is None or self._every or _USAGE in payload or _ERROR in payload):
            return True
        try:
            obj = json.loads(payload)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        error = obj.get("error")
        if error is not None:
            self.error = _error_message(error)
            return True
        if self._assembler is not None:
            self._assembler.chunk(obj)
        choices = obj.get("choices")
        if isinstance(choices, list) and (self.first_token_at is None or self._collect):
            for index, choice in enumerate(choices):
                text, has_token = _choice_text(choice)
                if has_token and self.first_token_at is None:
                    self.first_token_at = now
                if self._collect and text and index == 0:
                    self._parts.append(text)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            # The final usage chunk has no choices; strip it when only the gateway asked for it.
            if self._strip_usage and not choices:
                return False
        return True

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def completion_tokens(self) -> int | None:
        return _tokens(self.usage, "completion_tokens")

    @property
    def prompt_tokens(self) -> int | None:
        return _tokens(self.usage, "prompt_tokens")


def _data_of(event: bytes) -> bytes | None:
    if event.startswith(b"data:"):
        if b"\n" not in event:
            return event[5:].strip()
    # Several lines, comments or other fields: join the data lines, as the SSE spec does.
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _choice_text(choice: Any) -> tuple[str, bool]:
    """(text to collect, whether the chunk carries a generated token) for one choice of a chunk."""
    if not isinstance(choice, dict):
        return "", False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        text = content if isinstance(content, str) else ""
        has_token = bool(text) or bool(delta.get("reasoning_content") or delta.get("reasoning") or delta.get("tool_calls"))
        return text, has_token
    raw = choice.get("text")
    if isinstance(raw, str):
        return raw, bool(raw)
    return "", False


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]


def _tokens(usage: dict[str, Any] | None, name: str) -> int | None:
    if usage is None:
        return None
    value = usage.get(name)
    return value if isinstance(value, int) and value >= 0 else None


def tpot_ms(ttft_ms: float | None, e2e_ms: float | None, completion_tokens: int | None) -> float | None:
    if ttft_ms is None or e2e_ms is None or completion_tokens is None or completion_tokens <= 1:
        return None
    return (e2e_ms - ttft_ms) / (completion_tokens - 1)


def body_measure(body: bytes) -> tuple[dict[str, Any] | None, str]:
    """(usage, first choice's text) of a non-streamed completion body."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None, ""
    if not isinstance(obj, dict):
        return None, ""
    usage = obj.get("usage")
    text = ""
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            text = message["content"]
        elif isinstance(choices[0].get("text"), str):
            text = choices[0]["text"]
    return (usage if isinstance(usage, dict) else None), text


def usage_tokens(usage: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens)."""
    return _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
