"""Request records partitioned by day on PostgreSQL: created ahead by beat, dropped after the retention
unless a live rollout needs them, and nothing refused or lost on a day without its partition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from rollouts.actors import SYSTEM
from rollouts.retention import retention_apply
from rollouts.services import rollout_abort, rollout_create, rollout_start
from serving.models import RequestRecord
from serving.partitions import (
    DEFAULT_PARTITION,
    PARTITIONS_AHEAD,
    partition_create,
    partition_name,
    partitioned,
    record_partition_analyse,
    record_partitions,
    record_partitions_ensure,
)
from serving.tasks import record_partitions_ensure as record_partitions_ensure_task
from tests.rollouts.helpers import canary_plan, records, version

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="declarative partitioning is PostgreSQL's"),
]


def where(request_ids: list[str]) -> set[str]:
    """The partitions holding these records."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT tableoid::regclass::text FROM serving_requestrecord WHERE request_id = ANY(%s)",
            [request_ids],
        )
        return {row[0] for row in cursor.fetchall()}


def test_the_migrated_table_is_partitioned_with_today_and_the_days_ahead() -> None:
    assert partitioned()
    today = timezone.now().date()
    days = set(record_partitions().values())
    assert {today + timedelta(days=n) for n in range(PARTITIONS_AHEAD + 1)} <= days


def test_beat_creates_the_partitions_ahead_once() -> None:
    far = timezone.now().date() + timedelta(days=40)
    created = record_partitions_ensure(today=far)
    assert created == [partition_name(far + timedelta(days=n)) for n in range(PARTITIONS_AHEAD + 1)]
    assert record_partitions_ensure(today=far) == []  # a second run creates nothing
    assert record_partitions_ensure_task() == []  # the beat task: today's are there already


def test_beat_gives_today_s_partition_planner_statistics() -> None:
    """Hourly, with the partitions: today's is analysed, so a look's plans do not depend on autovacuum (off on
    the CI's server)."""
    today = timezone.now().date()
    records(71, arm="baseline", n=40, model_version=version("adder-v1"), seed=1, sessions=["alice", "bob", ""],
            at=timezone.now())  # fmt: skip

    def session_statistics() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM pg_stats WHERE tablename = %s AND attname = 'session_hash'",
                           [partition_name(today)])  # fmt: skip
            return int(cursor.fetchone()[0])

    before = session_statistics()
    assert record_partitions_ensure_task() == []
    assert (before, session_statistics()) == (0, 1)
    assert record_partition_analyse(day=today + timedelta(days=400)) is False  # no such partition


def test_a_record_on_a_day_without_its_partition_waits_in_the_default_and_moves_when_the_day_is_made() -> None:
    day = (timezone.now() + timedelta(days=60)).astimezone(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    stray = records(None, arm="baseline", n=3, at=day, alias="plain")
    ids = [r.request_id for r in stray]
    assert where(ids) == {DEFAULT_PARTITION}
    assert partition_create(day=day.date())
    assert where(ids) == {partition_name(day.date())}
    assert RequestRecord.objects.filter(request_id__in=ids).count() == 3


def started(alias: str):  # type: ignore[no-untyped-def]
    version("adder-v1")
    version("adder-v2")
    rollout = rollout_create(plan=canary_plan(alias=alias), actor=SYSTEM).rollout
    return rollout_start(rollout=rollout, actor=SYSTEM)


def test_days_past_the_retention_are_dropped_unless_a_live_rollout_needs_them() -> None:
    now = timezone.now()
    old_day = (now - timedelta(days=45)).date()
    held_day, free_day = old_day, old_day + timedelta(days=1)
    for day in (held_day, free_day):
        partition_create(day=day)
    noon = datetime(held_day.year, held_day.month, held_day.day, 12, tzinfo=UTC)
    live = started("adder")
    from rollouts.models import Rollout

    Rollout.objects.filter(pk=live.pk).update(created_at=noon - timedelta(hours=1))
    ended = started("other")
    rollout_abort(rollout=ended, actor=SYSTEM)
    needed = records(live, arm="candidate", n=2, at=noon)
    unneeded = records(ended, arm="candidate", n=2, at=noon + timedelta(days=1), alias="other")
    ancient = records(None, arm="baseline", n=2, at=noon - timedelta(days=30), alias="plain")  # in the default
    recent = records(None, arm="baseline", n=2, at=now - timedelta(days=1), alias="plain")

    report = retention_apply(now=now)

    assert partition_name(free_day) in report.partitions_dropped
    assert partition_name(held_day) in report.partitions_held
    assert partition_name(held_day) in record_partitions() and partition_name(free_day) not in record_partitions()
    left = set(RequestRecord.objects.values_list("request_id", flat=True))
    assert {r.request_id for r in needed + recent} <= left
    assert not {r.request_id for r in unneeded + ancient} & left
    assert report.records_deleted == 2  # the default partition's, row by row

    # Once the rollout has ended, its day goes too.
    rollout_abort(rollout=live, actor=SYSTEM)
    assert partition_name(held_day) in retention_apply(now=now).partitions_dropped
    assert not RequestRecord.objects.filter(request_id__in=[r.request_id for r in needed]).exists()
