"""Serving's Celery tasks."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from serving.gateway.shadow import ShadowRetry, shadow_pair_mirror

log = logging.getLogger(__name__)

SHADOW_MAX_RETRIES = 3


@shared_task(name="serving.shadow_mirror", bind=True, max_retries=SHADOW_MAX_RETRIES, acks_late=True)
def shadow_mirror(self: Any, payload: dict[str, Any]) -> bool:
    """Replay one served request against the candidate and store the pair (once per request id).

    `payload` holds plain values only (the request body, the baseline's output and timings, version ids);
    it is the request itself, which no longer exists anywhere else once the response is served."""
    final = self.request.retries >= SHADOW_MAX_RETRIES
    try:
        return shadow_pair_mirror(payload=payload, final_attempt=final)
    except ShadowRetry as exc:
        # The candidate engine is restarting or unreachable: back off, then store the failure on the last try.
        raise self.retry(exc=exc, countdown=2 ** self.request.retries) from exc


@shared_task(name="serving.record_partitions_ensure", ignore_result=True)
def record_partitions_ensure() -> list[str]:
    """Beat, hourly: today's request-record partition and the next days' exist before a record needs them,
    and today's has fresh planner statistics (PostgreSQL; nothing to do on SQLite). Safe to run twice."""
    from django.utils import timezone

    from serving.partitions import partitioned, record_partition_analyse
    from serving.partitions import record_partitions_ensure as ensure

    if not partitioned():
        return []
    today = timezone.now().date()
    created = ensure(today=today)
    record_partition_analyse(day=today)
    if created:
        log.info("created request-record partitions %s", ", ".join(created))
    return created

