"""A stand-in for an engine that does no work: it answers every chat completion with a stream of `--tokens`
tokens (role chunk, one chunk per token, the usage chunk, [DONE]), each event its own write with a turn of
the event loop between them, as an engine sends them, but with no time between; so what a proxy in front of
it costs is all that is left to measure (`benchmarks/gateway.py --mode overhead`).

    .venv/bin/python benchmarks/standin_engine.py --port 8100 [--tokens 16]

HTTP/1.1 keep-alive, Content-Length request bodies, chunked responses; `GET /health` and `GET /v1/models`.
"""

from __future__ import annotations

import argparse
import asyncio
import json

_MODELS = b'{"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]}'


def _stream(model: str, tokens: int) -> list[bytes]:
    """The answer's chunks, pre-built per model name: chunked SSE events, as vLLM writes them."""

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
        return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": "7"}) for _ in range(tokens - 1)]
    events.append(chunk({"content": "7"}, "length"))
    events.append({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}})
    out = []
    for event in events:
        data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        out.append(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    done = b"data: [DONE]\n\n"
    out.append(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
    return out


class Standin:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self._answers: dict[str, list[bytes]] = {}

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                if head.startswith(b"GET "):
                    payload = _MODELS if head.startswith(b"GET /v1/models") else b"{}"
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                    continue
                model = json.loads(body).get("model", "bench") if body else "bench"
                answer = self._answers.get(model)
                if answer is None:
                    answer = self._answers[model] = _stream(model, self.tokens)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for part in answer:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def serve(port: int, tokens: int) -> None:
    standin = Standin(tokens)
    server = await asyncio.start_server(standin.connection, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.tokens))


if __name__ == "__main__":
    main()
