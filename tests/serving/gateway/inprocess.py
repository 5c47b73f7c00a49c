"""The gateway app driven in the test's own event loop: routes from plain rows, records and shadow mirrors
captured in lists, requests made as ASGI calls. For the behaviours of one process (retries, ejection,
admission, affinity) without a database or a server process."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from serving.gateway.app import Gateway
from serving.gateway.config import GatewayConfig
from serving.gateway.records import RecordDraft
from serving.gateway.routing import AliasRow, KeyRow, RouteRows, VersionRow, WorkerRow
from serving.gateway.tracing import Tracing

KEY = "gw_test_key"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()
V1 = VersionRow(id=1, label="adder-v1", served_model_name="adder-v1")
V2 = VersionRow(id=2, label="adder-v2", served_model_name="adder-v2")
CHAT = {"model": "adder", "messages": [{"role": "user", "content": "12+30"}], "max_tokens": 4}


def alias(
    *,
    weight: float = 0.0,
    failover: bool = False,
    store_prompts: bool = False,
    shadow: float = 0.0,
    ttfb: float | None = None,
) -> AliasRow:
    return AliasRow(
        name="adder",
        baseline=V1,
        candidate=V2,
        candidate_weight=weight,
        shadow_rate=shadow,
        rollout_id=7,
        failover_to_candidate=failover,
        store_prompts=store_prompts,
        ttfb_timeout_s=ttfb,
    )


def workers(version: int, *urls: str, first_id: int = 1) -> tuple[WorkerRow, ...]:
    return tuple(
        WorkerRow(id=first_id + i, model_version_id=version, base_url=url, api_key="")
        for i, url in enumerate(urls)
    )


def rows(route: AliasRow, engines: tuple[WorkerRow, ...], *, key: KeyRow | None = None) -> RouteRows:
    return RouteRows(
        version=(1, "t"), aliases=(route,), workers=engines, keys=(key or KeyRow(KEY_HASH, (), name="tests"),)
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Harness:
    gateway: Gateway
    records: list[RecordDraft] = field(default_factory=list)
    mirrors: list[dict[str, Any]] = field(default_factory=list)

    async def call(
        self,
        body: dict[str, Any],
        *,
        path: str = "/v1/chat/completions",
        key: str = KEY,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        return await asgi_post(self.gateway, path, body, key=key, headers=headers)

    async def settled(self) -> list[RecordDraft]:
        """The records once every request's are in (redaction runs in a thread)."""
        while self.gateway.recorder.texts_pending:
            await asyncio.sleep(0.01)
        await self.gateway.recorder.flush_once()
        return self.records

    def attempts(self, request_id: str) -> list[RecordDraft]:
        return sorted((r for r in self.records if r.request_id == request_id), key=lambda r: r.attempt)


@asynccontextmanager
async def running(
    route_rows: RouteRows, *, tracing: Tracing | None = None, **config: Any
) -> AsyncIterator[Harness]:
    settings = replace(GatewayConfig(record_flush_s=0.01, route_poll_s=60.0), **config)
    harness: Harness

    def write(batch: list[RecordDraft]) -> int:
        harness.records.extend(batch)
        return len(batch)

    gateway = Gateway(
        settings,
        rows_loader=lambda: route_rows,
        version_reader=lambda: route_rows.version,
        records_writer=write,
        shadow_enqueue=lambda payload: harness.mirrors.append(payload),
    )
    if tracing is not None:
        gateway.tracing = tracing
    harness = Harness(gateway)
    await gateway.startup()
    try:
        yield harness
    finally:
        await gateway.shutdown()


def timed_out_on_1_then_answered_by_2(records: list[RecordDraft]) -> list[RecordDraft]:
    """Every try that was not the answer timed out waiting for the first event (TTFB timeout 0.3 s) on replica
    1, and every answer came from replica 2; returns the timed-out tries."""
    timed_out = [r for r in records if not r.final]
    assert timed_out and {(r.error_kind, r.status_code, r.engine_worker_id) for r in timed_out} == {
        ("ttfb_timeout", 504, 1)}
    assert all(250 <= (r.e2e_ms or 0) < 1000 for r in timed_out)
    assert {(r.outcome, r.engine_worker_id) for r in records if r.final} == {("ok", 2)}
    return timed_out


async def asgi_post(
    app: Any, path: str, body: dict[str, Any], *, key: str = KEY, headers: dict[str, str] | None = None
) -> Reply:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if key:
        head.append((b"authorization", f"Bearer {key}".encode()))
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": path, "headers": head, "query_string": b""}
    sent = False
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    status, reply_headers, chunks = 0, {}, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, reply_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            reply_headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    return Reply(status, reply_headers, b"".join(chunks))
