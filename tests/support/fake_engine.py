"""A stand-in for a vLLM engine on loopback: a small asyncio HTTP/1.1 server in a thread of the test process.

The suite's one stand-in for an engine, for what a real one cannot be made to do on demand: stream without
end at wire speed, trickle for 20 s, answer 500, hang before its response head, reset the connection, or
cut a stream after its first events. It speaks just enough of the OpenAI API for the gateway (keep-alive,
Content-Length bodies in, chunked SSE or a JSON body out) and answers by what the last message says:

- "flood": an endless SSE stream, written as fast as the gateway takes it (each write waits for the socket
  to drain, so `flood_bytes` counts what the gateway actually accepted);
- "slow": one token every 50 ms, 400 of them;
- anything else: a short answer, streamed or not as asked.

unless `mode` says otherwise for every request: "error" (500, vLLM's error shape), "hang" (reads the request,
never answers), "reset" (closes the connection on reading it), "cut" (a stream that ends after two events,
without [DONE]). `GET /health` answers `health_status`; `GET /metrics` gives `waiting` as
vllm:num_requests_waiting. Each request's headers are kept in `seen.headers`.

Like vLLM it refuses max_tokens above its context window (2048) with a 400 in its own error shape. It counts
the requests it saw and the streams whose reader went away (`cancelled`), so a test can tell that the gateway
called off the engine request when its client left.
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
    cancelled: int = 0
    flood_bytes: int = 0
    streams_open: int = 0
    probes: int = 0


class FakeEngine:
    def __init__(self, mode: str = "ok") -> None:
        self.seen = Seen()
        self.mode = mode
        self.health_status = 200
        self.waiting = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeEngine:
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the fake engine did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None:
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
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
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
                length = 0
                headers: dict[str, str] = {}
                request_line, *lines = head.decode("latin-1").split("\r\n")
                for line in lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", 0))
                body = json.loads(await reader.readexactly(length)) if length else {}
                if request_line.startswith("GET "):
                    await self._get(request_line.split(" ")[1], writer)
                    continue
                self.seen.requests.append(body)
                self.seen.headers.append(headers)
                if self.mode == "hang":
                    await asyncio.Event().wait()
                if self.mode == "reset":
                    writer.transport.abort()
                    return
                if self.mode == "error":
                    await _json(writer, 500, {"object": "error", "type": "InternalServerError", "param": None,
                                              "code": 500, "message": "EngineCore encountered an issue"})
                    continue
                await self._answer(body, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def _get(self, path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/health":
            self.seen.probes += 1
            writer.write(f"HTTP/1.1 {self.health_status} X\r\ncontent-length: 0\r\n\r\n".encode())
        elif path == "/metrics":
            text = f'vllm:num_requests_waiting{{model_name="fake",engine="0"}} {float(self.waiting)}\n'.encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                         + str(len(text)).encode() + b"\r\n\r\n" + text)
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async def _answer(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > CONTEXT_WINDOW:
            error = {"object": "error", "type": "BadRequestError", "param": None, "code": 400,
                     "message": f"max_tokens ({body['max_tokens']}) is more than the context window ({CONTEXT_WINDOW})"}
            await _json(writer, 400, error)
            return
        messages = body.get("messages") or [{}]
        what = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        if not body.get("stream"):
            await _json(writer, 200, _completion(body, "42"))
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        self.seen.streams_open += 1
        try:
            if what == "flood":
                event = _event(_chunk(body, "x" * 200))
                while True:
                    await _send_chunk(writer, event * 64)
                    self.seen.flood_bytes += len(event) * 64
            count, pause = (400, 0.05) if what == "slow" else (3, 0.0)
            for index in range(count):
                await _send_chunk(writer, _event(_chunk(body, "4")))
                if pause:
                    await asyncio.sleep(pause)
                if self.mode == "cut" and index == 1:
                    writer.transport.abort()
                    raise ConnectionResetError("cut")
            usage = {**_chunk(body, ""), "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": count,
                                                                     "total_tokens": 5 + count}}
            await _send_chunk(writer, _event(usage) + b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            self.seen.cancelled += 1
            raise
        finally:
            self.seen.streams_open -= 1


def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {"id": "cmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def _chunk(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _json(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                 + data)
    await writer.drain()
