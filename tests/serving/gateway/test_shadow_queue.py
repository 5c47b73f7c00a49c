"""The gateway's hand-off of shadow mirrors: in the background, bounded, shed and counted beyond the bound."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import REGISTRY

from serving.gateway.shadow import ShadowQueue
from tests.support.fake_engine import FakeEngine


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_mirrors_beyond_the_backlog_bound_are_shed_and_counted() -> None:
    release = threading.Event()
    handed: list[dict[str, Any]] = []

    def slow_broker(payload: dict[str, Any]) -> None:
        release.wait(5)
        handed.append(payload)

    async def scenario() -> tuple[list[bool], int]:
        with ThreadPoolExecutor(1) as executor:
            queue = ShadowQueue(max_pending=2, executor=executor, enqueue=slow_broker)
            offered = [queue.offer({"request_id": str(n)}) for n in range(5)]
            pending = queue.pending
            release.set()
            while queue.pending:
                await asyncio.sleep(0.01)
        return offered, pending

    shed_before = counter("platform_gateway_shadow_shed_total")
    enqueued_before = counter("platform_gateway_shadow_enqueued_total")
    offered, pending = asyncio.run(scenario())
    # offer() never waits for the broker: two wait in the background, three are shed.
    assert offered == [True, True, False, False, False]
    assert pending == 2
    assert [p["request_id"] for p in handed] == ["0", "1"]
    assert counter("platform_gateway_shadow_shed_total") - shed_before == 3
    assert counter("platform_gateway_shadow_enqueued_total") - enqueued_before == 2


def test_a_broker_failure_is_counted_as_shed() -> None:
    def broken(payload: dict[str, Any]) -> None:
        raise ConnectionError("broker down")

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            queue = ShadowQueue(max_pending=2, executor=executor, enqueue=broken)
            assert queue.offer({"request_id": "x"})
            while queue.pending:
                await asyncio.sleep(0.01)

    shed_before = counter("platform_gateway_shadow_shed_total")
    asyncio.run(scenario())
    assert counter("platform_gateway_shadow_shed_total") - shed_before == 1


def test_a_mirror_carries_the_sessions_hash_as_the_record_stores_it_and_never_the_user(
    standin_engine: Callable[..., FakeEngine],
) -> None:
    """The shadow checks group pairs by session (rollouts.analysis.shadow): the mirror carries the keyed hash
    the request's record holds; the user's own id still never travels for an alias that stores no prompts."""
    from serving.gateway.shadow import shadow_payload_redact
    from tests.serving.gateway.inprocess import CHAT, alias, rows, running, workers

    fake = standin_engine()

    async def scenario() -> tuple[list[Any], list[dict[str, Any]]]:
        async with running(rows(alias(shadow=1.0), workers(1, fake.base_url) + workers(2, fake.base_url, first_id=2))) as gw:
            for body in ({**CHAT, "user": "user-42"}, CHAT):
                assert (await gw.call(body)).status == 200
            while len(gw.mirrors) < 2:
                await asyncio.sleep(0.01)
            return await gw.settled(), gw.mirrors

    records, mirrors = asyncio.run(scenario())
    hashes = {r.request_id: r.session_hash for r in records}
    assert {m["request_id"]: m["session_hash"] for m in mirrors} == hashes
    assert sorted(hashes.values())[0] == "" and len(sorted(hashes.values())[1]) == 32
    sent = json.dumps([shadow_payload_redact(m) for m in mirrors])
    assert "user-42" not in sent and all(h in sent for h in hashes.values())
