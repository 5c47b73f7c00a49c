"""Incremental looks: folding a window look by look gives what a from-scratch computation gives, a batch
that commits late is counted exactly once, and the sketches' percentiles keep their error bound."""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.db.models import Case, CharField, Count, F, FloatField, Min, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Concat
from django.utils import timezone

from experiments import rollups
from experiments.analysis.tails import (
    first_request_bins,
    first_request_bins_scratch,
    first_request_over,
    first_request_over_scratch,
)
from experiments.models import RollupUnit, RollupWindow
from experiments.rollups import (
    RELATIVE_ACCURACY,
    RollupSpec,
    arms_from_scratch_equal,
    window_fold,
    window_scratch,
    windows_prune,
)
from serving.models import RequestRecord
from tests.support.postgres import connect_beside

COLUMNS = ("requests", "ok", "errors", "ttft_n", "ttft_s")
SPEC = RollupSpec(
    columns=COLUMNS,
    pairs=tuple(itertools.combinations_with_replacement(("requests", "errors", "ttft_n", "ttft_s"), 2)),
    sketch=(("ttft_ms", "ttft_ms"),),
    # The tail checks' samples: each session's first request per field, its bucket and TTFT over 90 ms.
    firsts=(("ttft_ms", "ttft_ms"), ("e2e_ms", "e2e_ms")),
    over=(("ttft_ms", 90.0), ("ttft_ms", 150.0)),
)
ROLLOUT = 7
IN_PARTS_ON_POSTGRESQL = pytest.mark.skipif(connection.vendor != "postgresql", reason="a first fold in parts is PostgreSQL's")


def session_rows(records: QuerySet[Any]) -> QuerySet[Any]:
    """Per (arm, unit) sums, shaped like experiments.analysis.sessions.session_rows."""
    ok = Q(outcome="ok")
    present = ok & Q(ttft_ms__isnull=False)
    unit = Case(When(session_hash="", then=Concat(Value("r:"), F("request_id"))), default=F("session_hash"),
                output_field=CharField())  # fmt: skip
    return (
        records.order_by().annotate(unit=unit, arm_label=F("arm")).values("arm_label", "unit")
        .annotate(
            requests=Count("pk"), ok=Count("pk", filter=ok), errors=Count("pk", filter=Q(outcome="engine_error")),
            ttft_n=Count("pk", filter=present), ttft_s=Sum("ttft_ms", filter=present, output_field=FloatField()),
            first_at=Min("created_at", filter=Q(failover=False)),
        )
    )  # fmt: skip


def batch(rng: random.Random, n: int, *, start: Any, sessions: int = 40) -> list[RequestRecord]:
    """Sticky sessions (a session's arm is fixed by its number), some sessionless requests, 3 % errors,
    an occasional failover to the other arm, lognormal TTFT."""
    rows = []
    for _ in range(n):
        s = rng.randrange(sessions)
        arm = "candidate" if s % 4 == 0 else "baseline"
        failover = rng.random() < 0.03
        if failover:
            arm = "baseline" if arm == "candidate" else "candidate"
        failed = rng.random() < 0.03
        rows.append(RequestRecord(
            request_id=f"{rng.getrandbits(64):016x}", created_at=start + timedelta(seconds=rng.uniform(0, 60)),
            alias="adder", rollout_id=ROLLOUT, arm=arm, endpoint="chat.completions", stream=True,
            session_hash="" if rng.random() < 0.1 else f"s{s:03d}", status_code=502 if failed else 200,
            outcome="engine_error" if failed else "ok", failover=failover,
            ttft_ms=None if failed else rng.lognormvariate(4.5, 0.6), e2e_ms=10.0,
        ))  # fmt: skip
    return RequestRecord.objects.bulk_create(rows)


def fold(since: Any, until: Any = None) -> Any:
    return window_fold(rollout_id=ROLLOUT, since=since, until=until, spec=SPEC, session_rows=session_rows)


def scratch(since: Any, until: Any = None) -> Any:
    return window_scratch(rollout_id=ROLLOUT, since=since, until=until, spec=SPEC, session_rows=session_rows)


@pytest.mark.django_db(transaction=True)
def test_looks_folded_one_after_another_equal_the_computation_from_scratch() -> None:
    rng = random.Random(20)
    since = timezone.now() - timedelta(hours=1)
    batch(rng, 30, start=since - timedelta(minutes=5))  # before the window: never counted
    settled = 0
    for look in range(5):
        batch(rng, 80, start=since + timedelta(minutes=look))
        folded = fold(since)
        assert arms_from_scratch_equal(folded.arms, scratch(since)) == [], look
        settled += folded.settled
        # Each record is settled by one look only, and each look reads at most what it has not settled.
        assert settled + folded.unsettled == 80 * (look + 1)


def shown(setting: str) -> str:
    """PostgreSQL's `setting` on this connection now."""
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {setting}")
        return str(cursor.fetchone()[0])


def fold_statements_watch(setting: str, seen: list[str]) -> Callable[..., Any]:
    """An execute wrapper that appends to `seen` PostgreSQL's `setting` as each fold statement runs."""

    def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("WITH base AS MATERIALIZED"):
            seen.append(shown(setting))
        return execute(sql, params, many, context)

    return watch


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="the probes' plan is PostgreSQL's")
def test_a_fold_probes_the_stored_units_without_bitmap_scans_and_leaves_the_setting_as_it_was() -> None:
    from django.db import transaction

    rng = random.Random(21)
    since = timezone.now() - timedelta(hours=1)
    batch(rng, 80, start=since)
    fold(since)  # the cold look: no stored units to probe
    batch(rng, 80, start=since + timedelta(minutes=1))
    seen: list[str] = []
    watch = fold_statements_watch("enable_bitmapscan", seen)
    with transaction.atomic(), connection.execute_wrapper(watch):
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_bitmapscan = off")  # a caller's own setting is kept, not turned on
        fold(since)
        assert shown("enable_bitmapscan") == "off"
    with connection.execute_wrapper(watch):
        batch(rng, 80, start=since + timedelta(minutes=2))
        fold(since)
        assert shown("enable_bitmapscan") == "on"
    assert seen and set(seen) == {"off"}, seen
    assert arms_from_scratch_equal(fold(since).arms, scratch(since)) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="JIT compilation is PostgreSQL's")
def test_every_fold_runs_without_jit_and_gives_the_caller_its_setting_back() -> None:
    from django.db import transaction

    rng = random.Random(22)
    since = timezone.now() - timedelta(hours=1)
    server = shown("jit")
    assert server == "on"  # (else this test could not tell a fold's setting from the server's)
    seen: list[str] = []
    looks = []
    for look in range(2):  # (in the caller's transaction: one statement on this connection, not parts)
        batch(rng, 80, start=since + timedelta(minutes=look))
        with transaction.atomic(), connection.execute_wrapper(fold_statements_watch("jit", seen)):
            fold(since)
            assert shown("jit") == server
        looks.append(list(seen))
        seen.clear()
    # The first fold (the whole window) and a later one alike.
    assert looks == [["off"], ["off"]]
    assert arms_from_scratch_equal(fold(since).arms, scratch(since)) == []


@pytest.mark.django_db(transaction=True)
def test_a_session_s_exposure_moves_to_the_arm_of_its_earliest_request_when_that_commits_late() -> None:
    """Exposure (a unit counts in the arm of its earliest non-failover request) changes for a unit whose
    stored row is in the other arm: a look that reads an earlier request of it in the candidate moves it
    there, a later look with a still earlier one in the baseline moves it back."""
    since = timezone.now() - timedelta(hours=1)

    def record(arm: str, seconds: int) -> None:
        RequestRecord.objects.create(
            request_id=f"{arm}-{seconds}", created_at=since + timedelta(seconds=seconds), alias="adder", rollout_id=ROLLOUT,
            arm=arm, endpoint="chat.completions", stream=True, session_hash="alice", status_code=200, outcome="ok",
            ttft_ms=100.0 + seconds, e2e_ms=10.0,
        )  # fmt: skip

    record("baseline", 300)
    record("candidate", 400)  # bob's, below, keep the candidate's arm non-empty
    RequestRecord.objects.filter(request_id="candidate-400").update(session_hash="bob")
    exposed = []
    for arm, seconds in (("baseline", 300), ("candidate", 200), ("candidate", 500), ("baseline", 100)):
        if (arm, seconds) != ("baseline", 300):
            record(arm, seconds)
        folded = fold(since)
        assert arms_from_scratch_equal(folded.arms, scratch(since)) == [], (arm, seconds)
        exposed.append((folded.arms["baseline"].exposed, folded.arms["candidate"].exposed))
    # alice: baseline, then the candidate (earlier), still the candidate (a later one), the baseline again.
    assert exposed == [(1, 1), (0, 2), (0, 2), (1, 1)]


@pytest.mark.django_db(transaction=True)
def test_first_requests_replaced_by_earlier_ones_committed_late_equal_the_computation_from_scratch() -> None:
    """The tail checks' sample: a session's first request is set when folded and replaced only by an earlier
    one (by time, then id), as a batch committed late brings it; the buckets and the counts over thresholds
    follow, as from scratch."""
    rng = random.Random(31)
    since = timezone.now() - timedelta(hours=1)
    # An id below every record's (another rollout's record, deleted later): a late request's, tied in time.
    reserved = RequestRecord.objects.create(request_id="reserved", created_at=since, alias="adder", rollout_id=ROLLOUT + 1,
                                            endpoint="chat.completions", status_code=200, outcome="ok").pk  # fmt: skip
    batch(rng, 80, start=since + timedelta(minutes=10))
    folded = fold(since)
    assert arms_from_scratch_equal(folded.arms, scratch(since)) == []
    assert sum(folded.arms["baseline"].firsts["ttft_ms"].values()) > 10
    assert folded.arms["baseline"].over  # some first requests over 90 ms
    # The same sticky sessions' requests from earlier, committed after that look: they are the first ones.
    batch(rng, 80, start=since + timedelta(minutes=2))
    refolded = fold(since)
    assert arms_from_scratch_equal(refolded.arms, scratch(since)) == []
    assert refolded.arms["baseline"].firsts != folded.arms["baseline"].firsts
    # A tie in time: the lower id is first, whichever was folded first.
    units = RollupUnit.objects.filter(window_id=refolded.window_id, unit__startswith="s", first0_at__isnull=False)
    unit = units.values_list("pk", "first0_id").first()
    assert unit is not None
    assert unit[1] is not None
    stored = RequestRecord.objects.get(pk=unit[1])
    RequestRecord.objects.filter(pk=reserved).delete()
    # A higher id (not first), then a lower one (first): PostgreSQL's commit order is the writing
    # transaction's, so a lower id can commit late; SQLite's is the id, which only grows.
    tied_requests = [(None, 1.0)] + ([(reserved, 5000.0)] if connection.vendor == "postgresql" else [])
    for pk, ttft in tied_requests:
        RequestRecord.objects.create(
            pk=pk, request_id=f"tie-{ttft}", created_at=stored.created_at, alias="adder", rollout_id=ROLLOUT,
            arm=stored.arm, endpoint="chat.completions", stream=True, session_hash=stored.session_hash,
            status_code=200, outcome="ok", ttft_ms=ttft, e2e_ms=10.0,
        )  # fmt: skip
        tied = fold(since)
        problems = arms_from_scratch_equal(tied.arms, scratch(since))
        assert problems == [], problems
        assert RollupUnit.objects.values_list("first0_x", flat=True).get(pk=unit[0]) == (stored.ttft_ms if pk is None else 5000.0)


@pytest.mark.django_db(transaction=True)
def test_tail_samples_over_steps_from_the_rollups_equal_the_computation_from_scratch() -> None:
    """first_request_bins and first_request_over read the folded windows (a session seen in two steps counts
    at its first request, in the earlier one), look after look, a late batch among them."""
    rng = random.Random(12)
    since = timezone.now() - timedelta(hours=1)
    middle = since + timedelta(minutes=5)
    windows = [(since, middle), (middle, None)]
    limits = {"ttft_ms": [90.0, 150.0], "e2e_ms": [5.0]}
    for look, minute in enumerate((0, 6, 1, 7, 3)):  # 1 and 3: late batches into the first step
        batch(rng, 60, start=since + timedelta(minutes=minute))
        bins = first_request_bins(rollout_id=ROLLOUT, windows=windows, fields=["ttft_ms", "e2e_ms"], thresholds=limits)
        assert bins == first_request_bins_scratch(rollout_id=ROLLOUT, windows=windows, fields=["ttft_ms", "e2e_ms"]), look
        for arm in ("baseline", "candidate"):
            over = first_request_over(rollout_id=ROLLOUT, windows=windows, thresholds=limits, arm=arm)
            assert over == first_request_over_scratch(rollout_id=ROLLOUT, windows=windows, thresholds=limits, arm=arm)
            assert over[("ttft_ms", 90.0)][1] == sum(bins.get(arm, {}).get("ttft_ms", {}).values())
    assert set(bins) == {"baseline", "candidate"}
    # Read from the rollups (they keep the first requests), not from the records as a spec that does not fit is.
    assert RollupUnit.objects.filter(window__rollout_id=ROLLOUT, first0_at__isnull=False).count() > 10


def unit_rows(window: RollupWindow) -> list[tuple[Any, ...]]:
    """A window's unit rows as they read: arm, unit, first request, sums and first requests per field."""
    names = [f.name for f in RollupUnit._meta.fields if f.name not in ("id", "window")]
    return sorted(RollupUnit.objects.filter(window=window).values_list(*names))


@pytest.mark.django_db(transaction=True)
@IN_PARTS_ON_POSTGRESQL
def test_a_first_fold_in_parts_stores_and_returns_what_one_statement_does(settings: Any) -> None:
    rng = random.Random(11)
    since = timezone.now() - timedelta(hours=1)
    # Failovers put sessions in both arms: each such session's records must all fall in one part.
    batch(rng, 400, start=since, sessions=90)
    settings.ROLLUP_COLD_FOLD_PARTS = 3
    in_parts = fold(since)
    settings.ROLLUP_COLD_FOLD_PARTS = 1
    one = fold(since + timedelta(microseconds=1))  # the same records (none in the first microsecond), another window
    assert in_parts.settled == one.settled == 400
    assert arms_from_scratch_equal(in_parts.arms, one.arms, rel=1e-12) == []
    assert arms_from_scratch_equal(in_parts.arms, scratch(since)) == []
    first, second = RollupWindow.objects.filter(rollout_id=ROLLOUT).order_by("since")
    assert unit_rows(first) == unit_rows(second) and len(unit_rows(first)) > 90
    assert first.max_created_at == second.max_created_at
    assert RequestRecord.objects.filter(session_hash__in=list(RequestRecord.objects.filter(arm="candidate")
            .values_list("session_hash", flat=True)), arm="baseline").exclude(session_hash="").exists()  # fmt: skip


def records_for_a_first_fold_in_parts(settings: Any, *, seed: int) -> Any:
    """A window's row (a step's look before its traffic), then 300 records in 60 sessions for its first
    fold, which goes in 2 parts. Returns the window's start."""
    since = timezone.now() - timedelta(hours=1)
    assert fold(since).settled == 0
    batch(random.Random(seed), 300, start=since, sessions=60)
    settings.ROLLUP_COLD_FOLD_PARTS = 2
    return since


@pytest.mark.django_db(transaction=True)
@IN_PARTS_ON_POSTGRESQL
def test_a_first_fold_s_parts_run_without_jit(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    since = records_for_a_first_fold_in_parts(settings, seed=23)
    assert shown("jit") == "on"
    real_fold = rollups._fold
    seen: list[tuple[str, str]] = []

    def watched(*args: Any, **kwargs: Any) -> Any:
        # (in a part's thread, `connection` is the part's own)
        seen.append((threading.current_thread().name, shown("jit")))
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(rollups, "_fold", watched)
    assert fold(since).settled == 300
    assert len(seen) == 2 and all(name.startswith("fold-") for name, _ in seen), seen
    assert {setting for _, setting in seen} == {"off"}
    assert shown("jit") == "on"


@pytest.mark.django_db(transaction=True)
@IN_PARTS_ON_POSTGRESQL
def test_a_look_that_failed_after_its_first_fold_s_parts_counts_nothing_and_the_next_look_counts_all(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    since = records_for_a_first_fold_in_parts(settings, seed=12)
    real_add = rollups._Found.add_to

    def look_fails(self: Any, arms: Any) -> None:
        raise RuntimeError("the worker was killed")

    monkeypatch.setattr(rollups._Found, "add_to", look_fails)
    with pytest.raises(RuntimeError, match="killed"):
        fold(since)
    window = RollupWindow.objects.get(rollout_id=ROLLOUT, since=since)
    # The parts committed their units; the window counts none of them, nor any record.
    assert window.records == 0 and window.watermark == 0 and not window.arms
    assert RollupUnit.objects.filter(window=window).count() > 60
    monkeypatch.setattr(rollups._Found, "add_to", real_add)
    again = fold(since)
    assert again.settled == 300
    assert arms_from_scratch_equal(again.arms, scratch(since)) == []
    assert sum(r.units for r in again.arms.values()) == RollupUnit.objects.filter(window=window).count()


@pytest.mark.django_db(transaction=True)
@IN_PARTS_ON_POSTGRESQL
def test_a_first_fold_s_failed_part_stops_the_others_and_commits_none(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    since = records_for_a_first_fold_in_parts(settings, seed=15)
    real_fold = rollups._fold

    def second_part_fails(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.endswith("-1"):
            time.sleep(0.3)
            raise RuntimeError("the database went away")
        with connection.cursor() as cursor:  # a long statement, cancelled when the other part fails
            cursor.execute("SELECT pg_sleep(3)")
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(rollups, "_fold", second_part_fails)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="went away"):
        fold(since)
    assert time.monotonic() - began < 2.5
    window = RollupWindow.objects.get(rollout_id=ROLLOUT, since=since)
    assert window.records == 0 and not RollupUnit.objects.filter(window=window).exists()
    monkeypatch.setattr(rollups, "_fold", real_fold)
    assert arms_from_scratch_equal(fold(since).arms, scratch(since)) == []


class TimeLimit(Exception):
    """What a Celery task's soft time limit raises in the worker's main thread (on SIGUSR1)."""


@pytest.mark.django_db(transaction=True)
@IN_PARTS_ON_POSTGRESQL
def test_a_first_fold_in_parts_interrupted_by_a_time_limit_commits_no_part(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    since = records_for_a_first_fold_in_parts(settings, seed=14)
    real_fold = rollups._fold
    started = threading.Barrier(3)

    def slow_part(*args: Any, **kwargs: Any) -> Any:
        started.wait()
        with connection.cursor() as cursor:  # a long statement, cancelled when the look is interrupted
            cursor.execute("SELECT pg_sleep(3)")
        return real_fold(*args, **kwargs)

    def time_limit(signum: int, frame: Any) -> None:
        raise TimeLimit

    monkeypatch.setattr(rollups, "_fold", slow_part)
    previous = signal.signal(signal.SIGUSR1, time_limit)
    try:
        threading.Thread(target=lambda: (started.wait(), time.sleep(0.3), os.kill(os.getpid(), signal.SIGUSR1))).start()
        began = time.monotonic()
        with pytest.raises(TimeLimit):
            fold(since)
        assert time.monotonic() - began < 2.5  # the parts' statements were cancelled, not waited out
    finally:
        signal.signal(signal.SIGUSR1, previous)
    for thread in threading.enumerate():  # whatever the parts would still do, done
        if thread.name.startswith("fold-"):
            thread.join(timeout=30)
    window = RollupWindow.objects.get(rollout_id=ROLLOUT, since=since)
    assert window.records == 0 and not RollupUnit.objects.filter(window=window).exists()
    monkeypatch.setattr(rollups, "_fold", real_fold)
    assert arms_from_scratch_equal(fold(since).arms, scratch(since)) == []


@pytest.mark.django_db(transaction=True)
@IN_PARTS_ON_POSTGRESQL
def test_retention_during_a_first_fold_in_parts_keeps_the_parts_unit_rows(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(13)
    since = timezone.now() - timedelta(hours=1)
    batch(rng, 300, start=since, sessions=60)  # a new window over records already there (a rebuilt rollup)
    settings.ROLLUP_COLD_FOLD_PARTS = 2
    real_parts = rollups._fold_in_parts

    def pruned_meanwhile(*args: Any, **kwargs: Any) -> Any:
        found = real_parts(*args, **kwargs)
        # Retention, on a connection of its own, after the parts committed and before the look does.
        rollups._on_own_connection(lambda: windows_prune(keep_rollout_ids=[ROLLOUT]))
        return found

    monkeypatch.setattr(rollups, "_fold_in_parts", pruned_meanwhile)
    folded = fold(since)
    assert folded.settled == 300
    window = RollupWindow.objects.get(rollout_id=ROLLOUT, since=since)
    assert sum(r.units for r in folded.arms.values()) == RollupUnit.objects.filter(window=window).count()
    monkeypatch.setattr(rollups, "_fold_in_parts", real_parts)
    batch(rng, 100, start=since + timedelta(minutes=2), sessions=60)
    assert arms_from_scratch_equal(fold(since).arms, scratch(since)) == []


@pytest.mark.django_db(transaction=True)
def test_unit_rows_left_without_their_window_are_pruned() -> None:
    rng = random.Random(5)
    since = timezone.now() - timedelta(hours=1)
    batch(rng, 60, start=since)
    fold(since)
    fold(since - timedelta(minutes=1))  # another window of the same rollout
    kept, gone = RollupWindow.objects.order_by("pk")
    kept_units = RollupUnit.objects.filter(window=kept).count()
    assert kept_units > 0 and RollupUnit.objects.filter(window=gone).exists()
    with connection.cursor() as cursor:  # the window's row alone, as a delete racing a fold's inserts leaves it
        cursor.execute(f"DELETE FROM {RollupWindow._meta.db_table} WHERE id = %s", [gone.pk])
    assert windows_prune(keep_rollout_ids=[ROLLOUT]) == 0
    assert RollupUnit.objects.filter(window_id=gone.pk).count() == 0
    assert RollupUnit.objects.filter(window=kept).count() == kept_units


@pytest.mark.django_db(transaction=True)
def test_a_window_closed_after_records_past_its_end_were_folded_is_rebuilt() -> None:
    rng = random.Random(3)
    since = timezone.now() - timedelta(hours=1)
    batch(rng, 60, start=since)
    batch(rng, 60, start=since + timedelta(minutes=10))
    fold(since)  # open: folds both batches (those settled already)
    until = since + timedelta(minutes=5)
    window = RollupWindow.objects.get(rollout_id=ROLLOUT, since=since)
    past_the_end = window.max_created_at is not None and window.max_created_at >= until
    closed = fold(since, until)
    # Rebuilt when a record past the new end had been folded for good (with other transactions open on the
    # server, the horizon may not have passed them yet: then there is nothing to undo).
    assert closed.rebuilt == past_the_end
    assert arms_from_scratch_equal(closed.arms, scratch(since, until)) == []
    assert not fold(since, until).rebuilt


@pytest.mark.django_db
def test_a_look_sees_records_of_its_own_transaction_without_settling_them() -> None:
    """Inside one transaction (as a test, or records written by the look's own transaction) nothing is below
    PostgreSQL's horizon yet: the look still counts every visible record, as from scratch."""
    rng = random.Random(5)
    since = timezone.now() - timedelta(hours=1)
    batch(rng, 50, start=since)
    postgres = connection.vendor == "postgresql"
    if postgres:
        # A newer transaction ends meanwhile (other work on the server): the horizon still stays at this
        # transaction's own id, which the records it writes after the look carry too.
        with connect_beside("postgres", autocommit=True) as other:
            other.execute("SELECT pg_current_xact_id()")
    first = fold(since)
    assert arms_from_scratch_equal(first.arms, scratch(since)) == []
    batch(rng, 50, start=since + timedelta(minutes=2))
    second = fold(since)
    assert arms_from_scratch_equal(second.arms, scratch(since)) == []
    # SQLite's single writer settles its own rows at once (later ones get larger ids).
    assert second.records_read == (100 if postgres else 50)
    assert second.settled == (0 if postgres else 50)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@pytest.mark.django_db
def test_sketch_percentiles_are_within_their_relative_error_of_the_nearest_rank() -> None:
    rng = random.Random(11)
    since = timezone.now() - timedelta(hours=1)
    rows = batch(rng, 600, start=since)
    arms = fold(since).arms
    for arm in ("baseline", "candidate"):
        values = [r.ttft_ms for r in rows if r.arm == arm and r.outcome == "ok" and r.ttft_ms is not None]
        for q in (0.5, 0.9, 0.99):
            estimate = arms[arm].quantile("ttft_ms", q)
            if len(values) < 100 and q == 0.99:
                continue
            assert estimate is not None
            true = nearest_rank(values, q)
            assert abs(estimate - true) <= RELATIVE_ACCURACY * true * (1 + 1e-9), (arm, q, estimate, true)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrent writers are PostgreSQL's (SQLite has one)")
def test_a_batch_committed_late_is_counted_exactly_once() -> None:
    """A gateway batch that started before another and commits after a look that read the other: the look
    reads neither past the oldest open transaction, the next look reads both, and no look reads one twice."""
    rng = random.Random(8)
    since = timezone.now() - timedelta(hours=1)
    batch(rng, 40, start=since)
    first = fold(since)
    assert first.records_read == 40
    late = connect_beside()
    try:
        with late.cursor() as cursor:  # the late batch: written, not committed
            cursor.execute(
                "INSERT INTO serving_requestrecord (request_id, attempt, final, created_at, alias, rollout_id, arm, "
                "assigned_arm, endpoint, stream, session_hash, prompt_hash, prompt_chars, status_code, outcome, "
                "error_kind, failover, ttft_ms, prompt_text, output_text) "
                "SELECT 'late-' || g, 1, true, %s, 'adder', %s, 'candidate', 'candidate', 'chat.completions', true, "
                "'late-session', '', 0, 200, 'ok', '', false, 50.0, '', '' FROM generate_series(1, 7) g",
                [since + timedelta(seconds=5), ROLLOUT],
            ) if _has_attempts() else cursor.execute(
                "INSERT INTO serving_requestrecord (request_id, created_at, alias, rollout_id, arm, endpoint, stream, "
                "session_hash, prompt_hash, prompt_chars, status_code, outcome, error_kind, failover, ttft_ms, "
                "prompt_text, output_text) "
                "SELECT 'late-' || g, %s, 'adder', %s, 'candidate', 'chat.completions', true, 'late-session', '', 0, "
                "200, 'ok', '', false, 50.0, '', '' FROM generate_series(1, 7) g",
                [since + timedelta(seconds=5), ROLLOUT],
            )
        batch(rng, 30, start=since + timedelta(minutes=1))  # a later batch that commits first
        during = fold(since)
        # The later batch is visible, so counted in this look, but not settled: the open batch holds the
        # horizon below it. (Other transactions on the server may hold it lower still: then the first 40 are
        # not settled yet either.)
        assert during.settled == 0 and during.records_read == 30 + (40 - first.settled)
        assert arms_from_scratch_equal(during.arms, scratch(since)) == []
        late.commit()
    finally:
        late.close()
    after = fold(since)
    assert after.records_read == 37 + (40 - first.settled)  # the late batch and the one after it, once each
    assert arms_from_scratch_equal(after.arms, scratch(since)) == []
    assert after.arms["candidate"].sums["requests"] == scratch(since)["candidate"].sums["requests"]
    total = RequestRecord.objects.filter(rollout_id=ROLLOUT).count()
    assert sum(a.sums["requests"] for a in after.arms.values()) == total == 77


def _has_attempts() -> bool:
    return any(f.name == "attempt" for f in RequestRecord._meta.get_fields())


@pytest.mark.django_db
def test_the_analysis_from_rollups_equals_the_analysis_from_scratch() -> None:
    """arm_sums (what a look decides on) through the rollup, look after look, against the moments computed
    from every record of the window: the same units, exposure, sums and products, so the same decisions."""
    from experiments.analysis import arm_sums, window_moments
    from experiments.analysis.sessions import RECORDS
    from rollouts.actors import SYSTEM
    from rollouts.services import rollout_create, rollout_start
    from serving.selectors import request_records
    from tests.rollouts.helpers import both_arms, canary_plan, version

    version("adder-v1")
    version("adder-v2")
    rollout = rollout_start(rollout=rollout_create(plan=canary_plan(), actor=SYSTEM).rollout, actor=SYSTEM)
    since = timezone.now() - timedelta(minutes=10)
    thresholds = {"ttft_ms": (150.0,), "tpot_ms": (30.0, 40.0)}
    for look in range(3):
        both_arms(rollout, total=120, weight=0.1, seed=look, at=since + timedelta(minutes=look), error_rate=0.02)
        incremental = arm_sums(rollout_id=rollout.pk, since=since, thresholds=thresholds, outcomes=False)
        records = request_records(rollout_id=rollout.pk).filter(created_at__gte=since)
        scratch, _ = window_moments(records, source=RECORDS, thresholds=thresholds)
        for arm, moments in scratch.items():
            got = incremental[arm].moments
            assert (got.units, got.exposed) == (moments.units, moments.exposed), (look, arm)
            for key, value in moments.sums.items():
                assert math.isclose(got.sums[key], value, rel_tol=1e-9, abs_tol=1e-9), (look, arm, key)
            for pair, value in moments.products.items():
                assert math.isclose(got.products[pair], value, rel_tol=1e-9, abs_tol=1e-9), (look, arm, pair)
        assert incremental["candidate"].percentiles["ttft_p50_ms"] is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="transaction ids and other databases are PostgreSQL's")
def test_the_horizon_waits_for_this_database_s_transactions_only() -> None:
    """A transaction open in another database of the same server (another application, another test run)
    does not hold the looks back; one open in this database does, until it ends."""
    from serving.selectors import record_commit_horizon

    settings = connection.settings_dict

    def open_transaction(dbname: str) -> tuple[psycopg.Connection[Any], int]:
        conn = connect_beside(dbname)
        xid = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]  # type: ignore[index]
        return conn, int(xid)

    def settled_now() -> int:
        # A record committed now: the horizon passes it unless an older transaction of this database is open.
        (record,) = batch(random.Random(1), 1, start=timezone.now())
        with connection.cursor() as cursor:
            cursor.execute("SELECT commit_xid FROM serving_requestrecord WHERE id = %s", [record.pk])
            return int(cursor.fetchone()[0])

    elsewhere, other_xid = open_transaction("postgres")
    try:
        written = settled_now()
        assert written > other_xid
        assert record_commit_horizon() > written
        here, own_xid = open_transaction(settings["NAME"])
        try:
            written = settled_now()
            assert record_commit_horizon() <= own_xid < written
        finally:
            here.rollback()
            here.close()
        assert record_commit_horizon() > written
    finally:
        elsewhere.rollback()
        elsewhere.close()
