"""A shadow step's evidence folded look by look (experiments.analysis.shadow): after every look the candidate's
sums and percentiles, the paired latency sums, both sides of each session's first pair and the candidate's
first replies over the thresholds are what the from-scratch reads give over the same pairs; a pair that
commits late is counted exactly once."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from experiments.analysis.shadow import (
    ShadowStepSums,
    shadow_fold,
    shadow_step_differences,
    shadow_step_scratch,
    shadow_step_sums,
)
from experiments.models import RollupWindow
from experiments.rollups import ArmRollup, arms_from_scratch_equal, window_scratch
from serving.models import ShadowPair
from tests.support.postgres import connect_beside

ROLLOUT = 31
LIMITS = {"ttft_ms": (120.0, 300.0), "tpot_ms": (25.0,)}
BIN_FIELDS = ("ttft_ms", "tpot_ms")


def pairs(rng: random.Random, n: int, *, start: datetime, sessions: int = 30, rollout: int = ROLLOUT) -> list[ShadowPair]:
    """Sticky sessions of uneven size (a few heavy users), some pairs without a session, failed replies on
    either side, a pair from before the baseline was replayed, missing and zero latencies, heavy tails."""
    rows = []
    for _ in range(n):
        s = min(int(rng.paretovariate(1.2)), sessions)
        cand_ok, base_ok = rng.random() > 0.06, rng.random() > 0.04
        base = rng.lognormvariate(4.5, 0.7)
        cand = base * rng.lognormvariate(0.05, 0.3)
        tpot = (0.0 if rng.random() < 0.05 else rng.lognormvariate(3.0, 0.4), rng.lognormvariate(3.05, 0.4))
        replayed = "" if rng.random() < 0.03 else ("ok" if base_ok else "engine_error")
        rows.append(ShadowPair(
            request_id=f"{rng.getrandbits(64):016x}", created_at=start + timedelta(seconds=rng.uniform(0, 60)),
            alias="adder", rollout_id=rollout, session_hash="" if rng.random() < 0.1 else f"{s:032x}",
            candidate_outcome="ok" if cand_ok else "engine_error", candidate_ttft_ms=cand if cand_ok else None,
            candidate_tpot_ms=tpot[1] if cand_ok and rng.random() > 0.1 else None,
            candidate_e2e_ms=cand * 4 if cand_ok else None, candidate_completion_tokens=rng.randrange(1, 200) if cand_ok else None,
            baseline_replay_outcome=replayed, baseline_replay_ttft_ms=base if replayed else None,
            baseline_replay_tpot_ms=tpot[0] if replayed else None, baseline_replay_e2e_ms=base * 4 if replayed else None,
            baseline_ttft_ms=1.0, baseline_e2e_ms=1.0,
        ))  # fmt: skip
    return ShadowPair.objects.bulk_create(rows)


def assert_as_from_scratch(step: ShadowStepSums, since: datetime) -> None:
    expected = shadow_step_scratch(rollout_id=ROLLOUT, since=since, thresholds=LIMITS, bin_fields=BIN_FIELDS)
    assert shadow_step_differences(step, expected) == []
    assert expected.candidate.moments.sums.keys() < step.candidate.moments.sums.keys()  # (the paired columns too)


def look(since: datetime) -> ShadowStepSums:
    return shadow_step_sums(rollout_id=ROLLOUT, since=since, thresholds=LIMITS, bin_fields=BIN_FIELDS)


@pytest.mark.django_db(transaction=True)
def test_a_shadow_step_folded_look_by_look_reads_what_the_pairs_give_from_scratch() -> None:
    """Five looks, a batch of pairs committed before each; two batches hold pairs earlier than those already
    folded (a session's first pair replaced by an earlier one), one lies before the window (never counted),
    and another rollout's pairs are never read."""
    rng = random.Random(5)
    since = timezone.now() - timedelta(hours=1)
    pairs(rng, 30, start=since - timedelta(minutes=5))  # before the step's window
    pairs(rng, 40, start=since, rollout=ROLLOUT + 1)
    for minute in (10, 20, 2, 30, 1):
        pairs(rng, 60, start=since + timedelta(minutes=minute))
        step = look(since)
        assert_as_from_scratch(step, since)
    assert step.candidate.moments.units > 30 and step.paired.fields["ttft_ms"].units > 20
    assert step.bins["baseline"]["tpot_ms"] and step.over[("ttft_ms", 120.0)][0] > 0
    # The window itself against the from-scratch computation of the same spec (every sum and product).
    window = RollupWindow.objects.get(rollout_id=ROLLOUT)
    assert window.records == 300
    arms = window_scratch(rollout_id=ROLLOUT, since=since, until=None, **{
        k: v for k, v in shadow_fold(limits=LIMITS, bin_fields=BIN_FIELDS).items() if k != "rows_key"})
    folded = look(since)  # nothing new: the window as stored
    assert folded == step
    stored = {arm: ArmRollup.from_json(data) for arm, data in RollupWindow.objects.get(pk=window.pk).arms.items()}
    assert arms_from_scratch_equal(stored, arms) == []


@pytest.mark.django_db
def test_an_empty_shadow_step_reads_as_empty() -> None:
    step = look(timezone.now() - timedelta(minutes=1))
    assert step.candidate.moments.units == 0 and step.paired.fields["ttft_ms"].n == 0
    assert step.bins == {} and step.over == {("ttft_ms", 120.0): (0, 0), ("ttft_ms", 300.0): (0, 0), ("tpot_ms", 25.0): (0, 0)}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrent writers: PostgreSQL's commit order")
@pytest.mark.django_db(transaction=True)
def test_a_shadow_pair_committed_late_is_counted_exactly_once() -> None:
    """A mirror task's pair written before a look and committed after it: the look folds none of the pairs
    past the open transaction, the next look folds it once, and the step reads as from scratch throughout.
    The pair is the session's earliest, so it also replaces the session's first pair."""
    rng = random.Random(9)
    since = timezone.now() - timedelta(hours=1)
    pairs(rng, 40, start=since + timedelta(minutes=5))
    first = look(since)
    late = connect_beside()
    try:
        with late.cursor() as cursor:  # the late pair: written, not committed
            cursor.execute(
                "INSERT INTO serving_shadowpair (request_id, created_at, alias, rollout_id, session_hash, prompt_text, "
                "baseline_output, candidate_output, baseline_ttft_ms, baseline_e2e_ms, candidate_ttft_ms, "
                "candidate_tpot_ms, candidate_e2e_ms, candidate_outcome, candidate_error, texts_stored, "
                "baseline_replay_outcome, baseline_replay_ttft_ms, baseline_replay_tpot_ms, baseline_replay_e2e_ms, scores) "
                "VALUES ('late-pair', %s, 'adder', %s, %s, '', '', '', 1, 1, 500, 40, 2000, 'ok', '', true, 'ok', 100, 20, 400, '{}')",
                [since + timedelta(seconds=1), ROLLOUT, f"{1:032x}"],
            )
        pairs(rng, 30, start=since + timedelta(minutes=8))  # later pairs that commit first
        during = look(since)
        assert_as_from_scratch(during, since)  # (the open pair is not visible to either)
        late.commit()
    finally:
        late.close()
    after = look(since)
    assert_as_from_scratch(after, since)
    window = RollupWindow.objects.get(rollout_id=ROLLOUT)
    assert window.records == ShadowPair.objects.filter(rollout_id=ROLLOUT).count() == 71
    assert after.candidate.moments.total("requests") == 71 == first.candidate.moments.total("requests") + 31
    # Looked at again with nothing new, nothing is read twice.
    assert look(since) == after


@pytest.mark.django_db(transaction=True)
def test_thresholds_past_the_rollup_s_slots_are_read_from_scratch() -> None:
    """A plan with more tail thresholds than a unit row has columns for still gets its shadow step read."""
    rng = random.Random(3)
    since = timezone.now() - timedelta(hours=1)
    pairs(rng, 50, start=since + timedelta(minutes=1))
    many = {"ttft_ms": tuple(float(x) for x in range(50, 300, 10))}
    step = shadow_step_sums(rollout_id=ROLLOUT, since=since, thresholds=many, bin_fields=BIN_FIELDS)
    assert not RollupWindow.objects.exists()
    expected = shadow_step_scratch(rollout_id=ROLLOUT, since=since, thresholds=many, bin_fields=BIN_FIELDS)
    assert shadow_step_differences(step, expected) == [] and len(step.over) == 25
