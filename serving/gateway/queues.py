"""The engines' own queues, for the per-replica bound (GATEWAY_MAX_QUEUED_PER_REPLICA).

Every GATEWAY_QUEUE_POLL_S each gateway process reads `vllm:num_requests_waiting` from each replica's
`/metrics`; between two reads a replica's queue is taken to be that figure plus what this process sent it
since (`Replica.queued`). An engine without the series (not vLLM) has no bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from serving.gateway.routing import Replica
from serving.gateway.upstream import UpstreamPool

log = logging.getLogger(__name__)

_WAITING = b"vllm:num_requests_waiting"


def waiting_parse(text: bytes) -> int | None:
    """The sum of `vllm:num_requests_waiting` over its label sets, or None when the series is missing."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(_WAITING):
            continue
        rest = line[len(_WAITING) :]
        if rest[:1] not in (b"{", b" "):
            continue  # another series that starts the same (vllm:num_requests_waiting_by_reason)
        try:
            total += float(rest.rsplit(b" ", 1)[-1])
        except ValueError:
            continue
        found = True
    return int(total) if found else None


class QueueWatcher:
    def __init__(
        self,
        *,
        pool: UpstreamPool,
        replicas: Callable[[], dict[int, Replica]],
        interval_s: float,
        timeout_s: float = 2.0,
    ) -> None:
        self.pool = pool
        self.replicas = replicas
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def run(self) -> None:
        while True:
            replicas = [r for r in self.replicas().values() if r.ejected_until is None]
            await asyncio.gather(*(self._read(r) for r in replicas))
            await asyncio.sleep(self.interval_s)

    async def _read(self, replica: Replica) -> None:
        outstanding = replica.outstanding
        answer = await self.pool.get(replica.endpoint, "/metrics", headers=replica.headers[1:], timeout_s=self.timeout_s)
        replica.waiting = waiting_parse(answer[1]) if answer is not None and answer[0] == 200 else None
        replica.waiting_outstanding = outstanding
