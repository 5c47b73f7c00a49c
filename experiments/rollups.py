"""Incremental looks: a window's per-session statistics folded look by look, each look reading only the
request records committed since the previous one.

Every look of a rollout asks the same question of a window that only grows: per arm, over sessions, the
number of units, the units first exposed there, the sum of every per-session column and the sums of the
products the variances need (`experiments.analysis` computes them from scratch). Recomputing that costs the
whole window every 10 s. Here a window keeps

- one `RollupUnit` row per (arm, session) with that session's sums (the per-session rows of the analysis,
  added up), so the rows a new batch touches can be updated in place;
- per arm in `RollupWindow.arms`, the merged moments: adding a session's new sums changes a product sum by
  (a + da)(b + db) - ab, which SQL computes for the touched sessions only, and exposure changes only for
  sessions the batch touched;
- per arm and latency field, a DDSketch (`ddsketch.LogarithmicMapping`): bucket counts, exactly mergeable,
  computed in SQL by the sketch's own key formula.

Which records are new is decided by their commit order (`serving.selectors.record_commit_horizon`), not by
their timestamps: a gateway batch that commits after a look has an order at or above that look's horizon,
so the next look reads it, and no look reads a record twice. A window whose end becomes known (its step
ended) after records past that end were folded is rebuilt once from scratch.

A window folds the rows of one table (`FoldTable`): the request records (`RECORD_TABLE`), or a shadow
step's shadow pairs, which carry a commit order of their own (experiments.analysis.shadow).

Why DDSketch: its quantiles come with a guarantee, each within a relative error `RELATIVE_ACCURACY` of the
true nearest-rank value, whatever the distribution; its buckets add, so the sketch of a window is the same
whichever looks built it (t-digest's merge is approximate and depends on the order of merging, and gives
no worst-case bound). The `ddsketch` package is DataDog's own Python implementation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ddsketch.mapping import LogarithmicMapping
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Count, F, FloatField, Func, IntegerField, Q, QuerySet, Value, When, Window
from django.db.models.functions import Ceil, Greatest, Ln, RowNumber
from django.utils.dateparse import parse_datetime

from experiments.analysis.sessions import (
    RECORDS,
    bytewise,
    merge_rows,
    sql_float,
    unit_expression,
    with_unit_history,
)
from experiments.models import FIRST_SLOTS, ROLLUP_SLOTS, RollupUnit, RollupWindow
from serving.selectors import record_commit_horizon, request_records, request_records_committed

# Every percentile read from a sketch is within 1 % of the true nearest-rank value.
RELATIVE_ACCURACY = 0.01
# As the analysis: a latency of 0 (a clock's resolution) is sketched as a microsecond.
SKETCH_FLOOR_MS = 1e-3
UNITS = RollupUnit._meta.db_table
FRESH = "rollup_fresh"
# PostgreSQL's work_mem for a fold's transaction (hash tables and sorts per operation).
FOLD_WORK_MEM = "64MB"
COLD_WORK_MEM = "512MB"
FILL = "rollup_fill"
_QUOTED = r'"(\w+)"'  # a column as Django quotes it, on PostgreSQL and SQLite


@dataclass(frozen=True)
class RollupSpec:
    """What a window keeps: the per-session columns (in slot order), the products of columns the metrics'
    variances need, and the latency fields to sketch, (logical name, record column), over ok requests.

    `firsts`: the latency fields of the tail checks, (logical name, record column): per unit, its first
    request that measured the field (`window_fold`'s `first_ok`), and per arm the sketch buckets of those
    first requests; `over`: (logical name, threshold), per arm the units whose first request was over it."""

    columns: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    sketch: tuple[tuple[str, str], ...] = ()
    relative_accuracy: float = RELATIVE_ACCURACY
    firsts: tuple[tuple[str, str], ...] = ()
    over: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.columns) > ROLLUP_SLOTS:
            raise ValueError(f"columns: at most {ROLLUP_SLOTS}, got {len(self.columns)}")
        unknown = {c for pair in self.pairs for c in pair} - set(self.columns)
        if unknown:
            raise ValueError(f"pairs: columns not kept: {sorted(unknown)}")
        if len(self.firsts) > FIRST_SLOTS:
            raise ValueError(f"firsts: at most {FIRST_SLOTS}, got {len(self.firsts)}")
        unknown = {name for name, _ in self.over} - {name for name, _ in self.firsts}
        if unknown:
            raise ValueError(f"over: fields without their first requests: {sorted(unknown)}")

    def as_dict(self) -> dict[str, Any]:
        out = {"columns": list(self.columns), "pairs": [list(p) for p in self.pairs],
               "sketch": [list(s) for s in self.sketch], "relative_accuracy": self.relative_accuracy}  # fmt: skip
        if self.firsts:  # (a spec without them keeps the key it had)
            out["firsts"] = [list(f) for f in self.firsts]
            out["over"] = [[name, float(limit)] for name, limit in self.over]
        return out

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class ArmRollup:
    """One arm of a window: what `experiments.analysis.sessions.merge_rows` gives, and the sketches; for the
    tail checks, per `firsts` field the sketch buckets of the units' first requests and, per `over` key
    (`over_key`), the units whose first request was over the threshold."""

    units: int = 0
    exposed: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    products: dict[tuple[str, str], float] = field(default_factory=dict)
    sketches: dict[str, dict[int, int]] = field(default_factory=dict)
    firsts: dict[str, dict[int, int]] = field(default_factory=dict)
    over: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "units": self.units, "exposed": self.exposed, "sums": self.sums,
            "products": {f"{a}|{b}": v for (a, b), v in self.products.items()},
            "sketches": {name: {str(k): n for k, n in buckets.items()} for name, buckets in self.sketches.items()},
            "firsts": {name: {str(k): n for k, n in buckets.items()} for name, buckets in self.firsts.items()},
            "over": self.over,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArmRollup:
        return cls(
            units=int(data.get("units", 0)), exposed=int(data.get("exposed", 0)),
            sums={k: float(v) for k, v in (data.get("sums") or {}).items()},
            products={tuple(k.split("|", 1)): float(v) for k, v in (data.get("products") or {}).items()},  # type: ignore[misc]
            sketches={name: {int(k): int(n) for k, n in buckets.items()} for name, buckets in (data.get("sketches") or {}).items()},
            firsts={name: {int(k): int(n) for k, n in buckets.items()} for name, buckets in (data.get("firsts") or {}).items()},
            over={k: int(n) for k, n in (data.get("over") or {}).items()},
        )  # fmt: skip

    def quantile(self, name: str, q: float, *, relative_accuracy: float = RELATIVE_ACCURACY) -> float | None:
        """The nearest-rank q-quantile of a sketched field, within `relative_accuracy` of the true one; None
        with too few samples for the rank not to be the maximum by default (as the analysis)."""
        buckets = self.sketches.get(name) or {}
        n = sum(buckets.values())
        if n < max(10, math.ceil(1.0 / (1.0 - q))):
            return None
        rank = max(1, math.ceil(q * n))
        seen = 0
        mapping = _mapping(relative_accuracy)
        for key in sorted(buckets):
            seen += buckets[key]
            if seen >= rank:
                return float(mapping.value(key))
        return None


@dataclass(frozen=True)
class Folded:
    """A window after a look's fold: per arm, and what this look read."""

    arms: dict[str, ArmRollup]
    settled: int  # records folded for good by this look (committed below the horizon)
    unsettled: int  # records visible but above the horizon: counted by this look, folded by a later one
    rebuilt: bool
    watermark: int
    window_id: int = 0

    @property
    def records_read(self) -> int:
        return self.settled + self.unsettled


def over_key(name: str, threshold: float) -> str:
    """The key of a tail SLO's count in `ArmRollup.over`."""
    return f"{name}|{float(threshold)!r}"


def _mapping(relative_accuracy: float) -> LogarithmicMapping:
    return LogarithmicMapping(relative_accuracy)


def sketch_key(column: str, relative_accuracy: float) -> Any:
    """The sketch bucket of a latency, in SQL: LogarithmicMapping.key, ceil(ln(x) / ln(gamma))."""
    multiplier = 1.0 / math.log(_mapping(relative_accuracy).gamma)
    floored = Greatest(F(column), Value(SKETCH_FLOOR_MS), output_field=FloatField())
    return Ceil(Ln(floored) * Value(multiplier, output_field=FloatField()))


SessionRows = Callable[[QuerySet[Any]], QuerySet[Any]]


@dataclass(frozen=True)
class FoldTable:
    """The rows a window folds, all of one table: `rows(rollout_id)` a rollout's (every row's with None),
    each with an `arm`, a `created_at` and an id; `horizon()` their commit order's horizon now (below it
    every row that will ever exist is visible); `committed(rows, start=, end=)` those of `rows` whose commit
    order is in [start, end). `name` tells two tables' windows apart."""

    name: str
    rows: Callable[[int | None], QuerySet[Any]]
    horizon: Callable[[], int]
    committed: Callable[..., QuerySet[Any]]


RECORD_TABLE = FoldTable(
    "records", lambda rollout_id: request_records(rollout_id=rollout_id), record_commit_horizon, request_records_committed
)


@dataclass(frozen=True)
class UnitFill:
    """Columns of a unit row set once, when the fold first stores the unit, and constant after: a covariate
    from before the window (`experiments.analysis.preperiod`). `session_rows` gives them as NULL; `sql`,
    given the SQL of one column of unit names (and its parameters), gives one row per unit it knows, the
    unit first, then `columns` by name; a unit it does not know gets zeros. `key` names what `sql` reads."""

    columns: tuple[str, ...]
    sql: Callable[[tuple[str, tuple[Any, ...]]], tuple[str, tuple[Any, ...]]]
    key: Hashable = None


def window_fold(
    *,
    rollout_id: int,
    since: datetime,
    until: datetime | None,
    spec: RollupSpec,
    session_rows: SessionRows,
    outcome_ok: Q | None = None,
    rows_key: Hashable | None = None,
    fill: UnitFill | None = None,
    first_ok: Q | None = None,
    unit: Any = None,
    table: FoldTable = RECORD_TABLE,
) -> Folded:
    """Fold the records of a rollout's window [since, until) committed since the window's watermark into
    its rollup, and return the arms. `session_rows(records)` gives one row per (arm_label, unit) with the
    spec's columns and `first_at` (experiments.analysis.sessions.session_rows). `rows_key`, when given,
    names what `session_rows` computes (the same key, the same query): its SQL is then built once per
    process, not at every look. Safe to run twice and from two workers: the window row is locked for the
    fold. `fill`: columns each new unit row gets once: read with the records by the window's first fold,
    after the fold that stores it by a later one (`_fill_units`); a unit first seen among the unsettled
    records has zeros there until a later look stores it.

    With `spec.firsts`: a request that measured a field counts for its unit's first request when it matches
    `first_ok` (by default ok and not a failover attempt); `unit` is the unit of a record as `session_rows`
    groups it (by default `experiments.analysis.sessions.unit_expression` of the request records). A unit's
    first request is the earliest by `created_at`, then by id: a batch committed late that holds an earlier
    request of the unit replaces it (and moves the unit from one bucket to the other), as a from-scratch
    computation would have counted it.

    `table`: whose rows the window folds (the request records by default; `ok`, `first_ok`, `unit` and
    `session_rows` are over its rows).

    On PostgreSQL, called outside a transaction, a window's first fold (and its `fill`) is split by session
    into ROLLUP_COLD_FOLD_PARTS parts folded at once on connections of their own (`_fold_in_parts`)."""
    ok = outcome_ok if outcome_ok is not None else Q(outcome="ok")
    first_ok, unit = _first_defaults(ok, first_ok, unit)
    queries = _fold_queries(spec, session_rows, ok, rows_key, first_ok, unit, table)
    # The fill's columns: NULL in the records' per-session rows, set once when a unit is first stored.
    constant = tuple(c for c in spec.columns if fill is not None and c in fill.columns)
    key = queries.key if fill is None else hashlib.sha256(f"{queries.key} {fill.key!r}".encode()).hexdigest()
    outermost = not connection.in_atomic_block
    window_defaults = {"until": until, "spec": spec.as_dict()}
    if outermost:
        # The window's row is committed before the fold: a first fold in parts commits unit rows before the
        # look's transaction does, and retention deletes unit rows it finds without their window.
        RollupWindow.objects.get_or_create(rollout_id=rollout_id, since=since, spec_hash=key, defaults=window_defaults)
    with transaction.atomic():
        if outermost and connection.vendor == "postgresql":
            # The rollup is derived from the records: if a crash loses this commit, it loses the watermark
            # with the unit rows, and the next look reads those records again. So the fold need not wait
            # for its commit to reach the disk (on a busy disk, a good part of a look); WAL order still
            # keeps every later commit behind it.
            # Its rows (a touched session's stored and new sums side by side, some 600 bytes each) stay in
            # memory: at 4 MB, a look of 7,000 touched sessions sorted them on disk.
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit = off")
                cursor.execute(f"SET LOCAL work_mem = '{FOLD_WORK_MEM}'")
        window = RollupWindow.objects.select_for_update().filter(rollout_id=rollout_id, since=since, spec_hash=key).first()
        if window is None:
            window, _ = RollupWindow.objects.select_for_update().get_or_create(
                rollout_id=rollout_id, since=since, spec_hash=key, defaults=window_defaults
            )
        rebuilt = False
        changed = until != window.until
        if changed:
            if until is not None and window.max_created_at is not None and window.max_created_at >= until:
                # Records past the window's new end were folded while it was open: start it over.
                RollupUnit.objects.filter(window=window).delete()
                window.watermark, window.records, window.arms, window.max_created_at = 0, 0, {}, None
                rebuilt = True
            window.until = until
        jit = _jit_off() if connection.vendor == "postgresql" else None
        horizon = table.horizon()
        arms = {arm: ArmRollup.from_json(data) for arm, data in (window.arms or {}).items()}
        records = table.rows(rollout_id).filter(created_at__gte=since)
        if until is not None:
            records = records.filter(created_at__lt=until)
        read = 0
        # Records already visible but not settled yet (committed by a transaction above the horizon while an
        # older one is still open): counted in this look, folded for good by a later one.
        tail = table.committed(records, start=max(horizon, window.watermark), end=2**63 - 1).order_by()
        tail_seen: bool | None = None
        fresh = table.committed(records, start=window.watermark, end=horizon).order_by()
        # A window with nothing new below the horizon (a closed step's, or one folded already in this look: the
        # tail checks read the windows arm_sums folded) costs an index probe, not a fold statement and a write
        # of its row. Its watermark stays: no record can commit below the horizon any more, so the next fold
        # finds nothing more there.
        if horizon > window.watermark and fresh.exists():
            changed = True
            if window.records == 0 and connection.vendor == "postgresql":
                # The first look groups every record of the window so far (at 20 million records, 2 million
                # of them in 600,000 sessions): its hash tables and sorts in memory, not in batches on disk.
                with connection.cursor() as cursor:
                    cursor.execute(f"SET LOCAL work_mem = '{COLD_WORK_MEM}'")
            # A window with nothing folded yet has no unit rows: the first look inserts them, without
            # looking any up (at 2 million records, 600,000 probes that find nothing), each with its `fill`
            # read in the same statement (`_fold`'s `joined`): every row is written once. A later fold's new
            # units get their fill after it (`_fill_units`).
            empty = window.records == 0
            joined = fill if empty else None
            last_id = _last_unit_id() if fill is not None and not empty else 0
            parts = int(settings.ROLLUP_COLD_FOLD_PARTS)
            in_parts = empty and outermost and not rebuilt and parts > 1 and connection.vendor == "postgresql"
            if in_parts:
                found = _fold_in_parts(window.pk, queries, fresh, unit=unit, tail=tail, parts=parts, joined=joined)
            else:
                found = _fold(window.pk, queries, fresh, persist=True, tail=tail, empty=empty,
                              constant=() if empty else constant, joined=joined)  # fmt: skip
            found.add_to(arms)
            if fill is not None and not empty and any(values[0] for values in found.deltas.values()):
                _fill_units(window.pk, last_id, _last_unit_id(), spec, fill).add_to(arms)
            read = found.records
            window.watermark = horizon
            window.records += read
            if found.last_at is not None and (window.max_created_at is None or found.last_at > window.max_created_at):
                window.max_created_at = found.last_at
            window.arms = {arm: rollup.to_json() for arm, rollup in arms.items()}
            tail_seen = found.tail
        if changed:  # (a look with nothing new to fold leaves the row, its arms' JSON with it, as it was)
            window.save()
        seen = arms
        unsettled = 0
        if tail_seen is None:  # (nothing folded: a probe says whether there is a tail to count)
            tail_seen = tail.exists()
        if tail_seen:
            seen = {arm: ArmRollup.from_json(rollup.to_json()) for arm, rollup in arms.items()}
            above = _fold(window.pk, queries, tail, persist=False, constant=constant)
            above.add_to(seen)
            unsettled = above.records
        if jit is not None:
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('jit', %s, true)", [jit])
    return Folded(arms=seen, settled=read, unsettled=unsettled, rebuilt=rebuilt, watermark=window.watermark,
                  window_id=window.pk)  # fmt: skip


def _jit_off() -> str:
    """Turn PostgreSQL's JIT compilation off until the transaction ends (or `set_config` gives back the
    value returned); a first fold's parts turn it off on their own connections (`_in_parts`). A later
    fold's statements read a few thousand rows, but the planner, which cannot know how few (fresh unit rows
    and commit orders are past the tables' statistics), can estimate one above `jit_above_cost`: at 100
    million records the history fill of 33 new sessions ran in 0.3 ms after 56 ms of compiling, half of a
    110 ms look. A first fold's statement is costed above `jit_optimize_above_cost` from about 20 million
    records on, and optimising and inlining its hundreds of expressions took some 4 s a part for no faster
    a run: at 20 million records the cold look took 11.3-13.5 s without JIT against 15.5-17.0 s with it; at
    100 million, where the compiled code saves about what compiling costs, the two were within this
    machine's noise (benchmarks/README.md, ninth pass)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('jit'), set_config('jit', 'off', true)")
        return str(cursor.fetchone()[0])


class _Stopped(Exception):
    """A part of a first fold stopped because another part failed or its caller was interrupted."""


class _UnitPart(Func):
    """Which of `parts` parts a unit (text) falls in, 0 to parts - 1, by PostgreSQL's hash of it."""

    template = "MOD(hashtext(%(expressions)s) & 2147483647, %(parts)d)"
    output_field = IntegerField()


def _fold_in_parts(window_id: int, queries: _FoldQueries, fresh: QuerySet[Any], *, unit: Any, tail: QuerySet[Any],
                   parts: int, joined: UnitFill | None = None) -> _Found:  # fmt: skip
    """A window's first fold (no unit row yet) on PostgreSQL, split by unit into `parts` parts, each folded
    and committed by a connection of its own at the same time (`_in_parts`); what they found, added up.
    Every row a fold returns is a sum over units or over records, and a unit (with all its records, in both
    arms) falls in one part, so the parts' sums are the whole fold's. The caller holds the window's row lock
    for the whole time and writes the window (watermark, arms) after the parts; if its transaction then
    fails, the parts' rows stay without a watermark that counts them: the next first fold deletes them
    before it starts (a window with no record folded has no unit row of its own). Needs the records
    committed (the caller's transaction holds none: `outermost`), which rows below the commit horizon are.
    `joined`: the window's `UnitFill`, read by each part for its own units (`_fold`)."""
    _on_own_connection(lambda: RollupUnit.objects.filter(window_id=window_id).delete())

    def fold_part(k: int) -> _Found:
        part = fresh.alias(fold_part=_UnitPart(unit, parts=parts)).filter(fold_part=k)
        return _fold(window_id, queries, part, persist=True, tail=tail if k == 0 else None, empty=True, joined=joined)

    return _in_parts(queries.spec, parts, fold_part, name=f"fold-{window_id}")


def _in_parts(spec: RollupSpec, parts: int, work: Callable[[int], _Found], *, name: str) -> _Found:
    """`work(k)` for each of `parts` parts at once, each in a thread with a database connection and a
    transaction of its own, committed when its work returns; what they found, added up. Once a part fails
    or the caller is interrupted (a task's soft time limit), the parts still running stop: their statements
    are cancelled and they do not commit (a part that has committed stays committed: the callers' rows are
    found and deleted by the next first fold). The first failure is raised."""
    found: list[_Found | None] = [None] * parts
    stopped = threading.Event()
    running: list[Any] = []
    failures: list[BaseException] = []

    def run(k: int) -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL synchronous_commit = off")
                    cursor.execute(f"SET LOCAL work_mem = '{COLD_WORK_MEM}'")
                    cursor.execute("SET LOCAL jit = off")  # (as every fold: `_jit_off`)
                running.append(connection.connection)
                if stopped.is_set():
                    raise _Stopped
                one = work(k)
                if stopped.is_set():
                    raise _Stopped
            found[k] = one
        except BaseException as error:  # (the first failure is re-raised by the caller's thread)
            if not stopped.is_set():
                failures.append(error)
            stop()
        finally:
            connection.close()  # this thread's own connection

    def stop() -> None:
        stopped.set()
        for raw in list(running):
            try:
                raw.cancel()
            except Exception:  # (its connection already closed)
                pass

    threads = [threading.Thread(target=run, args=(k,), name=f"{name}-{k}") for k in range(parts)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        stop()
        for thread in threads:
            thread.join()
        raise
    if failures:
        raise failures[0]
    total = _Found(spec)
    for one in found:
        if one is None:
            raise RuntimeError(f"a part of {name} ended without a result")
        total.merge(one)
    return total


def _on_own_connection(work: Callable[[], Any]) -> None:
    """Run `work` in a transaction of its own, on a connection of its own, committed before it returns."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            with transaction.atomic():
                work()
        except BaseException as failure:
            error.append(failure)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if error:
        raise error[0]


def _first_defaults(ok: Q, first_ok: Q | None, unit: Any) -> tuple[Q, Any]:
    if unit is None:
        unit = unit_expression(RECORDS)
    return (ok & Q(failover=False)) if first_ok is None else first_ok, unit


@dataclass
class _Found:
    """What one fold statement read: per arm, the new units, the change in exposure, the column sums and
    product changes of the touched units, and the sketch buckets of the new ok requests."""

    spec: RollupSpec
    deltas: dict[str, list[float]] = field(default_factory=dict)
    buckets: list[tuple[str, int, int, int]] = field(default_factory=list)  # (arm, field index, key, count)
    records: int = 0
    last_at: datetime | None = None
    tail: bool = False  # records above the horizon exist (the statement looked)
    leads: list[tuple[str, int, int, int]] = field(default_factory=list)  # (arm, first index, key, change)
    overs: list[tuple[str, int, int]] = field(default_factory=list)  # (arm, over index, change)

    def merge(self, other: _Found) -> None:
        """Add what `other` read (another part of the same fold: other units, other records) to this."""
        for arm_label, values in other.deltas.items():
            mine = self.deltas.get(arm_label)
            self.deltas[arm_label] = list(values) if mine is None else [a + b for a, b in zip(mine, values, strict=True)]
        self.buckets += other.buckets
        self.records += other.records
        if other.last_at is not None and (self.last_at is None or other.last_at > self.last_at):
            self.last_at = other.last_at
        self.tail = self.tail or other.tail
        self.leads += other.leads
        self.overs += other.overs

    def add_to(self, arms: dict[str, ArmRollup]) -> None:
        columns, pairs = self.spec.columns, self.spec.pairs
        for arm_label, values in self.deltas.items():
            arm = arms.setdefault(arm_label, ArmRollup())
            arm.units += round(values[0])
            arm.exposed += round(values[1])
            for column, value in zip(columns, values[2 : 2 + len(columns)], strict=True):
                arm.sums[column] = arm.sums.get(column, 0.0) + value
            for pair, value in zip(pairs, values[2 + len(columns) :], strict=True):
                arm.products[pair] = arm.products.get(pair, 0.0) + value
        names = [name for name, _ in self.spec.sketch]
        for arm_label, index, key, count in self.buckets:
            sketch = arms.setdefault(arm_label, ArmRollup()).sketches.setdefault(names[index], {})
            sketch[key] = sketch.get(key, 0) + count
        firsts = [name for name, _ in self.spec.firsts]
        for arm_label, index, key, change in self.leads:
            bins = arms.setdefault(arm_label, ArmRollup()).firsts.setdefault(firsts[index], {})
            bins[key] = bins.get(key, 0) + change
            if bins[key] == 0:
                del bins[key]
        for arm_label, index, change in self.overs:
            over = arms.setdefault(arm_label, ArmRollup()).over
            counted = over_key(*self.spec.over[index])
            over[counted] = over.get(counted, 0) + change


_QUERIES: dict[Hashable, _FoldQueries] = {}


def _fold_queries(spec: RollupSpec, session_rows: SessionRows, ok: Q, rows_key: Hashable | None, first_ok: Q,
                  unit: Any, table: FoldTable) -> _FoldQueries:  # fmt: skip
    if rows_key is None:
        return _FoldQueries.of(spec, session_rows, ok, first_ok, unit, table)
    key = (connection.vendor, table.name, spec, rows_key, ok, first_ok, unit)
    found = _QUERIES.get(key)
    if found is None:
        if len(_QUERIES) >= 256:  # plans' thresholds come and go: keep the cache small
            _QUERIES.clear()
        found = _QUERIES[key] = _FoldQueries.of(spec, session_rows, ok, first_ok, unit, table)
    return found


@dataclass(frozen=True)
class _FoldQueries:
    """A window's per-session rows and sketch buckets as SQL over the statement's `base`, and its key: the
    spec and these queries (a plan's thresholds are values in them), so that any change of what a unit
    row means starts another window instead of adding to rows that meant something else."""

    spec: RollupSpec
    rows: tuple[str, tuple[Any, ...]]
    recs: tuple[str, tuple[Any, ...]]
    leads: tuple[str, tuple[Any, ...]] | None = None
    model: Any = None  # the table's model (its columns are what `base` may read)

    @classmethod
    def of(cls, spec: RollupSpec, session_rows: SessionRows, ok: Q, first_ok: Q, unit: Any, table: FoldTable) -> _FoldQueries:
        rows = table.rows(None)
        leads = _over_base(_lead_rows(rows, spec, first_ok, unit)) if spec.firsts else None
        return cls(spec, _over_base(session_rows(rows)), _over_base(_sketch_rows(rows, spec, ok)), leads, rows.model)

    @property
    def key(self) -> str:
        leads = f" {self.leads!r}" if self.leads is not None else ""
        return hashlib.sha256(f"{self.spec.key} {self.rows!r} {self.recs!r}{leads}".encode()).hexdigest()

    @functools.cached_property
    def columns(self) -> tuple[str, ...]:
        return _base_columns(self.model, self.rows, self.recs, *([self.leads] if self.leads is not None else []))


def _fold(window_id: int, queries: _FoldQueries, fresh: QuerySet[Any], *, persist: bool,
          tail: QuerySet[Any] | None = None, empty: bool = False, constant: tuple[str, ...] = (),
          joined: UnitFill | None = None) -> _Found:  # fmt: skip
    """Read the records of `fresh` once: what they add to the arms, and with `persist` add them to the
    window's unit rows. On PostgreSQL that is one statement: the records are read once (`base`), grouped
    per session for the moments and per bucket for the sketches, and the unit rows are updated by a
    data-modifying WITH that reads them as they were before. SQLite, which has no such WITH, keeps the new
    per-session rows in a temporary table for the read and the update. `tail`: also say whether it holds
    any record. `empty`: the window has no unit rows yet (none is read, and the new ones are inserted).
    `constant`: the columns of the window's `UnitFill` (`_fold_sql`), in a later fold. `joined`, with
    `empty`: the window's `UnitFill`, read for the new units in the same statement (`_fresh_filled`): their
    rows are inserted with it, and its columns add to the sums and products like any other."""
    postgres = connection.vendor == "postgresql"
    spec = queries.spec
    base_sql, base_params = fresh.values(*queries.columns).query.sql_with_params()
    (rows_sql, rows_params), (recs_sql, recs_params) = queries.rows, queries.recs
    leads_sql, fresh_head, fresh_tail, ctes_sql, select_sql, writes_sql = _fold_sql(spec, empty=empty, constant=constant)
    # With first requests kept: each touched unit's first request among the new records, per field, beside
    # its new sums (`a<i>_at`, `a<i>_id`, `a<i>_x`, `a<i>_k`).
    leads, leads_params = "", ()
    if queries.leads is not None:
        leads, leads_params = f", leadrecs AS ({queries.leads[0]}), {leads_sql}", queries.leads[1]
    fresh_sql, fresh_params = f"{fresh_head}{rows_sql}{fresh_tail}", (*leads_params, *rows_params)
    if joined is not None:
        if not empty:
            raise ValueError("only a first fold reads its units' fill in its statement")
        fresh_sql, fresh_params = _fresh_filled(spec, joined, fresh_sql, fresh_params)
    tail_sql, tail_params = ("SELECT 1 WHERE 1 = 0", ()) if tail is None else tail.values("pk")[:1].query.sql_with_params()
    found = _Found(spec)
    with connection.cursor() as cursor:
        if postgres:
            writes = f", {writes_sql}" if persist else ""
            if not empty:
                # Each touched unit's stored row by a plain index probe. Once the unit table's statistics say a
                # unit repeats (the same sessions in several windows, or rows left dead), the planner made each
                # probe a bitmap scan: at 100 million records 58 us a probe against 6 (0.5 s of a look for
                # 8,300 sessions). Only for this statement: the history fill after it plans as it likes.
                cursor.execute("SELECT current_setting('enable_bitmapscan'), set_config('enable_bitmapscan', 'off', true)")
                bitmaps = cursor.fetchone()[0]
            cursor.execute(
                f"WITH base AS MATERIALIZED ({base_sql}){leads}, fresh AS MATERIALIZED ({fresh_sql}), recs AS ({recs_sql}), "
                f"tail AS ({tail_sql}), {ctes_sql}{writes} {select_sql}",
                [*base_params, *fresh_params, *recs_params, *tail_params, *([] if empty else [window_id]),
                 *([window_id] if persist else [])],
            )
            rows = cursor.fetchall()
            if not empty:
                cursor.execute("SELECT set_config('enable_bitmapscan', %s, true)", [bitmaps])
        else:
            cursor.execute(f"DROP TABLE IF EXISTS {FRESH}")
            cursor.execute(f"CREATE TEMP TABLE {FRESH} AS WITH base AS ({base_sql}){leads} {fresh_sql}", [*base_params, *fresh_params])
            cursor.execute(
                f"WITH base AS ({base_sql}), fresh AS (SELECT * FROM {FRESH}), recs AS ({recs_sql}), tail AS ({tail_sql}), "
                f"{ctes_sql} {select_sql}",
                [*base_params, *recs_params, *tail_params, *([] if empty else [window_id])],
            )
            rows = cursor.fetchall()
            if persist:
                cursor.execute(writes_sql.replace(" FROM fresh f ", f" FROM {FRESH} f ", 1), [window_id])
            cursor.execute(f"DROP TABLE {FRESH}")
    for kind, arm_label, index, at, *values in rows:
        if kind == "d":
            found.deltas[str(arm_label)] = [float(v or 0.0) for v in values]
        elif kind == "s":
            found.buckets.append((str(arm_label), int(index), int(values[0]), int(values[1])))
        elif kind == "c":
            found.records = int(values[0] or 0)
            found.last_at = _as_datetime(at)
        elif kind == "t":
            found.tail = bool(values[0])
        elif kind == "f":
            found.leads.append((str(arm_label), int(index), round(float(values[0])), int(values[1])))
        elif kind == "o":
            found.overs.append((str(arm_label), int(index), int(values[0] or 0)))
    return found


def _fresh_filled(spec: RollupSpec, fill: UnitFill, fresh_sql: str, fresh_params: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """A first fold's per-session rows (`fresh_sql`, the units' own sums, NULL in `fill`'s columns) with
    `fill`'s columns read for their units: what `_fill_units` would set on the rows after the fold, so the
    rows are written once (at 100 million records, `_fill_units` rewrote 3 million rows just inserted,
    and left the window's table and index at twice their size until a vacuum)."""
    quote = connection.ops.quote_name
    real = sql_float(connection.vendor)
    filled = [c for c in spec.columns if c in fill.columns]
    kept = ["arm_label", "unit", "first_at", *(c for c in spec.columns if c not in filled)]
    kept += [f"a{i}_{c}" for i in range(len(spec.firsts)) for c in FIRST_PARTS]
    values = [f"f.{quote(c)}" for c in kept] + [f"CAST(COALESCE(p.{quote(c)}, 0) AS {real}) AS {quote(c)}" for c in filled]
    head, params, key = with_unit_history(fresh_sql, fresh_params, fill.sql, connection)
    sql = f"SELECT * FROM ({head}SELECT {', '.join(values)} FROM unit_rows f LEFT JOIN history p ON p.{key} = f.unit) filled"
    return sql, params


def _last_unit_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT MAX(id) FROM {UNITS}")
        return int(cursor.fetchone()[0] or 0)


def _fill_units(window_id: int, after_id: int, upto_id: int, spec: RollupSpec, fill: UnitFill) -> _Found:
    """Set `fill`'s columns of the window's unit rows this fold stored (ids above `after_id`, up to `upto_id`
    read after the fold: ids only grow, and the window is locked), and return what that adds to the arms:
    those columns' sums, and every product with one of them at the units' totals after the fold. Later folds
    find the values stored and add only the products with their new sums (a fresh row has NULL, so 0, in
    these columns)."""
    quote = connection.ops.quote_name
    real = sql_float(connection.vendor)
    slot = {column: f"v{i}" for i, column in enumerate(spec.columns)}
    filled = [c for c in fill.columns if c in slot]
    # The fold's new rows by their ids, a range of the primary key closed at both ends (a few hundred rows),
    # the window only a filter on them. With `window_id = %s` the planner, from statistics taken while the
    # window was small, read every entry of the window in the (window, unit, arm) index (at 20 million records
    # 973,043 entries, twice: 210 of a look's 810 ms, for 332 rows); `+ 0` keeps it off that index. With the
    # range open above, the same statistics made it scan the whole table.
    mine = "u.id > %s AND u.id <= %s AND u.window_id + 0 = %s"
    kept = [slot[c] for c in spec.columns if c not in filled]
    rows_sql = f"SELECT {', '.join(['u.id AS unit_id', 'u.arm AS arm', 'u.unit AS unit', *(f'u.{v}' for v in kept)])} FROM {UNITS} u WHERE {mine}"
    # The new rows read once, their units' history from them (`with_unit_history`: each MATERIALIZED on
    # PostgreSQL, where as a plain subquery the history was re-run, a probe per session, for every unit row).
    head, params, key = with_unit_history(rows_sql, (after_id, upto_id, window_id), fill.sql, connection)
    # Per new unit row, its values (0 where `sql` knows nothing of the unit) and its stored totals.
    values = [f"CAST(COALESCE(p.{quote(c)}, 0) AS {real}) AS {quote(c)}" for c in filled]
    values += [f"CAST(COALESCE(u.{slot[c]}, 0) AS {real}) AS {quote(c)}" for c in spec.columns if c not in filled]
    sums = [f"SUM(f.{quote(c)})" if c in filled else "0" for c in spec.columns]
    products = [f"SUM(f.{quote(a)} * f.{quote(b)})" if a in filled or b in filled else "0" for a, b in spec.pairs]
    found = _Found(spec)
    sets = ", ".join(f"{slot[c]} = f.{quote(c)}" for c in filled)
    joined = f"SELECT u.unit_id AS unit_id, u.arm AS arm, {', '.join(values)} FROM unit_rows u LEFT JOIN history p ON p.{key} = u.unit"

    def grouped(rows: str) -> str:
        return f"SELECT f.arm, {', '.join(['0', '0', *sums, *products])} FROM {rows} f GROUP BY f.arm"

    # UPDATE ... FROM joins once (PostgreSQL, SQLite 3.33+); a subquery per column and row would scan the
    # per-unit rows for each (seconds at 10,000 new sessions). The new rows' id range keeps it to them: by
    # the join alone PostgreSQL, which cannot know how few rows `f` has, hashed it and read every unit row
    # of every window (14 ms of a 70 ms look at 1M records, the whole 3 million at 100M).
    def update(rows: str) -> str:
        return f"UPDATE {UNITS} SET {sets} FROM {rows} f WHERE f.unit_id = {UNITS}.id AND {UNITS}.id > %s AND {UNITS}.id <= %s"

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # One statement: the rows updated by a data-modifying WITH, the sums read from the same values.
            # (It was a temporary table created and dropped at every look: five statements, and the catalog's
            # rows for a table of 30 columns written and deleted each time.)
            cursor.execute(
                f"{head}, f AS MATERIALIZED ({joined}), written AS ({update('f')}) {grouped('f')}",
                [*params, after_id, upto_id],
            )
            rows = cursor.fetchall()
        else:  # (SQLite has no data-modifying WITH: the rows in a temporary table for the read and the update)
            cursor.execute(f"DROP TABLE IF EXISTS {FILL}")
            cursor.execute(f"CREATE TEMP TABLE {FILL} AS {head}{joined}", list(params))
            cursor.execute(grouped(FILL))
            rows = cursor.fetchall()
            cursor.execute(update(FILL), [after_id, upto_id])
            cursor.execute(f"DROP TABLE {FILL}")
    for arm_label, *row in rows:
        found.deltas[str(arm_label)] = [float(v or 0.0) for v in row]
    return found


def _base_columns(model: Any, *queries: tuple[str, tuple[Any, ...]]) -> tuple[str, ...]:
    """What a fold reads of a row of `model`: the columns the queries over `base` name, and no other (a
    record's other columns, ids and hashes, are most of its width: the statement keeps `base` in memory,
    not on disk)."""
    table = re.escape(connection.ops.quote_name(model._meta.db_table))
    named = {m for sql, _ in queries for m in re.findall(rf'{table}\.{_QUOTED}', sql)}
    fields = [f for f in model._meta.concrete_fields if f.column in named]
    columns = tuple(f.attname for f in fields)
    missing = named - {f.column for f in fields}
    if missing or "created_at" not in columns:
        raise RuntimeError(f"the fold's queries name columns {model.__name__} has not: {sorted(missing)}")
    return columns


def _over_base(rows: QuerySet[Any]) -> tuple[str, tuple[Any, ...]]:
    """The SQL of a query over the request-record table, made to read the statement's `base` instead (the
    records read once, under the table's name, so the query's column references stand)."""
    sql, params = rows.query.sql_with_params()
    table = connection.ops.quote_name(rows.model._meta.db_table)
    source = re.compile(rf"FROM {re.escape(table)}(?=\s|$)")
    if len(source.findall(sql)) != 1:
        raise RuntimeError(f"expected one FROM {table} in {sql[:200]!r}")
    return source.sub(f"FROM base {table}", sql, count=1), tuple(params)


def _as_datetime(value: Any) -> datetime | None:
    # SQLite hands raw timestamps back as text.
    if value is None or isinstance(value, datetime):
        return value
    parsed = parse_datetime(str(value))
    if parsed is not None and parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _lead_rows(records: QuerySet[Any], spec: RollupSpec, first_ok: Q, unit: Any) -> QuerySet[Any]:
    """Per record that counts for a first request: its arm, unit, time and id and, per `firsts` field, its
    latency `x<i>` and sketch bucket `k<i>` (NULL unless it measured that field)."""
    values: dict[str, Any] = {}
    for i, (_, column) in enumerate(spec.firsts):
        present = Q(**{f"{column}__isnull": False})
        values[f"x{i}"] = Case(When(present, then=F(column)), default=None, output_field=FloatField())
        values[f"k{i}"] = Case(When(present, then=sketch_key(column, spec.relative_accuracy)), default=None,
                               output_field=FloatField())  # fmt: skip
    return records.order_by().filter(first_ok).annotate(unit=unit, **values).values("arm", "unit", "created_at", "pk", *values)


def _sketch_rows(records: QuerySet[Any], spec: RollupSpec, ok: Q) -> QuerySet[Any]:
    """Per record: its arm, its time and, per sketched field, its sketch bucket (NULL unless it is an ok
    request with that latency)."""
    keys = {
        f"k{i}": Case(When(ok & Q(**{f"{column}__isnull": False}), then=sketch_key(column, spec.relative_accuracy)),
                      default=None, output_field=FloatField())
        for i, (_, column) in enumerate(spec.sketch)
    }  # fmt: skip
    return records.order_by().annotate(**keys).values("arm", "created_at", *keys)


# What a unit row keeps of its first request per `firsts` field (`first<i>_at`, `_id`, `_x`, `_k`): when it
# was made, its id (the tie-break), its latency and its sketch bucket.
FIRST_PARTS = ("at", "id", "x", "k")


def _sql_types() -> tuple[str, str]:
    """The fold's floating type, and the collation its sessions group and sort by: on PostgreSQL their
    bytes (the database's collation, C.UTF-8 or en_US, would compare every pair through strcoll, a good
    part of a look at thousands of touched sessions)."""
    return sql_float(connection.vendor), ' COLLATE "C"' if connection.vendor == "postgresql" else ""


@functools.cache
def _fold_sql(spec: RollupSpec, *, empty: bool = False, constant: tuple[str, ...] = ()) -> tuple[str, str, str, str, str, str]:
    """For the spec: with `firsts`, the common table expressions after WITH base and leadrecs that pick each
    unit's first request among the new records per field (`lead<i>`), and the head and tail that wrap the
    per-session rows' query into `fresh` with them; the fold's common table expressions after WITH base,
    fresh, recs and tail (one parameter, the window; none for a window with no unit rows yet, whose
    statement is `_first_fold_sql`'s), its SELECT, and what writes the unit rows (one parameter, the
    window): on PostgreSQL more common table expressions to follow those (`writes`: the touched rows
    rewritten in place, the new ones inserted), on SQLite an upsert from the temporary table.

    `merged` has a row per touched (arm, unit), the totals after the fold `t*` (new sums plus stored) and
    the stored sums `o*` side by side (and each stored row of a touched unit in another arm, with no new
    sums), so a column's sum changes by sum t - o over it and a product's by sum t_a t_b - o_a o_b (the
    new sums themselves are not kept: a narrower row, about 7 % of a steady fold at 1M), and exposure (a
    unit counts in the arm of its earliest first_at) by its count after less its count before. The SELECT gives rows (kind, arm, field, at,
    values...): "d" per arm, [new units, change in exposure, column sums..., product changes...]; "s" per
    arm, sketched field and bucket, [key, count]; "c" once, [records] and the latest created_at; "t" once,
    [1 if the tail holds a record]; "f" per arm, `firsts` field and bucket, [key, change in units whose
    first request is in it]; "o" per arm and `over` threshold, [change in units whose first request was
    over it]. A unit's first request changes (`c<i>` = 1) when the new records hold one for the field and
    the stored one is missing or later (by time, then id).

    `constant`: columns no later fold changes (a `UnitFill`'s: NULL in the new sums, stored with the unit by
    the window's first fold or set by `_fill_units` after the later fold that first stores it). A fold adds nothing to their sums; a product of two of them does
    not change, and one with another column changes by the constant's stored value times that column's
    change, so neither takes a product of totals (with the history's 9 columns, 54 of a look's 111
    products; about 6 % of a steady fold at 1M); they are not rewritten."""
    quote = connection.ops.quote_name
    postgres = connection.vendor == "postgresql"
    real, by_bytes = _sql_types()
    slots = [f"v{i}" for i in range(len(spec.columns))]
    index = {column: i for i, column in enumerate(spec.columns)}

    def earliest(a: str, b: str) -> str:
        return f"CASE WHEN {a} IS NULL THEN {b} WHEN {b} IS NULL THEN {a} WHEN {b} < {a} THEN {b} ELSE {a} END"

    # First requests: the new one per field (a<i>_*, from fresh), the stored one (first<i>_* of old, p<i>_*
    # in merged), and whether the new one replaces it (c<i>).
    leads = ", ".join(
        f"lead{i} AS (SELECT q.arm, q.unit, q.at, q.id, q.x, q.k FROM (SELECT r.arm, r.unit, r.created_at AS at, r.pk AS id, "
        f"r.x{i} AS x, r.k{i} AS k, ROW_NUMBER() OVER (PARTITION BY r.arm, r.unit{by_bytes} ORDER BY r.created_at, r.pk) "
        f"AS rn FROM leadrecs r WHERE r.x{i} IS NOT NULL) q WHERE q.rn = 1)"
        for i in range(len(spec.firsts))
    )  # fmt: skip
    fresh_head, fresh_tail = "", ""
    timestamp = connection.data_types["DateTimeField"]
    if spec.firsts:
        # Each unit's first requests in one row (`leadall`, computed once), joined to its new sums once. A
        # join of the rows to each field's `lead<i>` was planned from estimates: once the new records' commit
        # orders lay past the table's statistics, both sides were estimated at a row and joined by nested
        # loops that ran the field's window over every new record again for each session (at 1,000 shadow
        # pairs and seven fields, 2.6 s of a look).
        parts = [(i, c) for i in range(len(spec.firsts)) for c in FIRST_PARTS]
        kind = {"at": timestamp, "id": "BIGINT", "x": real, "k": real}

        def branch(i: int) -> str:
            # (UNION ALL takes each column's type from the first branch: its NULLs are typed and named.)
            values = [f"l.{c}" if j == i else f"CAST(NULL AS {kind[c]})" if i == 0 else "NULL" for j, c in parts]
            named = [f"{v} AS a{j}_{c}" for v, (j, c) in zip(values, parts, strict=True)] if i == 0 else values
            return f"SELECT l.arm AS arm, l.unit AS unit, {', '.join(named)} FROM lead{i} l"

        stacked = " UNION ALL ".join(branch(i) for i in range(len(spec.firsts)))
        taken = ", ".join(f"MAX(u.a{i}_{c}) AS a{i}_{c}" for i, c in parts)
        materialized = "MATERIALIZED " if connection.vendor == "postgresql" else ""
        leads += f", leadall AS {materialized}(SELECT u.arm, u.unit, {taken} FROM ({stacked}) u GROUP BY u.arm, u.unit)"
        picked = ", ".join(f"la.a{i}_{c} AS a{i}_{c}" for i, c in parts)
        fresh_head, fresh_tail = f"SELECT s.*, {picked} FROM (", ") s LEFT JOIN leadall la ON la.arm = s.arm_label AND la.unit = s.unit"
    first_columns = [f"first{i}_{c}" for i in range(len(spec.firsts)) for c in FIRST_PARTS]
    stored_firsts = "".join(f", o.{c}" for c in first_columns)

    def newer(new: str, old: str) -> str:
        return (f"{new}_at IS NOT NULL AND ({old}_at IS NULL OR {new}_at < {old}_at OR ({new}_at = {old}_at "
                f"AND {new}_id < {old}_id))")  # fmt: skip

    merged_firsts = "".join(
        f", CASE WHEN {newer(f'f.a{i}', f'o.first{i}')} THEN 1 ELSE 0 END AS c{i}"
        + "".join(f", f.a{i}_{c} AS a{i}_{c}, o.first{i}_{c} AS p{i}_{c}" for c in FIRST_PARTS)
        for i in range(len(spec.firsts))
    )  # fmt: skip

    stored = ", ".join(f"COALESCE(o.v{i}, 0) AS o{i}" for i in range(len(spec.columns)))
    # Each column's total after the fold, once per row (the products below use each total many times).
    totals = ", ".join(f"COALESCE(o.v{i}, 0) AS t{i}" if c in constant else
                       f"CAST(COALESCE(f.{quote(c)}, 0) AS {real}) + COALESCE(o.v{i}, 0) AS t{i}" for i, c in enumerate(spec.columns))  # fmt: skip
    width = 2 + len(spec.columns) + len(spec.pairs)
    # UNION ALL takes each column's type from its first branch: the NULLs there are typed.
    values = ["SUM(m.is_new)", "SUM(CASE WHEN m.after_at = m.a THEN 1 ELSE 0 END) - SUM(CASE WHEN m.before_at = m.b THEN 1 ELSE 0 END)"]
    values += ["0" if c in constant else f"SUM(m.t{i} - m.o{i})" for i, c in enumerate(spec.columns)]
    for a, b in spec.pairs:
        i, j = index[a], index[b]
        if a in constant and b in constant:
            values.append("0")
        elif a in constant or b in constant:
            k, x = (i, j) if a in constant else (j, i)
            values.append(f"SUM(m.o{k} * (m.t{x} - m.o{x}))")
        else:
            values.append(f"SUM(m.t{i} * m.t{j} - m.o{i} * m.o{j})")

    def padded(items: list[str]) -> str:
        return ", ".join(items + ["NULL"] * (width - len(items)))

    sketches = " UNION ALL ".join(
        f"SELECT r.arm, {i} AS field, r.k{i} AS k, COUNT(*) AS n FROM recs r WHERE r.k{i} IS NOT NULL GROUP BY r.arm, r.k{i}"
        for i in range(len(spec.sketch))
    )  # fmt: skip
    columns = ", ".join(f"o.{s}" for s in slots)
    # On PostgreSQL each stored row comes with its place (ctid): the fold rewrites a touched row there, with
    # no second index probe (ON CONFLICT made one more per touched session, and its speculative insertion).
    tid = "o.tid, " if postgres else ""
    if empty:
        if constant:
            raise ValueError("a first fold has no constant column: it reads its units' fill (`_fresh_filled`)")
        ctes, select, writes = _first_fold_sql(spec, sketches=sketches, padded=padded, timestamp=timestamp)
        return leads, fresh_head, fresh_tail, " ".join(ctes.split()), " ".join(select.split()), writes
    if postgres:
        # One index probe per touched unit, whatever the planner believes of the sizes: a new window's unit
        # rows are not in the table's statistics until it is analysed again, and the fresh rows' estimate
        # comes from commit orders past the statistics too, so a plain join or IN was planned as a scan of
        # every unit row of the window per touched unit (seconds at 80,000 units). OFFSET 0 keeps the
        # lateral subquery from being flattened into such a join. Only the slots the spec uses are read.
        used = ", ".join([f"u.{s}" for s in slots] + [f"u.{c}" for c in first_columns])
        stored_rows = (
            f"SELECT o.tid, o.arm, o.unit, o.first_at, {columns}{stored_firsts} FROM (SELECT DISTINCT unit FROM fresh) t CROSS JOIN LATERAL "
            f"(SELECT u.ctid AS tid, u.arm, u.unit, u.first_at, {used} FROM {UNITS} u WHERE u.window_id = %s "
            f"AND u.unit = t.unit OFFSET 0) o"
        )
    else:
        stored_rows = (f"SELECT o.arm, o.unit, o.first_at, {columns}{stored_firsts} FROM {UNITS} o WHERE o.window_id = %s "
                       f"AND o.unit IN (SELECT unit FROM fresh)")  # fmt: skip
    # A full join (hash or merge join only: never a loop over both sides) and window functions, not joins
    # whose plan follows the estimates.
    ctes = f"""
        old AS ({stored_rows}),
        merged AS (
            SELECT {tid}COALESCE(f.arm_label, o.arm) AS arm, COALESCE(f.unit, o.unit){by_bytes} AS unit,
                   o.first_at AS before_at, {earliest("o.first_at", "f.first_at")} AS after_at,
                   CASE WHEN o.unit IS NULL THEN 1 ELSE 0 END AS is_new,
                   CASE WHEN f.unit IS NULL THEN 0 ELSE 1 END AS touched, {stored}, {totals}{merged_firsts}
            FROM fresh f FULL JOIN old o ON o.arm = f.arm_label AND o.unit = f.unit),
        firsts AS (SELECT m.*, MIN(m.before_at) OVER (PARTITION BY m.unit) AS b,
                          MIN(m.after_at) OVER (PARTITION BY m.unit) AS a FROM merged m)"""
    # First requests: a unit whose first request changes leaves its stored bucket for the new one.
    lead_bins = " UNION ALL ".join(
        f"SELECT m.arm, {i} AS field, m.a{i}_k AS k, COUNT(*) AS n FROM merged m WHERE m.c{i} = 1 GROUP BY m.arm, m.a{i}_k "
        f"UNION ALL SELECT m.arm, {i}, m.p{i}_k, -COUNT(*) FROM merged m WHERE m.c{i} = 1 AND m.p{i}_at IS NOT NULL "
        f"GROUP BY m.arm, m.p{i}_k"
        for i in range(len(spec.firsts))
    )  # fmt: skip
    select = f"""
        SELECT 'd', m.arm, CAST(NULL AS INTEGER), CAST(NULL AS {timestamp}), {", ".join(values)}
        FROM firsts m GROUP BY m.arm {_select_rest(sketches, padded, lead_bins)}"""
    names_index = {name: i for i, (name, _) in enumerate(spec.firsts)}
    for j, (name, limit) in enumerate(spec.over):
        i, at = names_index[name], repr(float(limit))
        change = (f"CASE WHEN m.c{i} = 1 THEN (CASE WHEN m.a{i}_x > {at} THEN 1 ELSE 0 END) - "
                  f"(CASE WHEN m.p{i}_x > {at} THEN 1 ELSE 0 END) ELSE 0 END")  # fmt: skip
        select += f" UNION ALL SELECT 'o', m.arm, {j}, NULL, {padded([f'SUM({change})'])} FROM merged m GROUP BY m.arm"
    names = ", ".join(slots + first_columns)
    if postgres:
        # The touched stored rows get their totals in place (found by ctid: the window's row lock keeps
        # every other fold off them), the new (arm, unit) rows are inserted.
        sets = ", ".join(["first_at = m.after_at"] + [f"v{i} = m.t{i}" for i, c in enumerate(spec.columns) if c not in constant] + [
            f"first{i}_{c} = CASE WHEN m.c{i} = 1 THEN m.a{i}_{c} ELSE m.p{i}_{c} END"
            for i in range(len(spec.firsts)) for c in FIRST_PARTS
        ])  # fmt: skip
        new_values = ", ".join([f"m.t{i}" for i in range(len(slots))] + [f"m.a{i}_{c}" for i in range(len(spec.firsts)) for c in FIRST_PARTS])
        writes = (
            f"rewrite AS (UPDATE {UNITS} u SET {sets} FROM merged m WHERE u.ctid = m.tid AND m.touched = 1 AND m.is_new = 0), "
            f"added AS (INSERT INTO {UNITS} (window_id, arm, unit, first_at, {names}) "
            f"SELECT %s, m.arm, m.unit, m.after_at, {new_values} FROM merged m WHERE m.is_new = 1)"
        )
        return leads, fresh_head, fresh_tail, " ".join(ctes.split()), " ".join(select.split()), writes
    earliest_at = earliest(f"{UNITS}.first_at", "excluded.first_at")
    updates = ", ".join(
        [f"first_at = {earliest_at}"]
        + [f"{s} = COALESCE({UNITS}.{s}, 0) + COALESCE(excluded.{s}, 0)" for s, c in zip(slots, spec.columns, strict=True) if c not in constant]
        + [f"first{i}_{c} = CASE WHEN {newer(f'excluded.first{i}', f'{UNITS}.first{i}')} THEN excluded.first{i}_{c} "
           f"ELSE {UNITS}.first{i}_{c} END" for i in range(len(spec.firsts)) for c in FIRST_PARTS]
    )  # fmt: skip
    fresh_values = ", ".join([f"f.{quote(c)}" for c in spec.columns] + [f"f.a{i}_{c}" for i in range(len(spec.firsts)) for c in FIRST_PARTS])
    # "WHERE 1 = 1": SQLite reads ON CONFLICT after a bare SELECT as a join's ON.
    upsert = (
        f"INSERT INTO {UNITS} (window_id, arm, unit, first_at, {names}) "
        f"SELECT %s, f.arm_label, f.unit, f.{quote('first_at')}, {fresh_values} FROM fresh f WHERE 1 = 1 "
        f"ON CONFLICT (window_id, arm, unit) DO UPDATE SET {updates}"
    )
    return leads, fresh_head, fresh_tail, " ".join(ctes.split()), " ".join(select.split()), upsert


def _select_rest(sketches: str, padded: Callable[[list[str]], str], lead_bins: str) -> str:
    """A fold's SELECT after its "d" rows, alike in every fold (`_fold_sql`'s docstring): the sketches'
    buckets ("s"), the records read ("c"), whether the tail holds a record ("t") and, with `lead_bins`, the
    first requests' bucket changes ("f")."""
    rest = f"""
        {"UNION ALL SELECT 's', s.arm, s.field, NULL, " + padded(["s.k", "s.n"]) + f" FROM ({sketches}) s" if sketches else ""}
        UNION ALL SELECT 'c', NULL, NULL, MAX(r.created_at), {padded(["COUNT(*)"])} FROM recs r
        UNION ALL SELECT 't', NULL, NULL, NULL, {padded(["(SELECT COUNT(*) FROM tail)"])}"""
    if lead_bins:
        rest += f" UNION ALL SELECT 'f', q.arm, q.field, NULL, {padded(['q.k', 'q.n'])} FROM ({lead_bins}) q"
    return rest


def _first_fold_sql(spec: RollupSpec, *, sketches: str, padded: Callable[[list[str]], str],
                    timestamp: str) -> tuple[str, str, str]:  # fmt: skip
    """`_fold_sql`'s common table expressions, SELECT and writes for a window's first fold, when it has no
    unit row yet (a cold look: at 100 million records, 10 million records in 3 million sessions). Every
    fresh row is then a new unit whose sums are its totals, so nothing is read back or merged: the rows
    (kind, arm, field, at, values...) are `_fold_sql`'s, computed from `fresh` alone. Exposure (a unit
    counts in the arm of its earliest first request) takes a window function over four narrow columns,
    not over the wide merged rows the later folds need (at 3 million units those, 2 GB, were written to
    disk twice: materialised, then sorted). A `UnitFill`'s columns are in the fresh rows already
    (`_fresh_filled`): they add up like the others. No parameter but the writes' window."""
    quote = connection.ops.quote_name
    postgres = connection.vendor == "postgresql"
    real, by_bytes = _sql_types()
    index = {column: i for i, column in enumerate(spec.columns)}
    sums = [f"CAST(COALESCE(f.{quote(c)}, 0) AS {real})" for c in spec.columns]
    totals = ["COUNT(*) AS units", *(f"SUM({n}) AS s{i}" for i, n in enumerate(sums))]
    totals += [f"SUM({sums[index[a]]} * {sums[index[b]]}) AS p{k}" for k, (a, b) in enumerate(spec.pairs)]
    ctes = f"""
        exposed AS (SELECT q.arm, COUNT(*) AS n FROM (SELECT f.arm_label AS arm, f.first_at AS at,
                           MIN(f.first_at) OVER (PARTITION BY f.unit{by_bytes}) AS a FROM fresh f) q
                    WHERE q.at = q.a GROUP BY q.arm),
        totals AS (SELECT f.arm_label AS arm, {", ".join(totals)} FROM fresh f GROUP BY f.arm_label)"""
    values = ["t.units", "COALESCE(e.n, 0)", *(f"t.s{i}" for i in range(len(sums))), *(f"t.p{k}" for k in range(len(spec.pairs)))]
    # First requests: each new unit's, per field, enters its bucket (no stored one to leave).
    lead_bins = " UNION ALL ".join(
        f"SELECT f.arm_label AS arm, {i} AS field, f.a{i}_k AS k, COUNT(*) AS n FROM fresh f WHERE f.a{i}_at IS NOT NULL "
        f"GROUP BY f.arm_label, f.a{i}_k"
        for i in range(len(spec.firsts))
    )  # fmt: skip
    select = f"""
        SELECT 'd', t.arm, CAST(NULL AS INTEGER), CAST(NULL AS {timestamp}), {", ".join(values)}
        FROM totals t LEFT JOIN exposed e ON e.arm = t.arm {_select_rest(sketches, padded, lead_bins)}"""
    names_index = {name: i for i, (name, _) in enumerate(spec.firsts)}
    for j, (name, limit) in enumerate(spec.over):
        i, at = names_index[name], repr(float(limit))
        over = f"CASE WHEN f.a{i}_at IS NOT NULL AND f.a{i}_x > {at} THEN 1 ELSE 0 END"
        select += f" UNION ALL SELECT 'o', f.arm_label, {j}, NULL, {padded([f'SUM({over})'])} FROM fresh f GROUP BY f.arm_label"
    firsts = [f"first{i}_{c}" for i in range(len(spec.firsts)) for c in FIRST_PARTS]
    names = ", ".join([f"v{i}" for i in range(len(spec.columns))] + firsts)
    new_values = ", ".join(sums + [f"f.a{i}_{c}" for i in range(len(spec.firsts)) for c in FIRST_PARTS])
    # In the unique index's order: each row then goes to the index's rightmost page (a new window is the
    # newest), not to a random one.
    writes = (
        f"INSERT INTO {UNITS} (window_id, arm, unit, first_at, {names}) "
        f"SELECT %s, f.arm_label, f.unit, f.first_at, {new_values} FROM fresh f ORDER BY f.unit{by_bytes}, f.arm_label"
    )
    if postgres:
        writes = f"added AS ({writes})"
    return ctes, select, writes


def window_scratch(
    *, rollout_id: int, since: datetime, until: datetime | None, spec: RollupSpec, session_rows: SessionRows,
    outcome_ok: Q | None = None, horizon: int | None = None, first_ok: Q | None = None, unit: Any = None,
    fill: UnitFill | None = None, table: FoldTable = RECORD_TABLE,
) -> dict[str, ArmRollup]:  # fmt: skip
    """The same arms computed from scratch over every record of the window (below `horizon` in commit order
    when given): what each look computed before rollups, and the check that the folds add up to it. With
    `fill`, each unit's `fill` columns are what its `sql` gives (0 for a unit it does not know), as the folds
    store them."""
    ok = outcome_ok if outcome_ok is not None else Q(outcome="ok")
    first_ok, unit = _first_defaults(ok, first_ok, unit)
    records = table.rows(rollout_id).filter(created_at__gte=since).order_by()
    if until is not None:
        records = records.filter(created_at__lt=until)
    if horizon is not None:
        records = table.committed(records, start=0, end=horizon)
    # The moments as a look from scratch computes them (`merge_rows`), the fill's columns joined per unit.
    filled = [c for c in spec.columns if fill is not None and c in fill.columns]
    moments = merge_rows(session_rows(records), columns=spec.columns, pairs=spec.pairs,
                         joined=fill.sql if fill is not None and filled else None, joined_columns=filled)  # fmt: skip
    arms = {arm: ArmRollup(m.units, m.exposed, dict(m.sums), dict(m.products)) for arm, m in moments.items()}
    for name, column in spec.sketch:
        buckets = (
            records.filter(ok & Q(**{f"{column}__isnull": False}))
            .annotate(bucket=sketch_key(column, spec.relative_accuracy))
            .values("arm", "bucket")
            .annotate(n=Count("pk"))
        )
        for row in buckets:
            arms.setdefault(row["arm"], ArmRollup()).sketches.setdefault(name, {})[int(row["bucket"])] = int(row["n"])
    for name, column in spec.firsts:
        limits = [limit for over, limit in spec.over if over == name]
        for arm, bucket, count, overs in firsts_scratch(records, column, first_ok=first_ok, unit=unit, limits=limits,
                                                       relative_accuracy=spec.relative_accuracy):  # fmt: skip
            found = arms.setdefault(arm, ArmRollup())
            found.firsts.setdefault(name, {})[bucket] = count
            for limit, n in zip(limits, overs, strict=True):
                key = over_key(name, limit)
                found.over[key] = found.over.get(key, 0) + n
    return arms


def firsts_scratch(records: QuerySet[Any], column: str, *, first_ok: Q, unit: Any, limits: Sequence[float] = (),
                   relative_accuracy: float = RELATIVE_ACCURACY) -> list[tuple[str, int, int, list[int]]]:  # fmt: skip
    """From scratch, each unit's first request (by created_at, then id) among `records` that match
    `first_ok` and measured `column`, per arm and sketch bucket: (arm, bucket, units, [units over each
    limit]). One grouped query over every record: what the fold keeps look by look."""
    quote = connection.ops.quote_name
    present = first_ok & Q(**{f"{column}__isnull": False})
    first = Window(RowNumber(), partition_by=[F("arm"), bytewise(unit)], order_by=[F("created_at").asc(), F("pk").asc()])
    overs = {f"over{i}": Case(When(**{f"{column}__gt": limit}, then=Value(1)), default=Value(0), output_field=IntegerField())
             for i, limit in enumerate(limits)}  # fmt: skip
    inner = records.order_by().filter(present).annotate(first=first, bucket=sketch_key(column, relative_accuracy), **overs)
    sql, params = inner.values("arm", "first", "bucket", *overs).query.sql_with_params()
    sums = "".join(f", SUM(t.{quote(key)})" for key in overs)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT t.arm, t.bucket, COUNT(*){sums} FROM ({sql}) t WHERE t.{quote('first')} = 1 "
                       f"GROUP BY t.arm, t.bucket", params)  # fmt: skip
        rows = cursor.fetchall()
    return [(str(r[0]), int(r[1]), int(r[2]), [int(v or 0) for v in r[3:]]) for r in rows]


def arms_from_scratch_equal(a: dict[str, ArmRollup], b: dict[str, ArmRollup], *, rel: float = 1e-9) -> list[str]:
    """Where two windows' arms differ (beyond float rounding of sums taken in another order): empty when the
    incremental and the from-scratch computations agree."""
    problems = []
    for arm in sorted(set(a) | set(b)):
        x, y = a.get(arm, ArmRollup()), b.get(arm, ArmRollup())
        if (x.units, x.exposed) != (y.units, y.exposed):
            problems.append(f"{arm}: units/exposed {x.units}/{x.exposed} != {y.units}/{y.exposed}")
        for kind, left, right in (("sum", x.sums, y.sums), ("product", x.products, y.products)):
            for key in set(left) | set(right):
                u, v = left.get(key, 0.0), right.get(key, 0.0)  # type: ignore[call-overload]
                if not math.isclose(u, v, rel_tol=rel, abs_tol=1e-9):
                    problems.append(f"{arm}: {kind} {key}: {u} != {v}")
        if x.sketches != y.sketches:
            problems.append(f"{arm}: sketches differ")
        if x.firsts != y.firsts:
            problems.append(f"{arm}: first requests' buckets differ")
        if {k: n for k, n in x.over.items() if n} != {k: n for k, n in y.over.items() if n}:
            problems.append(f"{arm}: first requests over thresholds {x.over} != {y.over}")
    return problems


def window_drop(*, rollout_ids: Sequence[int]) -> int:
    """Forget the rollups of these rollouts. Returns how many windows went (their unit rows with them)."""
    _, by_model = RollupWindow.objects.filter(rollout_id__in=list(rollout_ids)).delete()
    return by_model.get(RollupWindow._meta.label, 0)


def windows_prune(*, keep_rollout_ids: Sequence[int]) -> int:
    """Forget the rollups of every rollout but these (the live ones: an ended rollout's looks are stored,
    and nothing reads its rollup again). Returns how many windows went."""
    _, by_model = RollupWindow.objects.exclude(rollout_id__in=list(keep_rollout_ids)).delete()
    # Unit rows whose window went without them (the database does not tie them to it: a window deleted
    # while a fold still inserted into it); one anti-join over the table, at each retention run.
    RollupUnit.objects.exclude(window_id__in=RollupWindow.objects.values("pk")).delete()
    return by_model.get(RollupWindow._meta.label, 0)
