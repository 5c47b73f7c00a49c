"""Admission control per gateway key (requests, tokens, concurrency) and the engines' own queue bound, in
one gateway process, and shared by two limiters on one Redis as two gateway processes share them (two real
gateway processes sharing a key's limit are in tests/faults/test_gateway_faults.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from serving.gateway.admission import LocalLimits, RedisLimits
from serving.gateway.routing import KeyRoute, KeyRow
from tests.serving.gateway.inprocess import CHAT, KEY_HASH, alias, rows, running, workers
from tests.support.engines import free_port
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


# --- shared through Redis, as several gateway processes share them ---------------------------------------


def redis_url() -> str:
    from django.conf import settings

    url = settings.GATEWAY_LIMITS_REDIS_URL
    if not url:
        pytest.skip("needs Redis (CI's CELERY_BROKER_URL, or GATEWAY_LIMITS_REDIS_URL)")
    return url


def shared_key(**limits: int) -> KeyRoute:
    import secrets

    return KeyRoute(key_hash=secrets.token_hex(32), name="shop", allowed=None, **limits)  # type: ignore[arg-type]


def two_gateways(scenario: Callable[[RedisLimits, RedisLimits], Awaitable[None]]) -> None:
    """Run `scenario` with two limiters on one Redis, as two gateway processes have them."""

    async def run() -> None:
        first, second = RedisLimits(redis_url()), RedisLimits(redis_url())
        await first.start()
        await second.start()
        try:
            await scenario(first, second)
        finally:
            await first.stop()
            await second.stop()

    asyncio.run(run())


def test_two_gateways_share_one_bucket_of_requests() -> None:
    shop = shared_key(rpm_limit=4)

    async def scenario(first: RedisLimits, second: RedisLimits) -> None:
        admitted = [await (first if n % 2 else second).admit(shop, f"r{n}") for n in range(4)]
        assert admitted == [None] * 4
        refused = await first.admit(shop, "r4")
        assert refused is not None and refused.limit == "rpm" and 14.0 < refused.retry_after_s <= 15.0
        refused = await second.admit(shop, "r5")
        assert refused is not None and refused.limit == "rpm"

    two_gateways(scenario)


def test_two_gateways_share_a_keys_requests_in_flight_and_its_tokens() -> None:
    shop = shared_key(max_concurrency=2, tpm_limit=60)

    async def scenario(first: RedisLimits, second: RedisLimits) -> None:
        assert await first.admit(shop, "a") is None
        assert await second.admit(shop, "b") is None
        refused = await first.admit(shop, "c")
        assert refused is not None and refused.limit == "concurrency"
        first.release(shop, "a", 90)  # ends, having used 90 tokens: 30 below a minute's worth
        await asyncio.wait(list(first._tasks))
        refused = await second.admit(shop, "c")
        assert refused is not None and refused.limit == "tpm" and 30.0 < refused.retry_after_s <= 31.0

    two_gateways(scenario)


def test_the_slots_of_a_gateway_that_died_are_freed_when_their_lease_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.gateway.admission

    monkeypatch.setattr(serving.gateway.admission, "LEASE_S", 0.6)
    shop = shared_key(max_concurrency=1)

    async def scenario(alive: RedisLimits, dead: RedisLimits) -> None:
        assert await alive.admit(shop, "held") is None  # held past its lease: renewed while in flight
        await asyncio.sleep(1.0)
        refused = await dead.admit(shop, "x")
        assert refused is not None and refused.limit == "concurrency"
        alive.release(shop, "held", 0)
        await asyncio.wait(list(alive._tasks))
        assert await dead.admit(shop, "gone") is None
        await dead.stop()  # dies without releasing: the slot comes back once its lease ends
        await asyncio.sleep(0.8)
        assert await alive.admit(shop, "next") is None

    two_gateways(scenario)


def test_with_redis_unreachable_requests_are_admitted_and_the_failures_counted() -> None:
    from prometheus_client import REGISTRY

    shop = shared_key(rpm_limit=1)
    before = REGISTRY.get_sample_value("platform_gateway_limiter_errors_total") or 0.0

    async def scenario() -> None:
        limits = RedisLimits(f"redis://127.0.0.1:{free_port()}/0")
        try:
            assert [await limits.admit(shop, f"r{n}") for n in range(3)] == [None] * 3
        finally:
            await limits.stop()

    asyncio.run(scenario())
    assert (REGISTRY.get_sample_value("platform_gateway_limiter_errors_total") or 0.0) - before == 3
