"""Fixtures for the hostile-input tests: a fake engine on loopback and the real gateway process in front of it,
run the way production runs it (uvicorn with config.http_server's head-bounded protocol)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from serving.services import gateway_key_create, route_set
from tests.serving.gateway.conftest import (  # noqa: F401 (gateway_process: the gateway tests' fixture, imported to be used here)
    GatewayProcess,
    gateway_process,
    split,
    static_worker_ready,
    version_register,
)
from tests.support.fake_engine import FakeEngine


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Gateway:
    host: str
    port: int
    pid: int
    key: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connect(self, timeout_s: float = 10.0, *, receive_buffer: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Before connecting, so the advertised window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout_s)
        sock.connect((self.host, self.port))
        return sock

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine().start()
    yield engine
    engine.stop()


@pytest.fixture
def gateway(fake_engine: FakeEngine, gateway_process: Callable[..., GatewayProcess],  # noqa: F811
            tmp_path: Path) -> Callable[..., Gateway]:
    """Alias `adder` on the fake engine and a gateway key; call with settings to start the gateway."""
    version = version_register("adder-v1", tmp_path)
    static_worker_ready(version, fake_engine.base_url)
    route_set(alias_name="adder", split=split(version))
    key = gateway_key_create(name="hostile").raw

    def start(**env: str) -> Gateway:
        process = gateway_process(**{"GATEWAY_RECORD_FLUSH_S": "0.1", **env})
        port = urlsplit(process.url).port
        assert port is not None
        return Gateway(host="127.0.0.1", port=port, pid=process.proc.pid, key=key, log=process.log)

    return start
