"""The gateway mounted on /v1/ of the one ASGI server (`config.asgi`), next to Django."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.services import gateway_key_create, route_set
from tests.serving.gateway.conftest import LOG_DIR, split, version_register
from tests.support.engines import free_port
from tests.support.processes import VENV_BIN, child_process

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def combined(transactional_db: None, tmp_path: Path) -> Iterator[tuple[str, str]]:
    route_set(alias_name="adder", split=split(version_register("adder-v1", tmp_path)))
    key = gateway_key_create(name="tests").raw
    port = free_port()
    args = [str(VENV_BIN / "uvicorn"), "config.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log"]
    proc: subprocess.Popen[bytes]
    with child_process(args, log_path=LOG_DIR / f"combined-{port}.log", ready="Application startup complete",
                       timeout_s=90) as proc:
        assert proc.poll() is None
        yield f"http://127.0.0.1:{port}", key


def test_the_combined_server_routes_v1_to_the_gateway_and_the_rest_to_django(combined: tuple[str, str]) -> None:
    url, key = combined
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, trust_env=False, timeout=30)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == ["adder"]
    # No engine is ready: the gateway (not Django) answers, in OpenAI's shape.
    chat = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, trust_env=False,
                      json={"model": "adder", "messages": [{"role": "user", "content": "1+1"}]}, timeout=30)
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "no_healthy_engine"
    assert httpx.get(url + "/healthz", trust_env=False, timeout=30).json() == {"status": "ok"}
    # Django's /metrics shows the gateway's series: one process, one registry.
    metrics = httpx.get(url + "/metrics", trust_env=False, timeout=30).text
    assert "platform_gateway_route_generation" in metrics
    assert 'platform_gateway_requests_total{alias="adder",arm="baseline",outcome="no_engine"} 1.0' in metrics
