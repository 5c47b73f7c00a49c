"""Admission control per gateway key (requests, tokens, concurrency) and the engines' own queue bound, in
one gateway process; two processes sharing a key's limits through Redis are in
tests/faults/test_gateway_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from serving.gateway.admission import LocalLimits
from serving.gateway.routing import KeyRoute, KeyRow
from tests.serving.gateway.inprocess import CHAT, KEY_HASH, alias, rows, running, workers
from tests.support.fake_engine import FakeEngine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(**limits: int) -> KeyRoute:
    return KeyRoute(key_hash="k", name="shop", allowed=None, **limits)  # type: ignore[arg-type]


def test_requests_per_minute_is_a_bucket_of_a_minutes_worth_refilled_continuously() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    shop = key(rpm_limit=60)

    async def scenario() -> None:
        for n in range(60):
            assert await limits.admit(shop, f"r{n}") is None
        refused = await limits.admit(shop, "r60")
        assert refused is not None and refused.limit == "rpm" and refused.retry_after_s == pytest.approx(1.0)
        clock.now += 0.5
        refused = await limits.admit(shop, "r61")
        assert refused is not None and refused.retry_after_s == pytest.approx(0.5)
        clock.now += 0.5
        assert await limits.admit(shop, "r62") is None  # one per second comes back

    asyncio.run(scenario())


def test_tokens_are_charged_when_the_request_ends_and_block_until_they_refill() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    shop = key(tpm_limit=600)  # 10 tokens a second

    async def scenario() -> None:
        assert await limits.admit(shop, "a") is None
        limits.release(shop, "a", 650)  # a big answer: the bucket goes 50 below zero
        refused = await limits.admit(shop, "b")
        assert refused is not None and refused.limit == "tpm" and refused.retry_after_s == pytest.approx(5.1)
        clock.now += 5.1
        assert await limits.admit(shop, "b") is None

    asyncio.run(scenario())


def test_concurrency_counts_requests_in_flight() -> None:
    limits = LocalLimits(Clock())
    shop = key(max_concurrency=2)

    async def scenario() -> None:
        assert await limits.admit(shop, "a") is None
        assert await limits.admit(shop, "b") is None
        refused = await limits.admit(shop, "c")
        assert refused is not None and refused.limit == "concurrency" and refused.retry_after_s == 1.0
        limits.release(shop, "a", 0)
        assert await limits.admit(shop, "c") is None

    asyncio.run(scenario())


@pytest.fixture
def fake(standin_engine: Callable[..., FakeEngine]) -> FakeEngine:
    return standin_engine()


def test_over_its_limit_a_key_gets_429_in_openais_shape_with_retry_after(fake: FakeEngine) -> None:
    limited = KeyRow(KEY_HASH, (), name="shop", rpm_limit=2)
    table = rows(alias(), workers(1, fake.base_url), key=limited)

    async def scenario() -> None:
        async with running(table) as gw:
            assert (await gw.call(CHAT)).status == 200
            assert (await gw.call(CHAT)).status == 200
            refused = await gw.call(CHAT)
            assert refused.status == 429
            error = refused.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
            assert "gateway key 'shop'" in error["message"] and "requests per minute (2)" in error["message"]
            assert refused.headers["retry-after"] == "30"  # two a minute: one every 30 s
            assert 29000 < int(refused.headers["retry-after-ms"]) <= 30000
            assert len(refused.headers["x-request-id"]) == 24
            # Refused before routing: the engine never saw it, and no record of an attempt was left.
            await gw.settled()
            assert len(fake.seen.requests) == 2 and len(gw.records) == 2

    asyncio.run(scenario())


def test_a_replica_whose_engine_queue_is_full_takes_no_more(fake: FakeEngine) -> None:
    table = rows(alias(), workers(1, fake.base_url))

    async def scenario() -> None:
        async with running(table, max_queued_per_replica=8, queue_poll_s=0.05) as gw:
            assert (await gw.call(CHAT)).status == 200
            fake.waiting = 8
            replica = gw.gateway.table.replicas[1]
            while replica.queued() != 8:
                await asyncio.sleep(0.02)
            refused = await gw.call(CHAT)
            assert refused.status == 429 and refused.json()["error"]["code"] == "engine_overloaded"
            assert refused.headers["retry-after"] == "1"
            fake.waiting = 2
            while replica.queued() != 2:
                await asyncio.sleep(0.02)
            assert (await gw.call(CHAT)).status == 200

    asyncio.run(scenario())
