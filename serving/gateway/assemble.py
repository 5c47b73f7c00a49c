"""A non-streamed answer built from the engine's stream.

A non-streamed answer's head comes from the engine only when the whole answer is ready, so no timeout on
its first byte could tell a hung engine from a long answer. The gateway asks the engine for a stream
instead (with the usage chunk), times its first event as it does for streams, and builds from the chunks
the body the engine would have sent had it been asked for none: `chat.completion` or `text_completion`,
each choice (n > 1, and a completion's prompts, by `index`) with its text or message (content, reasoning,
tool calls merged by their index), its log-probabilities and its finish and stop reasons, and `usage`.
Fields it does not know are kept (a choice's last non-null value, the response's first) so that what
an engine adds passes through too.

Requests whose answer a stream cannot give (prompt log-probabilities, beam search) or that an engine
would refuse only when not streamed (`stream_options`) are passed through as asked (`needs_whole`).
"""

from __future__ import annotations

import json
from typing import Any

# Chat deltas' text fields, concatenated into the message.
_DELTA_TEXT = ("content", "reasoning", "reasoning_content", "refusal")
_CHOICE_OWN = frozenset(("index", "delta", "text", "logprobs", "finish_reason", "stop_reason", "token_ids"))
_TOP_OWN = frozenset(("id", "object", "created", "model", "choices", "usage"))


def needs_whole(body: dict[str, Any]) -> bool:
    """A non-streamed request to pass through as it is rather than assemble from a stream."""
    best_of, n = body.get("best_of"), body.get("n")
    return bool(
        body.get("prompt_logprobs") is not None
        or body.get("use_beam_search")
        or body.get("stream_options") is not None
        # (What the engine makes of a bad value is its to say: only numbers are compared here.)
        or (type(best_of) is int and best_of > (n if type(n) is int else 1))
    )


class _Choice:
    __slots__ = ("extra", "finish_reason", "logprobs", "role", "stop_reason", "text", "token_ids", "tools")

    def __init__(self) -> None:
        self.role: str | None = None
        self.text: dict[str, list[str]] = {}
        self.tools: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: Any = None
        self.stop_reason: Any = None
        self.token_ids: list[Any] | None = None
        self.extra: dict[str, Any] = {}


class Assembler:
    """Fed each chunk of the engine's stream as `StreamMeter` parses it (`StreamMeter(assembler=...)`: one
    parse per event for both); `body()` is the non-streamed answer."""

    __slots__ = ("_chat", "_choices", "_top", "events", "usage")

    def __init__(self, *, chat: bool) -> None:
        self._chat = chat
        self._choices: dict[int, _Choice] = {}
        self._top: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.events = 0

    def chunk(self, obj: dict[str, Any]) -> None:
        """One chunk of the stream (not an error event: the meter keeps those)."""
        self.events += 1
        top = self._top
        for name, value in obj.items():
            if name not in top and value is not None and name not in ("choices", "usage"):
                top[name] = value
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for raw in choices:
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = _Choice()
            delta = raw.get("delta")
            if isinstance(delta, dict):
                _delta_merge(choice, delta)
            text = raw.get("text")
            if isinstance(text, str):
                choice.text.setdefault("text", []).append(text)
            logprobs = raw.get("logprobs")
            if isinstance(logprobs, dict):
                choice.logprobs = _logprobs_merge(choice.logprobs, logprobs)
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
            if raw.get("stop_reason") is not None:
                choice.stop_reason = raw["stop_reason"]
            token_ids = raw.get("token_ids")
            if isinstance(token_ids, list):
                if choice.token_ids is None:
                    choice.token_ids = []
                choice.token_ids.extend(token_ids)
            for name, value in raw.items():
                if name not in _CHOICE_OWN and value is not None:
                    choice.extra[name] = value

    def text(self, index: int = 0) -> str:
        choice = self._choices.get(index)
        if choice is None:
            return ""
        return "".join(choice.text.get("content" if self._chat else "text", ()))

    def body(self) -> dict[str, Any]:
        top = self._top
        answer: dict[str, Any] = {
            "id": top.get("id", ""),
            "object": "chat.completion" if self._chat else "text_completion",
            "created": top.get("created", 0),
            "model": top.get("model", ""),
            "choices": [self._choice_body(index, self._choices[index]) for index in sorted(self._choices)],
        }
        for name, value in top.items():
            if name not in _TOP_OWN:
                answer[name] = value
        answer["usage"] = self.usage
        return answer

    def _choice_body(self, index: int, choice: _Choice) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if self._chat:
            tools = [_tool_body(choice.tools[i]) for i in sorted(choice.tools)]
            content = "".join(choice.text.get("content", ()))
            message: dict[str, Any] = {
                "role": choice.role or "assistant",
                # A message that only calls tools has no content, as an engine says it non-streamed (its
                # stream's role chunk carries an empty one).
                "content": content if content or not tools else None,
            }
            for name in _DELTA_TEXT[1:]:
                if name in choice.text:
                    message[name] = "".join(choice.text[name])
            if tools:
                message["tool_calls"] = tools
            out["message"] = message
        else:
            out["text"] = "".join(choice.text.get("text", ()))
        out["logprobs"] = choice.logprobs
        out["finish_reason"] = choice.finish_reason
        out["stop_reason"] = choice.stop_reason
        if choice.token_ids is not None:
            out["token_ids"] = choice.token_ids
        out.update(choice.extra)
        return out

    def dumps(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False, separators=(",", ":")).encode()


def _delta_merge(choice: _Choice, delta: dict[str, Any]) -> None:
    role = delta.get("role")
    if isinstance(role, str):
        choice.role = role
    for name in _DELTA_TEXT:
        value = delta.get(name)
        if isinstance(value, str):
            choice.text.setdefault(name, []).append(value)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if not isinstance(call, dict):
                continue
            index = call.get("index", len(choice.tools))
            into = choice.tools.get(index)
            if into is None:
                into = choice.tools[index] = {"id": None, "type": "function", "name": None, "arguments": []}
            if call.get("id"):
                into["id"] = call["id"]
            if call.get("type"):
                into["type"] = call["type"]
            function = call.get("function")
            if isinstance(function, dict):
                if function.get("name"):
                    into["name"] = function["name"]
                if isinstance(function.get("arguments"), str):
                    into["arguments"].append(function["arguments"])


def _tool_body(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call["id"], "type": call["type"],
            "function": {"name": call["name"], "arguments": "".join(call["arguments"])}}


def _logprobs_merge(into: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """A chat choice's `content` (and `refusal`) token lists, a completion's parallel lists: concatenated."""
    if into is None:
        return {name: list(value) if isinstance(value, list) else value for name, value in more.items()}
    for name, value in more.items():
        if isinstance(value, list) and isinstance(into.get(name), list):
            into[name].extend(value)
        elif value is not None or name not in into:
            into[name] = list(value) if isinstance(value, list) else value
    return into
