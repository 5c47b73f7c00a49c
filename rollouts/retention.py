"""Retention: what a rollout's analysis reads is kept while the rollout is live, and the rest ages out.

- Request records and shadow pairs (serving's) are kept `RECORD_RETENTION_DAYS`; a live rollout holds its
  own from its start on, however old (serving.retention does the removing; this module names the holds).
- Looks (`RolloutAnalysis`, one every analysis interval with its evidence) are compacted once their rollout
  has ended: every look that decided something other than "hold", or changed the rollout, is kept, and of
  the holds the first of each minute. This is the only deletion of looks in the app: the decisions and
  their evidence stay (so do the events and approvals, which are append-only).
- Rollups (the per-session sums incremental looks fold into, `experiments.rollups`) are dropped with the
  same delay once their rollout has ended: nothing reads them again.
- Idempotency keys of rollout actions (`RolloutActionKey`) are dropped once past their 24 h.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Min, Q
from django.db.models.functions import TruncMinute
from django.utils import timezone

from config.idempotency import IDEMPOTENCY_TTL
from experiments.rollups import windows_prune
from rollouts.models import Rollout, RolloutActionKey, RolloutAnalysis
from serving.retention import RecordHold, records_expire, shadow_pairs_expire

log = logging.getLogger(__name__)

# Looks of a rollout that ended less than this long ago are left whole (someone may be reading them now),
# and one that ended longer ago than COMPACT_WITHIN was compacted by an earlier run (the beat runs hourly).
COMPACT_AFTER = timedelta(hours=1)
COMPACT_WITHIN = timedelta(days=2)


@dataclass(frozen=True)
class RetentionReport:
    records_deleted: int
    partitions_dropped: tuple[str, ...]
    partitions_held: tuple[str, ...]
    shadow_pairs_deleted: int
    analyses_deleted: int
    rollup_windows_deleted: int = 0


def record_holds() -> list[RecordHold]:
    """Every live rollout holds its records and shadow pairs from its creation on (nothing of it is older)."""
    rows = Rollout.objects.filter(state__in=Rollout.LIVE_STATES).values_list("pk", "created_at")
    return [RecordHold(rollout_id=pk, since=created) for pk, created in rows]


def analyses_compact(*, rollout_id: int) -> int:
    """Delete the looks of an ended rollout that decided nothing, but the first of each minute. Returns how
    many were deleted; a second run deletes none."""
    looks = RolloutAnalysis.objects.filter(rollout_id=rollout_id)
    keep = set(
        looks.filter(decision=RolloutAnalysis.Decision.HOLD, applied=False)
        .annotate(minute=TruncMinute("created_at"))
        .values("minute")
        .annotate(first=Min("pk"))
        .values_list("first", flat=True)
    )
    doomed = looks.filter(decision=RolloutAnalysis.Decision.HOLD, applied=False).exclude(pk__in=keep)
    with transaction.atomic():
        deleted, _ = doomed.delete()
    return deleted


def retention_apply(*, now: datetime | None = None) -> RetentionReport:
    """Beat, hourly: expire request records and shadow pairs past the retention that no live rollout holds,
    and compact the looks of rollouts that ended between COMPACT_WITHIN and COMPACT_AFTER ago."""
    now = now or timezone.now()
    days = settings.RECORD_RETENTION_DAYS
    holds = record_holds()
    records = records_expire(now=now, retention_days=days, holds=holds)
    pairs = shadow_pairs_expire(now=now, retention_days=days, holds=holds)
    ended = Rollout.objects.filter(
        state__in=Rollout.TERMINAL_STATES, ended_at__lte=now - COMPACT_AFTER, ended_at__gte=now - COMPACT_WITHIN
    ).values_list("pk", flat=True)
    compacted = sum(analyses_compact(rollout_id=pk) for pk in ended)
    # Every rollout that is live or ended within COMPACT_AFTER keeps its rollups (a look may still be running).
    ended_long_ago = Q(state__in=Rollout.TERMINAL_STATES) & (Q(ended_at__lte=now - COMPACT_AFTER) | Q(ended_at__isnull=True))
    keep = Rollout.objects.exclude(ended_long_ago)
    rollups = windows_prune(keep_rollout_ids=list(keep.values_list("pk", flat=True)))
    # Idempotency keys of actions are honoured for IDEMPOTENCY_TTL; past it they answer nothing.
    RolloutActionKey.objects.filter(created_at__lt=now - IDEMPOTENCY_TTL).delete()
    report = RetentionReport(
        records_deleted=records.records_deleted, partitions_dropped=records.partitions_dropped,
        partitions_held=records.partitions_held, shadow_pairs_deleted=pairs, analyses_deleted=compacted,
        rollup_windows_deleted=rollups,
    )  # fmt: skip
    log.info("retention: %s", report)
    return report
