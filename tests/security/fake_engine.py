"""A stand-in for a vLLM engine on loopback: a small asyncio HTTP/1.1 server in a thread of the test process.

It speaks just enough of the OpenAI API for the gateway (keep-alive, Content-Length bodies in, chunked SSE or
a JSON body out) and answers by what the last message says:

- "flood": an endless SSE stream, written as fast as the gateway takes it (each write waits for the socket
  to drain, so `flood_bytes` counts what the gateway actually accepted);
- "slow": one token every 50 ms, 400 of them;
- anything else: a short answer, streamed or not as asked.

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
    cancelled: int = 0
    flood_bytes: int = 0
    streams_open: int = 0


class FakeEngine:
    def __init__(self) -> None:
        self.seen = Seen()
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
            loop.call_soon_threadsafe(loop.stop)
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

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            loop.run_forever()
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
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = json.loads(await reader.readexactly(length)) if length else {}
                self.seen.requests.append(body)
                await self._answer(body, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

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
            for _ in range(count):
                await _send_chunk(writer, _event(_chunk(body, "4")))
                if pause:
                    await asyncio.sleep(pause)
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
    reason = {200: "OK", 400: "Bad Request"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                 + data)
    await writer.drain()
