"""A stand-in for a vLLM engine: a small asyncio HTTP/1.1 server in a thread of the test process, on a real
port, that the gateway, the engine agent and the Kubernetes stand-in's kubelet cannot tell from vLLM.

The suite's one stand-in for an engine, for what a real one cannot be made to do on demand: stream without
end at wire speed, trickle for 20 s, answer 500, hang before its response head, reset the connection, cut a
stream after its first events, or hold requests open so that they count as running. It speaks just enough of
the OpenAI API (keep-alive, Content-Length bodies in, chunked SSE or a JSON body out) and answers by what the
last message says:

- "flood": an endless SSE stream, written as fast as the gateway takes it (each write waits for the socket
  to drain, so `flood_bytes` counts what the gateway actually accepted);
- "slow": one token every 50 ms, 400 of them;
- "paced": `paced_tokens` tokens `paced_pause_s` apart, streamed or not as asked, shaped as vLLM shapes
  them (a role chunk, `finish_reason` on the last token, `n` choices, log-probabilities when asked, a tool
  call when the request offers tools, the usage chunk when asked), and not streamed, the very answer the
  stream adds up to, sent once it is complete;
- anything else: a short answer, streamed or not as asked.

unless `mode` says otherwise for every request: "error" (500, vLLM's error shape), "hang" (reads the request,
never answers), "mute" (a stream's head, then nothing: an API server whose engine core hangs; a non-streamed
request just hangs), "reset" (closes the connection on reading it), "cut" (a stream that ends after two events,
without [DONE]). While `hold` is cleared, answers wait for it and count in `running`.

Like vLLM it serves `GET /health` (`health_status`; Ollama's `/api/version` too), `/v1/models` (its
`served_name`) and `/metrics` (`running`, `waiting` and the answers given as vllm:num_requests_running,
vllm:num_requests_waiting and vllm:request_success_total); with an `api_key` it refuses /v1 requests without
it (401), in `key_header` (Azure OpenAI's `api-key`, or a bearer token), and a `prefix` puts the whole API
under a path (Azure's `/openai`). Like vLLM it refuses max_tokens above its context window (2048) with a 400.

What it saw is in `seen`: each request's body and headers, every path asked for, the keys given, the probes
of /health, and the streams whose reader went away (`cancelled`), so a test can tell that the gateway called
off the engine request when its client left.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

CONTEXT_WINDOW = 2048


@dataclass
class Seen:
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the key header's value on each /v1 request
    cancelled: int = 0
    flood_bytes: int = 0
    streams_open: int = 0
    probes: int = 0
    completions: int = 0  # answers given (200) to completion requests


def _released() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


class FakeEngine:
    def __init__(
        self,
        mode: str = "ok",
        *,
        served_name: str = "fake",
        api_key: str = "",
        key_header: str = "Authorization",
        prefix: str = "",
        health_status: int = 200,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.seen = Seen()
        self.mode = mode
        self.served_name = served_name
        self.api_key = api_key
        self.key_header = key_header.lower()
        self.prefix = prefix
        self.health_status = health_status
        self.running = 0
        self.waiting = 0
        self.hold = _released()
        self.paced_tokens = 20
        self.paced_pause_s = 0.0
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeEngine:
        """Listen (raises what binding raised, e.g. an address in use); returns self."""
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the fake engine did not start")
        if self._start_error is not None:
            self._thread.join(10)
            raise self._start_error
        return self

    def stop(self) -> None:
        self.hold.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._halt, loop)
        if self._thread is not None:
            self._thread.join(10)

    def wait_for(self, predicate: Any, timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.seen):
                return True
            time.sleep(0.05)
        return bool(predicate(self.seen))

    # --- the server -------------------------------------------------------------------------------

    @staticmethod
    def _halt(loop: asyncio.AbstractEventLoop) -> None:
        # Connections still open (a hanging answer) end now, not when their loop is already gone.
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.call_soon(loop.stop)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._connection, self.host, self.port))
        except BaseException as exc:
            self._start_error = exc
            loop.close()
            self._started.set()
            return
        self._loop = loop
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            loop.run_forever()
            loop.run_until_complete(asyncio.sleep(0))  # let the cancelled connections finish
        finally:
            self._server.close()
            loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                headers: dict[str, str] = {}
                request_line, *lines = head.decode("latin-1").split("\r\n")
                for line in lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", 0))
                raw = await reader.readexactly(length) if length else b""
                method, path = request_line.split(" ")[:2]
                self.seen.paths.append(path)
                if self.prefix:
                    if not path.startswith(self.prefix):
                        await _json(writer, 404, {"error": "not found"})
                        continue
                    path = path[len(self.prefix):]
                if path.startswith("/v1") and self.api_key and not self._key_given(headers):
                    await _json(writer, 401, {"error": "Unauthorized"})
                    continue
                if method == "GET":
                    await self._get(path, writer)
                    continue
                if path not in ("/v1/completions", "/v1/chat/completions"):
                    await _json(writer, 404, {"error": "not found"})
                    continue
                body = json.loads(raw) if raw else {}
                self.seen.requests.append(body)
                self.seen.headers.append(headers)
                if self.mode == "mute" and body.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    await writer.drain()
                if self.mode in ("hang", "mute"):
                    await asyncio.Event().wait()
                if self.mode == "reset":
                    writer.transport.abort()
                    return
                if self.mode == "error":
                    await _json(writer, 500, {"object": "error", "type": "InternalServerError", "param": None,
                                              "code": 500, "message": "EngineCore encountered an issue"})
                    continue
                await self._held()
                await self._answer(path, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    def _key_given(self, headers: dict[str, str]) -> bool:
        given = headers.get(self.key_header, "")
        self.seen.keys.append(given)
        return given == (f"Bearer {self.api_key}" if self.key_header == "authorization" else self.api_key)

    async def _held(self) -> None:
        """While `hold` is cleared, the request waits (up to a minute), counted as running."""
        if self.hold.is_set():
            return
        self.running += 1
        try:
            deadline = time.monotonic() + 60
            while not self.hold.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self.running -= 1

    async def _get(self, path: str, writer: asyncio.StreamWriter) -> None:
        if path in ("/health", "/api/version"):
            self.seen.probes += 1
            writer.write(f"HTTP/1.1 {self.health_status} X\r\ncontent-length: 0\r\n\r\n".encode())
            await writer.drain()
        elif path == "/v1/models":
            await _json(writer, 200, {"object": "list", "data": [{"id": self.served_name, "object": "model"}]})
        elif path == "/metrics":
            labels = f'engine="0",model_name="{self.served_name}"'
            text = (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{labels}}} {float(self.running)}\n"
                    f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{labels}}} {float(self.waiting)}\n"
                    f"# TYPE vllm:request_success_total counter\n"
                    f"vllm:request_success_total{{{labels}}} {float(self.seen.completions)}\n").encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: "
                         + str(len(text)).encode() + b"\r\n\r\n" + text)
            await writer.drain()
        else:
            await _json(writer, 404, {"error": "not found"})

    async def _answer(self, path: str, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > CONTEXT_WINDOW:
            error = {"object": "error", "type": "BadRequestError", "param": None, "code": 400,
                     "message": f"max_tokens ({body['max_tokens']}) is more than the context window ({CONTEXT_WINDOW})"}
            await _json(writer, 400, error)
            return
        chat = path == "/v1/chat/completions"
        messages = body.get("messages") or [{}]
        what = messages[-1].get("content") if chat and isinstance(messages[-1], dict) else None
        if what == "paced" or (not chat and body.get("prompt") == "paced"):
            await self._paced(body, writer, chat=chat)
            return
        if not body.get("stream"):
            self.seen.completions += 1
            await _json(writer, 200, _completion(body, "42", chat=chat))
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        self.seen.streams_open += 1
        try:
            if what == "flood":
                event = _event(_chunk(body, "x" * 200, chat=chat))
                while True:
                    await _send_chunk(writer, event * 64)
                    self.seen.flood_bytes += len(event) * 64
            count, pause = (400, 0.05) if what == "slow" else (3, 0.0)
            for index in range(count):
                await _send_chunk(writer, _event(_chunk(body, "4", chat=chat)))
                if pause:
                    await asyncio.sleep(pause)
                if self.mode == "cut" and index == 1:
                    writer.transport.abort()
                    raise ConnectionResetError("cut")
            usage = {**_chunk(body, "", chat=chat), "choices": [],
                     "usage": {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count}}
            await _send_chunk(writer, _event(usage) + b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.seen.completions += 1
        except ConnectionError:
            self.seen.cancelled += 1
            raise
        finally:
            self.seen.streams_open -= 1


    async def _paced(self, body: dict[str, Any], writer: asyncio.StreamWriter, *, chat: bool) -> None:
        n = body.get("n") or 1
        tokens = [str(i % 10) for i in range(self.paced_tokens)]
        tool = chat and bool(body.get("tools"))
        pieces = ['{"x": "', *tokens, '"}'] if tool else tokens
        finish = "tool_calls" if tool else "length"
        logprobs = bool(body.get("logprobs"))
        head = {"id": "cmpl-paced", "created": 1700000000, "model": body.get("model")}
        usage = {"prompt_tokens": 5, "total_tokens": 5 + n * len(pieces), "completion_tokens": n * len(pieces),
                 "prompt_tokens_details": None}
        if not body.get("stream"):
            await asyncio.sleep(self.paced_pause_s * len(pieces))
            choices = []
            for index in range(n):
                choice: dict[str, Any] = {"index": index}
                if chat:
                    choice["message"] = (
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "call_0", "type": "function",
                             "function": {"name": "f", "arguments": "".join(pieces)}}]}
                        if tool else {"role": "assistant", "content": "".join(pieces)})
                else:
                    choice["text"] = "".join(pieces)
                choice["logprobs"] = _logprobs(pieces, 0, chat=chat) if logprobs else None
                choices.append({**choice, "finish_reason": finish, "stop_reason": None})
            self.seen.completions += 1
            await _json(writer, 200, {**head, "object": "chat.completion" if chat else "text_completion",
                                      "choices": choices, "usage": usage})
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        top = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if chat:
            for index in range(n):
                await _send_chunk(writer, _event({**top, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]}))
        offset = 0
        for position, piece in enumerate(pieces):
            last = position == len(pieces) - 1
            for index in range(n):
                choice = {"index": index}
                if tool:
                    call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
                    if position == 0:
                        call = {"index": 0, "id": "call_0", "type": "function",
                                "function": {"name": "f", "arguments": piece}}
                    choice["delta"] = {"tool_calls": [call]}
                elif chat:
                    choice["delta"] = {"content": piece}
                else:
                    choice["text"] = piece
                choice["logprobs"] = _logprobs([piece], offset, chat=chat) if logprobs else None
                choice["finish_reason"] = finish if last else None
                if last:
                    choice["stop_reason"] = None
                await _send_chunk(writer, _event({**top, "choices": [choice]}))
            offset += len(piece)
            if self.paced_pause_s:
                await asyncio.sleep(self.paced_pause_s)
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await _send_chunk(writer, _event({**top, "choices": [], "usage": usage}))
        await _send_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self.seen.completions += 1


def _logprobs(pieces: list[str], offset: int, *, chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": [{"token": p, "logprob": -0.5, "bytes": list(p.encode()), "top_logprobs": []}
                            for p in pieces]}
    offsets = []
    for p in pieces:
        offsets.append(offset)
        offset += len(p)
    return {"text_offset": offsets, "token_logprobs": [-0.5] * len(pieces), "tokens": list(pieces),
            "top_logprobs": [{p: -0.5} for p in pieces]}


def _completion(body: dict[str, Any], text: str, *, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if chat else {"index": 0, "text": text, "finish_reason": "length"}
    )
    return {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion", "created": 0,
            "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def _chunk(body: dict[str, Any], text: str, *, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = (
        {"index": 0, "delta": {"content": text}, "finish_reason": None} if chat
        else {"index": 0, "text": text, "finish_reason": None}
    )
    return {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
            "model": body.get("model"), "choices": [choice]}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}


async def _json(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
