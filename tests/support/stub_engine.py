"""A small OpenAI-compatible endpoint that answers like vLLM and can be told to misbehave: what a
static worker may point at, and what the Kubernetes stand-in's pods run. It serves real HTTP on a real
port; the agent cannot tell it from vLLM. Like vLLM with --api-key, it refuses /v1 requests without the
key; completions may be held open (`hold`) to have requests in flight, counted in its running gauge."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _released() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class StubBehaviour:
    served_name: str
    health_status: int = 200
    completion_status: int = 200
    running: int = 0
    waiting: int = 0
    completions: int = 0
    api_key: str = ""
    # While cleared, completions wait for it (they count as running meanwhile).
    hold: threading.Event = field(default_factory=_released)
    keys_seen: list[str] = field(default_factory=list)
    # Azure OpenAI's shape: the key in an `api-key` header, the API under /openai/v1.
    key_header: str = "Authorization"
    prefix: str = ""
    paths_seen: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        """vLLM's --api-key guards /v1 only; /health and /metrics stay open."""
        stub = self.server.behaviour
        stub.paths_seen.append(self.path)
        if stub.prefix:
            if not self.path.startswith(stub.prefix):
                self._send(404, '{"error": "not found"}')
                return True
            self.path = self.path[len(stub.prefix):]
        if not self.path.startswith("/v1") or not stub.api_key:
            return False
        given = self.headers.get(stub.key_header, "")
        stub.keys_seen.append(given)
        expected = f"Bearer {stub.api_key}" if stub.key_header == "Authorization" else stub.api_key
        if given == expected:
            return False
        self._send(401, '{"error": "Unauthorized"}')
        return True

    def do_GET(self) -> None:
        stub = self.server.behaviour
        if self._refused():
            return
        if self.path in ("/health", "/api/version"):
            self._send(stub.health_status, "")
        elif self.path == "/v1/models":
            self._send(
                200, json.dumps({"object": "list", "data": [{"id": stub.served_name, "object": "model"}]})
            )
        elif self.path == "/metrics":
            labels = f'engine="0",model_name="{stub.served_name}"'
            self._send(
                200,
                (
                    f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{labels}}} {stub.running}\n"
                    f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{labels}}} {stub.waiting}\n"
                    f"# TYPE vllm:request_success_total counter\nvllm:request_success_total{{{labels}}} {stub.completions}\n"
                ),
                "text/plain; version=0.0.4",
            )
        else:
            self._send(404, '{"error": "not found"}')

    def do_POST(self) -> None:
        stub = self.server.behaviour
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self._refused():
            return
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._send(404, '{"error": "not found"}')
            return
        if stub.completion_status != 200:
            self._send(stub.completion_status, '{"error": {"message": "EngineCore died"}}')
            return
        with self.server.lock:
            stub.running += 1
        try:
            stub.hold.wait(60)
        finally:
            with self.server.lock:
                stub.running -= 1
                stub.completions += 1
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        if self.path == "/v1/completions":
            body = {
                "id": "c",
                "object": "text_completion",
                "model": stub.served_name,
                "usage": usage,
                "choices": [{"index": 0, "text": "2", "finish_reason": "length"}],
            }
        else:
            body = {
                "id": "c",
                "object": "chat.completion",
                "model": stub.served_name,
                "usage": usage,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "2"}, "finish_reason": "stop"}
                ],
            }
        self._send(200, json.dumps(body))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: StubBehaviour
    lock: threading.Lock


class StubServer:
    """A stub engine listening on `host:port` (port 0: any free one) until `stop()`."""

    def __init__(self, behaviour: StubBehaviour, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = _Server((host, port), _Handler)
        self.server.behaviour = behaviour
        self.server.lock = threading.Lock()
        self.behaviour = behaviour
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.behaviour.hold.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def stub_engine(served_name: str) -> Iterator[tuple[str, StubBehaviour]]:
    """(base URL, behaviour to change while it runs)."""
    server = StubServer(StubBehaviour(served_name=served_name))
    try:
        yield server.url, server.behaviour
    finally:
        server.stop()
