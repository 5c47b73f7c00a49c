"""Every error the gateway answers itself, in OpenAI's shape, from a real gateway process (no engine needed)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serving.models import RequestRecord
from serving.services import gateway_key_create, route_set
from tests.serving.gateway.conftest import (
    REQUEST_ID,
    GatewayProcess,
    records_wait,
    split,
    static_worker_ready,
    version_register,
)
from tests.support.engines import free_port

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "adder", "messages": [{"role": "user", "content": "12+30"}], "max_tokens": 4}


class _Broken(BaseHTTPRequestHandler):
    """An 'engine' that answers every completion with 500."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}}'
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def broken_engine() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def error_of(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
def gateway(gateway_process: Callable[..., GatewayProcess], broken_engine: str, tmp_path: Path) -> GatewayProcess:
    """Aliases: `adder` (engine answers 500), `nobody` (no ready engine), `refused` (engine not listening),
    `refused-fo` (the same, failover to a candidate that answers 500); a key for all, a key for `nobody` only."""
    v1 = version_register("adder-v1", tmp_path)
    v2 = version_register("adder-v2", tmp_path)
    v3 = version_register("adder-v3", tmp_path)
    static_worker_ready(v1, broken_engine)
    static_worker_ready(v3, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    route_set(alias_name="adder", split=split(v1))
    route_set(alias_name="nobody", split=split(v2))
    route_set(alias_name="refused", split=split(v3, v1, weight=0.0, failover=False))
    route_set(alias_name="refused-fo", split=split(v3, v1, weight=0.0, failover=True))
    key = gateway_key_create(name="all").raw
    process = gateway_process(GATEWAY_MAX_BODY_BYTES="2048")
    process.key = key
    return process


def test_bad_bodies_get_400_naming_the_field(gateway: GatewayProcess) -> None:
    client = gateway.client()
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"

    response = client.post("/v1/chat/completions", json={"model": "adder"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "messages"

    response = client.post("/v1/chat/completions", json={**CHAT, "model": 7})
    assert (response.status_code, error_of(response)["param"]) == (400, "model")

    response = client.post("/v1/completions", json={"model": "adder"})
    assert (response.status_code, error_of(response)["param"]) == (400, "prompt")

    response = client.post("/v1/chat/completions", json={**CHAT, "stream": "yes"})
    assert (response.status_code, error_of(response)["param"]) == (400, "stream")


def test_missing_or_wrong_keys_get_401(gateway: GatewayProcess) -> None:
    response = gateway.client(key="").post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"
    response = gateway.client(key="gw_not-a-real-key").post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    assert gateway.client(key="").get("/v1/models").status_code == 401


def test_unknown_aliases_and_aliases_outside_the_key_get_404(gateway: GatewayProcess) -> None:
    response = gateway.client().post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"})
    assert response.status_code == 404
    assert error_of(response)["param"] == "model"
    assert error_of(response)["code"] == "model_not_found"

    limited = gateway_key_create(name="limited", aliases=["nobody"]).raw
    gateway.wait_for_generation(_generation())
    response = gateway.client(key=limited).post("/v1/chat/completions", json=CHAT)
    assert (response.status_code, error_of(response)["param"]) == (404, "model")
    listed = gateway.client(key=limited).get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["nobody"]
    listed = gateway.client().get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["adder", "nobody", "refused", "refused-fo"]


def test_a_body_over_the_limit_gets_413(gateway: GatewayProcess) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "1" * 4000}]}
    response = gateway.client().post("/v1/chat/completions", json=big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"


def test_an_engine_failing_gets_502_and_is_recorded_as_an_engine_error(gateway: GatewayProcess) -> None:
    response = gateway.client().post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    error = error_of(response)
    assert error["type"] == "server_error"
    assert "500" in str(error["message"])
    assert response.headers["x-rollout-arm"] == "baseline"
    assert response.headers["x-model-version"] == "adder-v1"
    request_id = response.headers["x-request-id"]
    assert REQUEST_ID.match(request_id)
    (record,) = records_wait(1, request_id=request_id)
    assert (record.status_code, record.outcome, record.arm) == (502, RequestRecord.Outcome.ENGINE_ERROR, "baseline")


def test_no_healthy_engine_gets_503(gateway: GatewayProcess) -> None:
    response = gateway.client().post("/v1/chat/completions", json={**CHAT, "model": "nobody"})
    assert response.status_code == 503
    assert error_of(response)["code"] == "no_healthy_engine"
    assert "no ready engine" in str(error_of(response)["message"])

    # The only engine refuses the connection and the alias may not fail over: 503 that says so.
    response = gateway.client().post("/v1/chat/completions", json={**CHAT, "model": "refused"})
    assert response.status_code == 503
    message = str(error_of(response)["message"])
    assert "refused" in message and "failover to the candidate is off" in message
    (record,) = records_wait(1, request_id=response.headers["x-request-id"])
    # A refused connection is the engine's failure: an engine error, and the client's answer (final).
    assert (record.outcome, record.error_kind, record.status_code, record.failover, record.final) == (
        RequestRecord.Outcome.ENGINE_ERROR, "connect_refused", 503, False, True)

    # Allowed to fail over: the candidate takes it (and here answers 500, so the client sees 502). Each try
    # is its own record: the refusal against the baseline, the 500 against the candidate.
    response = gateway.client().post("/v1/chat/completions", json={**CHAT, "model": "refused-fo"})
    assert response.status_code == 502
    assert response.headers["x-rollout-arm"] == "candidate"
    refused, failed = records_wait(2, request_id=response.headers["x-request-id"])
    assert (refused.attempt, refused.arm, refused.error_kind, refused.failover, refused.final) == (
        1, "baseline", "connect_refused", False, False)
    assert (failed.attempt, failed.arm, failed.error_kind, failed.failover, failed.final, failed.status_code) == (
        2, "candidate", "http_500", True, True, 502)
    assert {refused.assigned_arm, failed.assigned_arm} == {"baseline"}


def test_metrics_count_what_the_gateway_did(gateway: GatewayProcess) -> None:
    gateway.client(key="").post("/v1/chat/completions", json=CHAT)
    gateway.client().post("/v1/chat/completions", json={**CHAT, "model": "nobody"})
    assert gateway.metric("platform_gateway_rejected_total", status="401") == 1
    assert gateway.metric("platform_gateway_requests_total", alias="nobody", arm="baseline", outcome="no_engine") == 1
    assert gateway.metric("platform_gateway_route_generation") == _generation()


def _generation() -> int:
    from tests.serving.gateway.conftest import route_generation

    return route_generation()


def test_error_bodies_are_json_even_for_unknown_paths(gateway: GatewayProcess) -> None:
    response = gateway.client().get("/v1/embeddings")
    assert response.status_code in (404, 405)
    assert json.loads(response.content)["error"]["message"]
