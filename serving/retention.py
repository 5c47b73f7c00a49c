"""Retention of what the gateway and the shadow mirror store: request records and shadow pairs.

Both are kept `RECORD_RETENTION_DAYS` (30 by default) and then removed, except what a hold still covers: a
live rollout's records and pairs from its start on (the caller, who knows the rollouts, names the holds;
serving depends on no other app). On PostgreSQL request records go by daily partition (serving.partitions);
shadow pairs, and request records on SQLite, are deleted in chunks, so no single statement holds the write
lock for long.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q, QuerySet

from serving.models import RequestRecord, ShadowPair
from serving.partitions import partitioned, record_partitions_expire

log = logging.getLogger(__name__)

# Rows deleted per statement: small enough that the gateway's writer never waits long for SQLite's lock.
DELETE_CHUNK = 5000


@dataclass(frozen=True)
class RecordHold:
    """Records (and shadow pairs) of `rollout_id` created at or after `since` must be kept."""

    rollout_id: int
    since: datetime


@dataclass(frozen=True)
class RetentionResult:
    records_deleted: int = 0
    partitions_dropped: tuple[str, ...] = ()
    partitions_held: tuple[str, ...] = ()
    shadow_pairs_deleted: int = 0


def retention_cutoff(*, now: datetime, retention_days: int) -> datetime:
    if retention_days < 1:
        raise ValueError(f"retention_days: must be at least 1, got {retention_days}")
    return now - timedelta(days=retention_days)


def _held(holds: Iterable[RecordHold]) -> Q:
    held = Q(pk__in=[])
    for hold in holds:
        held |= Q(rollout_id=hold.rollout_id, created_at__gte=hold.since)
    return held


def _delete_in_chunks(rows: QuerySet[Any]) -> int:
    deleted = 0
    while True:
        ids = list(rows.order_by().values_list("pk", flat=True)[:DELETE_CHUNK])
        if not ids:
            return deleted
        with transaction.atomic():
            count, _ = rows.model.objects.filter(pk__in=ids).delete()
        deleted += count


def records_expire(*, now: datetime, retention_days: int, holds: Iterable[RecordHold]) -> RetentionResult:
    """Remove request records older than the retention that no hold covers. Safe to run twice.

    Partitioned (PostgreSQL): whole days go, a day that a hold still needs stays whole until the hold ends
    (rows of the default partition go one by one). Otherwise rows are deleted in chunks."""
    cutoff = retention_cutoff(now=now, retention_days=retention_days)
    holds = list(holds)
    if partitioned():
        expiry = record_partitions_expire(cutoff=cutoff, holds=[(h.rollout_id, h.since) for h in holds])
        return RetentionResult(
            records_deleted=expiry.default_rows_deleted, partitions_dropped=expiry.dropped,
            partitions_held=expiry.held,
        )  # fmt: skip
    expired = RequestRecord.objects.filter(created_at__lt=cutoff).exclude(_held(holds))
    return RetentionResult(records_deleted=_delete_in_chunks(expired))


def shadow_pairs_expire(*, now: datetime, retention_days: int, holds: Iterable[RecordHold]) -> int:
    """Remove shadow pairs older than the retention that no hold covers. Safe to run twice."""
    cutoff = retention_cutoff(now=now, retention_days=retention_days)
    expired = ShadowPair.objects.filter(created_at__lt=cutoff).exclude(_held(list(holds)))
    return _delete_in_chunks(expired)
