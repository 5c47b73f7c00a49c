"""docker-compose.yml, parsed, for the mistakes that kept the production-shaped stack from working."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_engines_listen_where_the_gateway_containers_can_reach_them(services: dict[str, Any]) -> None:
    agent = _env(services["engine-agent"])
    assert agent["ENGINE_BIND_HOST"] == "0.0.0.0"  # not the agent container's own loopback
    assert agent["ENGINE_PUBLIC_HOST"] == "engine-agent"  # a name the other containers resolve
    assert agent["ENGINE_BUILD"] == "cuda" and services["engine-agent"]["build"]["args"]["ENGINE"] == "gpu"
    devices = services["engine-agent"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_gateway_replicas_do_not_clash_on_a_host_port(services: dict[str, Any]) -> None:
    for port in services["gateway"].get("ports") or []:
        host = str(port).rsplit(":", 1)[0] if ":" in str(port) else ""
        assert "-" in host or not host, f"a fixed host port {port!r} lets only one gateway replica start"


def test_a_worker_created_through_the_api_defaults_to_a_host_an_agent_serves(
    services: dict[str, Any],
) -> None:
    agent_host = _env(services["engine-agent"])["ENGINE_AGENT_HOST"]
    for name in ("web", "worker", "engine-agent"):
        assert _env(services[name])["ENGINE_AGENT_HOST"] == agent_host, name
    command = services["engine-agent"]["command"]
    assert "--host-name" not in command  # so ENGINE_AGENT_HOST decides, the same value everywhere


def test_the_app_waits_for_its_migrations(services: dict[str, Any]) -> None:
    for name in ("web", "gateway", "worker", "beat", "engine-agent"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, (
            name
        )
