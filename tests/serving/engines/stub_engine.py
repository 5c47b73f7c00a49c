"""A small OpenAI-compatible endpoint that answers like vLLM and can be told to misbehave: what a
static worker may point at. It serves real HTTP on a real port; the agent cannot tell it from vLLM."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class StubBehaviour:
    served_name: str
    health_status: int = 200
    completion_status: int = 200
    running: int = 0
    waiting: int = 0
    completions: int = 0


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

    def do_GET(self) -> None:
        stub = self.server.behaviour
        if self.path == "/health":
            self._send(stub.health_status, "")
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": stub.served_name, "object": "model"}]}))
        elif self.path == "/metrics":
            labels = f'engine="0",model_name="{stub.served_name}"'
            self._send(200, (
                f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{labels}}} {stub.running}\n"
                f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{labels}}} {stub.waiting}\n"
                f"# TYPE vllm:request_success_total counter\nvllm:request_success_total{{{labels}}} {stub.completions}\n"
            ), "text/plain; version=0.0.4")
        else:
            self._send(404, '{"error": "not found"}')

    def do_POST(self) -> None:
        stub = self.server.behaviour
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/completions":
            self._send(404, '{"error": "not found"}')
        elif stub.completion_status != 200:
            self._send(stub.completion_status, '{"error": {"message": "EngineCore died"}}')
        else:
            stub.completions += 1
            self._send(200, json.dumps({"id": "c", "object": "text_completion",
                                        "choices": [{"index": 0, "text": "2", "finish_reason": "length"}]}))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: StubBehaviour


@contextmanager
def stub_engine(served_name: str) -> Iterator[tuple[str, StubBehaviour]]:
    """(base URL, behaviour to change while it runs)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.behaviour = StubBehaviour(served_name=served_name)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.behaviour
    finally:
        server.shutdown()
        server.server_close()
