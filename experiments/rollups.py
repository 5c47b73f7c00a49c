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

Why DDSketch: its quantiles come with a guarantee, each within a relative error `RELATIVE_ACCURACY` of the
true nearest-rank value, whatever the distribution; its buckets add, so the sketch of a window is the same
whichever looks built it (t-digest's merge is approximate and depends on the order of merging, and gives
no worst-case bound). The `ddsketch` package is DataDog's own Python implementation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ddsketch.mapping import LogarithmicMapping
from django.db import connection, transaction
from django.db.models import Count, F, FloatField, Max, Q, QuerySet, Value
from django.db.models.functions import Ceil, Greatest, Ln

from experiments.models import ROLLUP_SLOTS, RollupUnit, RollupWindow
from serving.selectors import record_commit_horizon, request_records, request_records_committed

# Every percentile read from a sketch is within 1 % of the true nearest-rank value.
RELATIVE_ACCURACY = 0.01
# As the analysis: a latency of 0 (a clock's resolution) is sketched as a microsecond.
SKETCH_FLOOR_MS = 1e-3
UNITS = RollupUnit._meta.db_table
FRESH = "rollup_fresh"


@dataclass(frozen=True)
class RollupSpec:
    """What a window keeps: the per-session columns (in slot order), the products of columns the metrics'
    variances need, and the latency fields to sketch, (logical name, record column), over ok requests."""

    columns: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    sketch: tuple[tuple[str, str], ...] = ()
    relative_accuracy: float = RELATIVE_ACCURACY

    def __post_init__(self) -> None:
        if len(self.columns) > ROLLUP_SLOTS:
            raise ValueError(f"columns: at most {ROLLUP_SLOTS}, got {len(self.columns)}")
        unknown = {c for pair in self.pairs for c in pair} - set(self.columns)
        if unknown:
            raise ValueError(f"pairs: columns not kept: {sorted(unknown)}")

    def as_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "pairs": [list(p) for p in self.pairs],
                "sketch": [list(s) for s in self.sketch], "relative_accuracy": self.relative_accuracy}  # fmt: skip

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class ArmRollup:
    """One arm of a window: what `experiments.analysis.sessions.merge_rows` gives, and the sketches."""

    units: int = 0
    exposed: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    products: dict[tuple[str, str], float] = field(default_factory=dict)
    sketches: dict[str, dict[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "units": self.units, "exposed": self.exposed, "sums": self.sums,
            "products": {f"{a}|{b}": v for (a, b), v in self.products.items()},
            "sketches": {name: {str(k): n for k, n in buckets.items()} for name, buckets in self.sketches.items()},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArmRollup:
        return cls(
            units=int(data.get("units", 0)), exposed=int(data.get("exposed", 0)),
            sums={k: float(v) for k, v in (data.get("sums") or {}).items()},
            products={tuple(k.split("|", 1)): float(v) for k, v in (data.get("products") or {}).items()},  # type: ignore[misc]
            sketches={name: {int(k): int(n) for k, n in buckets.items()} for name, buckets in (data.get("sketches") or {}).items()},
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

    @property
    def records_read(self) -> int:
        return self.settled + self.unsettled


def _mapping(relative_accuracy: float) -> LogarithmicMapping:
    return LogarithmicMapping(relative_accuracy)


def sketch_key(column: str, relative_accuracy: float) -> Any:
    """The sketch bucket of a latency, in SQL: LogarithmicMapping.key, ceil(ln(x) / ln(gamma))."""
    multiplier = 1.0 / math.log(_mapping(relative_accuracy).gamma)
    floored = Greatest(F(column), Value(SKETCH_FLOOR_MS), output_field=FloatField())
    return Ceil(Ln(floored) * Value(multiplier, output_field=FloatField()))


SessionRows = Callable[[QuerySet[Any]], QuerySet[Any]]


def window_fold(
    *,
    rollout_id: int,
    since: datetime,
    until: datetime | None,
    spec: RollupSpec,
    session_rows: SessionRows,
    outcome_ok: Q | None = None,
) -> Folded:
    """Fold the records of a rollout's window [since, until) committed since the window's watermark into
    its rollup, and return the arms. `session_rows(records)` gives one row per (arm_label, unit) with the
    spec's columns and `first_at` (experiments.analysis.sessions.session_rows). Safe to run twice and from
    two workers: the window row is locked for the fold."""
    ok = outcome_ok if outcome_ok is not None else Q(outcome="ok")
    with transaction.atomic():
        window, _ = RollupWindow.objects.select_for_update().get_or_create(
            rollout_id=rollout_id, since=since, spec_hash=spec.key, defaults={"until": until, "spec": spec.as_dict()}
        )
        rebuilt = False
        if until != window.until:
            if until is not None and window.max_created_at is not None and window.max_created_at >= until:
                # Records past the window's new end were folded while it was open: start it over.
                RollupUnit.objects.filter(window=window).delete()
                window.watermark, window.records, window.arms, window.max_created_at = 0, 0, {}, None
                rebuilt = True
            window.until = until
        horizon = record_commit_horizon()
        arms = {arm: ArmRollup.from_json(data) for arm, data in (window.arms or {}).items()}
        records = request_records(rollout_id=rollout_id).filter(created_at__gte=since)
        if until is not None:
            records = records.filter(created_at__lt=until)
        read = 0
        if horizon > window.watermark:
            fresh = request_records_committed(records, start=window.watermark, end=horizon).order_by()
            read = _fold(window, spec, fresh, session_rows, ok, arms, persist=True)
            window.watermark = horizon
            window.records += read
            window.arms = {arm: rollup.to_json() for arm, rollup in arms.items()}
        window.save()
        # Records already visible but not settled yet (committed by a transaction above the horizon, or
        # written in this one): counted in this look, folded for good by a later one.
        tail = request_records_committed(records, start=max(horizon, window.watermark), end=2**63 - 1).order_by()
        seen = {arm: ArmRollup.from_json(rollup.to_json()) for arm, rollup in arms.items()}
        unsettled = _fold(window, spec, tail, session_rows, ok, seen, persist=False)
    return Folded(arms=seen, settled=read, unsettled=unsettled, rebuilt=rebuilt, watermark=window.watermark)


def _fold(
    window: RollupWindow, spec: RollupSpec, fresh: QuerySet[Any], session_rows: SessionRows, ok: Q,
    arms: dict[str, ArmRollup], *, persist: bool,
) -> int:  # fmt: skip
    """Add the records of `fresh` to `arms`; with `persist`, to the window's unit rows as well."""
    quote = connection.ops.quote_name
    real = "REAL" if connection.vendor == "sqlite" else "DOUBLE PRECISION"
    slot = {column: f"v{i}" for i, column in enumerate(spec.columns)}
    rows_sql, rows_params = session_rows(fresh).query.sql_with_params()
    with connection.cursor() as cursor:
        # The new per-session rows are read twice (the deltas, then the upsert): once into a temporary table.
        cursor.execute(f"DROP TABLE IF EXISTS {FRESH}")
        cursor.execute(f"CREATE TEMP TABLE {FRESH} AS {rows_sql}", rows_params)
        cursor.execute(f"SELECT COUNT(*) FROM {FRESH}")
        if cursor.fetchone()[0] == 0:
            cursor.execute(f"DROP TABLE {FRESH}")
            return 0

        def new(column: str) -> str:
            return f"CAST(COALESCE(f.{quote(column)}, 0) AS {real})"

        def old(column: str) -> str:
            return f"COALESCE(r.{slot[column]}, 0)"

        # Per arm: new units, the added column sums, and how each product sum changes for the touched units.
        selects = ["f.arm_label", "SUM(CASE WHEN r.id IS NULL THEN 1 ELSE 0 END)"]
        selects += [f"SUM({new(c)})" for c in spec.columns]
        selects += [
            f"SUM(({new(a)} + {old(a)}) * ({new(b)} + {old(b)}) - {old(a)} * {old(b)})" for a, b in spec.pairs
        ]
        cursor.execute(
            f"SELECT {', '.join(selects)} FROM {FRESH} f LEFT JOIN {UNITS} r "
            f"ON r.window_id = %s AND r.arm = f.arm_label AND r.unit = f.unit GROUP BY f.arm_label",
            [window.pk],
        )
        for row in cursor.fetchall():
            arm = arms.setdefault(str(row[0]), ArmRollup())
            arm.units += int(row[1] or 0)
            values = [float(v or 0.0) for v in row[2:]]
            for column, value in zip(spec.columns, values[: len(spec.columns)], strict=True):
                arm.sums[column] = arm.sums.get(column, 0.0) + value
            for pair, value in zip(spec.pairs, values[len(spec.columns) :], strict=True):
                arm.products[pair] = arm.products.get(pair, 0.0) + value
        # Exposure: a unit counts in the arm of its first non-failover request; only touched units change.
        cursor.execute(
            f"""
            WITH touched AS (SELECT DISTINCT unit FROM {FRESH}),
            before AS (SELECT r.unit, r.arm, r.first_at FROM {UNITS} r JOIN touched t ON t.unit = r.unit
                       WHERE r.window_id = %s),
            merged AS (SELECT unit, arm, MIN(first_at) AS first_at FROM (
                           SELECT unit, arm, first_at FROM before
                           UNION ALL SELECT unit, arm_label, first_at FROM {FRESH}) x GROUP BY unit, arm),
            before_first AS (SELECT unit, MIN(first_at) AS m FROM before GROUP BY unit),
            merged_first AS (SELECT unit, MIN(first_at) AS m FROM merged GROUP BY unit)
            SELECT arm, SUM(delta) FROM (
                SELECT m.arm, CASE WHEN m.first_at = mf.m THEN 1 ELSE 0 END AS delta
                FROM merged m JOIN merged_first mf ON mf.unit = m.unit
                UNION ALL
                SELECT b.arm, CASE WHEN b.first_at = bf.m THEN -1 ELSE 0 END AS delta
                FROM before b JOIN before_first bf ON bf.unit = b.unit
            ) d GROUP BY arm
            """,
            [window.pk],
        )
        for arm_label, delta in cursor.fetchall():
            arms.setdefault(str(arm_label), ArmRollup()).exposed += int(delta or 0)
        if not persist:
            cursor.execute(f"DROP TABLE {FRESH}")
            slots: list[str] = []
        else:
            slots = [slot[c] for c in spec.columns]
    if persist:
        _units_add(window, spec, slots)
    # The sketches: bucket counts of the new ok requests, per arm and field.
    for name, column in spec.sketch:
        buckets = (
            fresh.filter(ok & Q(**{f"{column}__isnull": False}))
            .annotate(bucket=sketch_key(column, spec.relative_accuracy))
            .values("arm", "bucket")
            .annotate(n=Count("pk"))
        )
        for row in buckets:
            sketch = arms.setdefault(row["arm"], ArmRollup()).sketches.setdefault(name, {})
            key = int(row["bucket"])
            sketch[key] = sketch.get(key, 0) + int(row["n"])
    counted = fresh.aggregate(n=Count("pk"), last=Max("created_at"))
    if persist and counted["last"] is not None and (window.max_created_at is None or counted["last"] > window.max_created_at):
        window.max_created_at = counted["last"]
    return int(counted["n"])


def _units_add(window: RollupWindow, spec: RollupSpec, slots: list[str]) -> None:
    """The units themselves: add the new sums (from the temporary table), keep the earliest first request."""
    quote = connection.ops.quote_name
    earliest = (
        f"CASE WHEN {UNITS}.first_at IS NULL THEN excluded.first_at WHEN excluded.first_at IS NULL "
        f"THEN {UNITS}.first_at WHEN excluded.first_at < {UNITS}.first_at THEN excluded.first_at "
        f"ELSE {UNITS}.first_at END"
    )
    updates = ", ".join([f"first_at = {earliest}"] + [f"{s} = COALESCE({UNITS}.{s}, 0) + COALESCE(excluded.{s}, 0)" for s in slots])
    fresh_values = ", ".join(f"f.{quote(c)}" for c in spec.columns)
    with connection.cursor() as cursor:
        # "WHERE 1 = 1": SQLite reads ON CONFLICT after a bare SELECT as a join's ON.
        cursor.execute(
            f"INSERT INTO {UNITS} (window_id, arm, unit, first_at{''.join(', ' + s for s in slots)}) "
            f"SELECT %s, f.arm_label, f.unit, f.{quote('first_at')}, {fresh_values} FROM {FRESH} f WHERE 1 = 1 "
            f"ON CONFLICT (window_id, arm, unit) DO UPDATE SET {updates}",
            [window.pk],
        )
        cursor.execute(f"DROP TABLE {FRESH}")


def window_scratch(
    *, rollout_id: int, since: datetime, until: datetime | None, spec: RollupSpec, session_rows: SessionRows,
    outcome_ok: Q | None = None, horizon: int | None = None,
) -> dict[str, ArmRollup]:  # fmt: skip
    """The same arms computed from scratch over every record of the window (below `horizon` in commit order
    when given): what each look computed before rollups, and the check that the folds add up to it."""
    ok = outcome_ok if outcome_ok is not None else Q(outcome="ok")
    records = request_records(rollout_id=rollout_id).filter(created_at__gte=since).order_by()
    if until is not None:
        records = records.filter(created_at__lt=until)
    if horizon is not None:
        records = request_records_committed(records, start=0, end=horizon)
    quote = connection.ops.quote_name
    real = "REAL" if connection.vendor == "sqlite" else "DOUBLE PRECISION"
    inner, params = session_rows(records).query.sql_with_params()

    def col(name: str) -> str:
        return f"CAST(COALESCE(t.{quote(name)}, 0) AS {real})"

    selects = ["t.arm_label", "COUNT(*)", "SUM(CASE WHEN t.first_at = t.unit_first THEN 1 ELSE 0 END)"]
    selects += [f"SUM({col(c)})" for c in spec.columns] + [f"SUM({col(a)} * {col(b)})" for a, b in spec.pairs]
    sql = (
        f"SELECT {', '.join(selects)} FROM (SELECT s.*, MIN(s.first_at) OVER (PARTITION BY s.unit) AS unit_first "
        f"FROM ({inner}) s) t GROUP BY t.arm_label"
    )
    arms: dict[str, ArmRollup] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for row in cursor.fetchall():
            values = [float(v or 0.0) for v in row[3:]]
            arms[str(row[0])] = ArmRollup(
                units=int(row[1]), exposed=int(row[2] or 0),
                sums=dict(zip(spec.columns, values[: len(spec.columns)], strict=True)),
                products=dict(zip(spec.pairs, values[len(spec.columns) :], strict=True)),
            )  # fmt: skip
    for name, column in spec.sketch:
        buckets = (
            records.filter(ok & Q(**{f"{column}__isnull": False}))
            .annotate(bucket=sketch_key(column, spec.relative_accuracy))
            .values("arm", "bucket")
            .annotate(n=Count("pk"))
        )
        for row in buckets:
            arms.setdefault(row["arm"], ArmRollup()).sketches.setdefault(name, {})[int(row["bucket"])] = int(row["n"])
    return arms


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
    return problems


def window_drop(*, rollout_ids: Sequence[int]) -> int:
    """Forget the rollups of these rollouts (ended ones: their looks are stored)."""
    deleted, _ = RollupWindow.objects.filter(rollout_id__in=list(rollout_ids)).delete()
    return deleted
