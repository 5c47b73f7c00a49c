"""Admission control per gateway key: requests per minute, tokens per minute, requests in flight.

Requests and tokens are token buckets holding a minute's worth (a burst of up to the whole limit), refilled
continuously at limit / 60 per second. A request needs one request token, and at least one token left in
the token bucket; its prompt and completion tokens are taken when it ends (so one large request may leave
the bucket below zero, and the key waits until it refills). Over a limit, the request gets 429 in OpenAI's
shape with Retry-After: the time until the bucket allows it, or 1 s for concurrency.

Shared by every gateway process through Redis (one Lua script per admission and per release, on Redis's
own clock) when GATEWAY_LIMITS_REDIS_URL or a Redis broker is configured; in the process otherwise. If
Redis fails, requests are admitted (and the failures counted): the limiter never takes the gateway down.
Keys without limits never reach either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from serving.gateway import metrics
from serving.gateway.errors import RateLimited
from serving.gateway.routing import KeyRoute

log = logging.getLogger(__name__)

# An in-flight entry in Redis lives this long unless renewed (a gateway that died frees its slots then).
LEASE_S = 30.0


@dataclass(frozen=True)
class Refusal:
    limit: str  # rpm | tpm | concurrency
    retry_after_s: float


def refusal_error(key: KeyRoute, refusal: Refusal) -> RateLimited:
    what = {
        "rpm": f"requests per minute ({key.rpm_limit})",
        "tpm": f"tokens per minute ({key.tpm_limit})",
        "concurrency": f"requests in flight at once ({key.max_concurrency})",
    }[refusal.limit]
    return RateLimited(
        f"Rate limit reached for gateway key '{key.name}' on {what}. Try again in {refusal.retry_after_s:.1f} s.",
        retry_after_s=refusal.retry_after_s,
        type_="tokens" if refusal.limit == "tpm" else "requests",
    )


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, capacity: float, now: float) -> None:
        self.tokens = capacity
        self.at = now

    def level(self, capacity: float, now: float) -> float:
        self.tokens = min(capacity, self.tokens + (now - self.at) * capacity / 60.0)
        self.at = now
        return self.tokens


class LocalLimits:
    """One process's own buckets and counts (no Redis)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}

    async def admit(self, key: KeyRoute, request_id: str) -> Refusal | None:
        now = self._clock()
        requests = None
        for limit, capacity, buckets in (("rpm", key.rpm_limit, self._requests), ("tpm", key.tpm_limit, self._tokens)):
            if not capacity:
                continue
            bucket = buckets.setdefault(key.key_hash, _Bucket(capacity, now))
            level = bucket.level(capacity, now)
            if level < 1.0:
                return Refusal(limit, (1.0 - level) * 60.0 / capacity)
            if limit == "rpm":
                requests = bucket
        if key.max_concurrency:
            if self._in_flight.get(key.key_hash, 0) >= key.max_concurrency:
                return Refusal("concurrency", 1.0)
            self._in_flight[key.key_hash] = self._in_flight.get(key.key_hash, 0) + 1
        if requests is not None:
            requests.tokens -= 1.0
        return None

    def release(self, key: KeyRoute, request_id: str, tokens: int) -> None:
        if key.max_concurrency:
            left = self._in_flight.get(key.key_hash, 0) - 1
            if left > 0:
                self._in_flight[key.key_hash] = left
            else:
                self._in_flight.pop(key.key_hash, None)
        if key.tpm_limit and tokens > 0:
            now = self._clock()
            bucket = self._tokens.setdefault(key.key_hash, _Bucket(key.tpm_limit, now))
            bucket.level(key.tpm_limit, now)
            bucket.tokens -= tokens

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, conc, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(v[1]) or cap
  local at = tonumber(v[2]) or now
  return math.min(cap, tokens + math.max(0, now - at) * cap / 60000)
end
local requests = 0
if rpm > 0 then
  requests = level(KEYS[1], rpm)
  if requests < 1 then return {'rpm', math.ceil((1 - requests) * 60000 / rpm)} end
end
if tpm > 0 then
  local tokens = level(KEYS[2], tpm)
  if tokens < 1 then return {'tpm', math.ceil((1 - tokens) * 60000 / tpm)} end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then return {'concurrency', 1000} end
  redis.call('ZADD', KEYS[3], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[3], lease * 2)
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(requests - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
return {'', 0}
"""

_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, spent = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and spent > 0 then
  local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = tonumber(v[1]) or tpm
  local at = tonumber(v[2]) or now
  tokens = math.min(tpm, tokens + math.max(0, now - at) * tpm / 60000) - spent
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
return 0
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
end
return 0
"""


class RedisLimits:
    """Buckets and in-flight sets in Redis, shared by every gateway process that uses the same Redis."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._release = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)
        # In flight here, for lease renewal: request id -> the key's in-flight set.
        self._mine: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._failing = False

    @staticmethod
    def _keys(key: KeyRoute) -> tuple[str, str, str]:
        # One hash tag per gateway key: a cluster keeps a key's three entries in one slot for the scripts.
        tag = "ramp:limits:{" + key.key_hash[:24] + "}"
        return f"{tag}:rpm", f"{tag}:tpm", f"{tag}:inflight"

    async def admit(self, key: KeyRoute, request_id: str) -> Refusal | None:
        try:
            limit, wait_ms = await self._admit(
                keys=self._keys(key),
                args=[
                    key.rpm_limit or 0,
                    key.tpm_limit or 0,
                    key.max_concurrency or 0,
                    request_id,
                    int(LEASE_S * 1000),
                ],
            )
        except Exception as exc:
            self._failed(exc)
            return None
        self._failing = False
        limit = limit.decode() if isinstance(limit, bytes) else str(limit)
        if limit:
            return Refusal(limit, int(wait_ms) / 1000.0)
        if key.max_concurrency:
            self._mine[request_id] = self._keys(key)[2]
        return None

    def release(self, key: KeyRoute, request_id: str, tokens: int) -> None:
        member = request_id if self._mine.pop(request_id, None) is not None else ""
        if not member and not (key.tpm_limit and tokens > 0):
            return
        _, tpm_key, inflight = self._keys(key)
        task = asyncio.get_running_loop().create_task(
            self._release(keys=[tpm_key, inflight], args=[key.tpm_limit or 0, max(0, tokens), member])
        )
        self._tasks.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed(task.exception())

    def _failed(self, exc: BaseException | None) -> None:
        metrics.limiter_errors_total.inc()
        if not self._failing:
            log.warning("the rate limiter's Redis failed; admitting requests meanwhile: %r", exc)
        self._failing = True

    async def start(self) -> None:
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew_leases(), name="gateway-limit-leases"
        )

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            if not self._mine:
                continue
            mine = list(self._mine.items())
            try:
                await self._renew(
                    keys=[k for _, k in mine], args=[int(LEASE_S * 1000), *[r for r, _ in mine]]
                )
            except Exception as exc:
                self._failed(exc)

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        await self._redis.aclose()


Limits = LocalLimits | RedisLimits


def limits_for(redis_url: str) -> Limits:
    return RedisLimits(redis_url) if redis_url else LocalLimits()

