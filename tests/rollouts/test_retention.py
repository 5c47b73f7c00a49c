"""Retention: old request records and shadow pairs go unless a live rollout needs them; the looks of an
ended rollout are compacted to its decisions and one look a minute."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from rollouts.actors import SYSTEM
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.retention import analyses_compact, retention_apply
from rollouts.services import rollout_abort, rollout_create, rollout_start
from serving.models import RequestRecord, ShadowPair
from tests.rollouts.helpers import canary_plan, records, shadow_pairs, version

pytestmark = pytest.mark.django_db


def started(alias: str) -> Rollout:
    version("adder-v1")
    version("adder-v2")
    rollout = rollout_create(plan=canary_plan(alias=alias), actor=SYSTEM).rollout
    return rollout_start(rollout=rollout, actor=SYSTEM)


def aged(rollout: Rollout, *, days: float) -> None:
    """Pretend the rollout was created `days` ago (so its records may be that old)."""
    Rollout.objects.filter(pk=rollout.pk).update(created_at=timezone.now() - timedelta(days=days))


@override_settings(RECORD_RETENTION_DAYS=30)
def test_records_and_shadow_pairs_past_the_retention_go_unless_a_live_rollout_holds_them() -> None:
    now = timezone.now()
    live = started("adder")
    aged(live, days=45)
    ended = started("other")
    aged(ended, days=45)
    rollout_abort(rollout=ended, actor=SYSTEM)
    old, recent = now - timedelta(days=40), now - timedelta(days=10)
    records(live, arm="candidate", n=3, at=old)  # older than the retention, but its rollout is live
    records(ended, arm="candidate", n=4, at=old, alias="other")  # its rollout ended: expired
    records(None, arm="baseline", n=5, at=old, alias="plain")  # no rollout at all: expired
    records(None, arm="baseline", n=6, at=recent, alias="plain")  # within the retention
    shadow_pairs(live, n=2, at=old)
    shadow_pairs(ended, n=3, at=old)
    shadow_pairs(ended, n=1, at=recent)

    report = retention_apply(now=now)

    left = sorted(RequestRecord.objects.values_list("alias", "created_at"))
    assert [(a, t < now - timedelta(days=30)) for a, t in left] == [("adder", True)] * 3 + [("plain", False)] * 6
    assert sorted(ShadowPair.objects.values_list("rollout_id", flat=True)) == [live.pk, live.pk, ended.pk]
    assert (report.records_deleted, report.shadow_pairs_deleted) == (9, 3)
    again = retention_apply(now=now)
    assert (again.records_deleted, again.shadow_pairs_deleted) == (0, 0)


def look(rollout: Rollout, at_s: float, decision: str = "hold", *, applied: bool = False) -> RolloutAnalysis:
    base = timezone.now().replace(second=0, microsecond=0) - timedelta(hours=3)
    return RolloutAnalysis.objects.create(
        rollout=rollout, created_at=base + timedelta(seconds=at_s), rollout_version=1, state="running",
        step_index=0, decision=decision, applied=applied, arms={"baseline": {"n": 1}}, checks=[],
    )  # fmt: skip


def test_an_ended_rollouts_looks_keep_every_decision_and_one_hold_a_minute() -> None:
    rollout = started("adder")
    holds = [look(rollout, s) for s in range(0, 180, 10)]  # 18 holds over three minutes
    advance = look(rollout, 65, "advance", applied=True)
    stale = look(rollout, 66, "rollback", applied=False)  # a decision another look beat: still evidence
    rollout_abort(rollout=rollout, actor=SYSTEM)
    Rollout.objects.filter(pk=rollout.pk).update(ended_at=timezone.now() - timedelta(hours=2))
    other = started("other")
    other_looks = [look(other, s) for s in range(0, 60, 10)]  # live: untouched

    report = retention_apply()

    kept = set(RolloutAnalysis.objects.filter(rollout=rollout).values_list("pk", flat=True))
    assert kept == {holds[0].pk, holds[6].pk, holds[12].pk, advance.pk, stale.pk}
    assert report.analyses_deleted == 15
    assert RolloutAnalysis.objects.filter(rollout=other).count() == len(other_looks)
    assert analyses_compact(rollout_id=rollout.pk) == 0


def test_looks_of_a_rollout_that_just_ended_are_left_whole() -> None:
    rollout = started("adder")
    for s in range(0, 120, 10):
        look(rollout, s)
    rollout_abort(rollout=rollout, actor=SYSTEM)  # ended now: within the hour someone may be reading them
    assert retention_apply().analyses_deleted == 0
    assert RolloutAnalysis.objects.filter(rollout=rollout).count() == 12


def test_the_rollups_of_an_ended_rollout_go_with_its_looks_compaction() -> None:
    from experiments.analysis import arm_sums
    from experiments.models import RollupUnit, RollupWindow

    ended, live = started("adder"), started("other")
    since = timezone.now() - timedelta(minutes=5)
    for rollout, alias in ((ended, "adder"), (live, "other")):
        records(rollout, arm="candidate", n=5, at=since + timedelta(minutes=1), alias=alias)
        arm_sums(rollout_id=rollout.pk, since=since)  # a look: folds the records into the window's rollup
    assert set(RollupWindow.objects.values_list("rollout_id", flat=True)) == {ended.pk, live.pk}
    before = RollupWindow.objects.filter(rollout_id=ended.pk).count()
    rollout_abort(rollout=ended, actor=SYSTEM)  # its evidence is the latest stored look: nothing folded
    assert RollupWindow.objects.filter(rollout_id=ended.pk).count() == before
    assert retention_apply().rollup_windows_deleted == 0  # ended just now: a look may still be running
    Rollout.objects.filter(pk=ended.pk).update(ended_at=timezone.now() - timedelta(hours=2))
    windows = RollupWindow.objects.filter(rollout_id=ended.pk).count()

    assert retention_apply().rollup_windows_deleted == windows >= 1
    assert list(RollupWindow.objects.values_list("rollout_id", flat=True)) == [live.pk]
    assert not RollupUnit.objects.exclude(window__rollout_id=live.pk).exists()
    assert retention_apply().rollup_windows_deleted == 0
