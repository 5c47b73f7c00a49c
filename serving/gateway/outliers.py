"""Outlier ejection: a replica that keeps failing leaves this gateway process's routing for a while.

`eject_after` failures in a row (refused, reset, 5xx or timed out before the first byte, or a stream cut)
take a replica out for `base_s`, doubled for each ejection that follows soon after the last one (up to
`max_s`). When its time is up it stays out until a probe of its `/health` answers 200: only then does it
take traffic again. The engine agent's health checks take a dead engine out of every gateway within
10-30 s; this takes a misbehaving one out of this gateway after a few requests.

Pure bookkeeping on `Replica` objects, touched only on the event loop's thread; `OutlierProbe` runs the
probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.gateway import metrics
from serving.gateway.routing import Replica
from serving.gateway.upstream import UpstreamPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutlierPolicy:
    eject_after: int = 3
    base_s: float = 5.0
    max_s: float = 300.0

    def failed(self, replica: Replica, now: float) -> bool:
        """Count a failure; True when it ejected the replica."""
        replica.consecutive_failures += 1
        if replica.ejected_until is not None or replica.consecutive_failures < self.eject_after:
            return False
        # An ejection long after the last one starts again from the base time.
        if now - replica.last_ejected_at > self.max_s * 2:
            replica.ejections = 0
        replica.ejections += 1
        replica.ejected_until = now + self.backoff(replica.ejections)
        replica.last_ejected_at = now
        metrics.ejections_total.inc()
        log.warning(
            "replica %s (%s) ejected for %.1f s after %d failures in a row",
            replica.id,
            replica.base_url,
            replica.ejected_until - now,
            replica.consecutive_failures,
        )
        return True

    def succeeded(self, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def backoff(self, ejections: int) -> float:
        return min(self.max_s, self.base_s * 2 ** max(0, ejections - 1))

    def probe_passed(self, replica: Replica) -> None:
        replica.ejected_until = None
        replica.consecutive_failures = 0
        log.info("replica %s (%s) passed its probe and is back in routing", replica.id, replica.base_url)

    def probe_failed(self, replica: Replica, now: float) -> None:
        replica.ejections += 1
        replica.ejected_until = now + self.backoff(replica.ejections)
        replica.last_ejected_at = now


class OutlierProbe:
    """Probes ejected replicas whose time out is up; runs as a background task of the gateway."""

    def __init__(
        self,
        *,
        policy: OutlierPolicy,
        pool: UpstreamPool,
        replicas: Callable[[], dict[int, Replica]],
        timeout_s: float,
        interval_s: float = 0.25,
    ) -> None:
        self.policy = policy
        self.pool = pool
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            for replica in list(self.replicas().values()):
                due = replica.ejected_until
                if due is not None and due <= now and not replica.probing:
                    replica.probing = True
                    asyncio.get_running_loop().create_task(self._probe(replica))

    async def _probe(self, replica: Replica) -> None:
        try:
            healthy = await self.health(replica)
        finally:
            replica.probing = False
        if healthy:
            self.policy.probe_passed(replica)
        else:
            self.policy.probe_failed(replica, time.monotonic())

    async def health(self, replica: Replica) -> bool:
        answer = await self.pool.get(replica.endpoint, "/health", headers=replica.headers[1:], timeout_s=self.timeout_s)
        # vLLM answers 200, or 5xx once its engine core is gone; a static endpoint without /health answers
        # 404, which still shows it is up.
        return answer is not None and answer[0] < 500
