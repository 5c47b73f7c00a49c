"""The samples of the tail guardrails and SLOs: one request per session. For a guardrail
(`experiments.stats.quantiles`), per arm and latency field, binned as the rollups' sketches bin
(`experiments.rollups.sketch_key`); for a tail SLO, the candidate's sessions whose first request was over
each threshold (`first_request_over`). Counted in SQL.

A quantile's confidence sequence needs independent observations; a sticky user's requests are not. So each
session contributes its first request (by `created_at`, then id) among those that measured the field: an ok
request that was not a failover attempt, with the latency recorded, in any of the given windows. A request
without a session is its own unit (`sessions.unit_expression`). A session that the gateway moved to the
other arm between steps has a first request in each arm; the two arms' sequences need not be independent
of each other (the guardrail is a union bound over them), only each arm's observations among themselves.

Shadow steps: the same, over shadow pairs. A pair keeps its request's session hash, so each session
contributes its first pair (by `created_at`, then id) among those that measured the field, and a pair
without a session is its own unit (`sessions.SHADOW`). For a guardrail the pair must have both sides, both
timed by the mirror task, and its two sides are the arms; for a tail SLO the candidate's side alone
(`shadow_pair_over`). Read pair by pair, one heavy user's slow pairs would be most of the sample. A shadow
step's look reads both from its folded window (`experiments.analysis.shadow`); `shadow_pair_bins` and
`shadow_pair_over` count them from every pair of the step, the fold's check.

Folded look by look (experiments.rollups): each window's unit row keeps, per latency field, the session's
first request (its time and id, latency and sketch bucket), replaced only by an earlier one (a batch
committed late), and the window keeps per arm the count of sessions per bucket of their first request and
over each tail SLO's threshold, changed by the fold as sessions' first requests are set or replaced. A look
over one window reads those counts (the fold reads only the new records); over several steps' windows it
takes away, from each window but the earliest, its sessions that had a first request in an earlier one
(a query over that window's unit rows: its sessions, not its records). The windows' rollups are those of
`experiments.analysis.arm_sums` when given the same tail SLO thresholds. `first_request_bins_scratch` and
`first_request_over_scratch` count the same from the records (every record of the windows, at every look):
the check of the folds, and what a rollup that does not fit falls back on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import connection
from django.db.models import Case, F, IntegerField, Q, QuerySet, Value, When, Window
from django.db.models.functions import RowNumber

from experiments.analysis.paired import PAIRED_FIELDS
from experiments.analysis.sessions import RECORDS, SHADOW, bytewise, unit_expression
from experiments.models import RollupUnit
from serving.selectors import request_records, shadow_pairs

if TYPE_CHECKING:
    from experiments.analysis.preperiod import PrePeriod

Bins = dict[int, int]


def _in_windows(windows: Iterable[tuple[datetime, datetime | None]]) -> Q:
    found = Q(pk__in=[])
    for since, until in windows:
        window = Q(created_at__gte=since)
        if until is not None:
            window &= Q(created_at__lt=until)
        found |= window
    return found


def _grouped(inner: QuerySet[Any], where: str, group: str) -> list[tuple[Any, ...]]:
    sql, params = inner.query.sql_with_params()
    quote = connection.ops.quote_name
    statement = (
        f"SELECT t.{quote(group)}, t.{quote('bucket')}, COUNT(*) FROM ({sql}) t "
        f"WHERE {where} GROUP BY t.{quote(group)}, t.{quote('bucket')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return list(cursor.fetchall())


Rollups = dict[tuple[Any, ...], Any]


def _folds(rollout_id: int, windows: Sequence[tuple[datetime, datetime | None]],
           thresholds: Mapping[str, Sequence[float]] | None, pre_period: Any,
           first_fields: Sequence[str], rollups: Rollups | None = None) -> list[Any] | None:  # fmt: skip
    """Each window's rollup after this look's fold, the earliest first; None when a rollup does not fit.
    ``rollups``: a dict one look passes to all its tail checks' samples, so that each window is folded and
    read once for them (a fold locks the window's row and reads it back even when nothing is new)."""
    from experiments.analysis import records_rollup

    limits = tuple(sorted((name, tuple(float(x) for x in values)) for name, values in (thresholds or {}).items()))
    folds = []
    for since, until in sorted(windows, key=lambda w: w[0]):
        key = (rollout_id, since, until, limits, pre_period, tuple(first_fields))
        if rollups is not None and key in rollups:
            folded = rollups[key]
        else:
            folded = records_rollup(rollout_id=rollout_id, since=since, until=until, limits=thresholds or {},
                                    pre_period=pre_period, first_fields=first_fields)  # fmt: skip
            if rollups is not None:
                rollups[key] = folded
        if folded is None:
            return None
        folds.append(folded)
    return folds


def _repeated(folds: Sequence[Any], name: str, first_fields: Sequence[str], arm: str | None = None) -> list[tuple[str, int, float]]:
    """(arm, bucket, latency) of the first requests that a later window holds of sessions with a first request
    in an earlier one (their first in the windows together is the earlier one)."""
    from experiments.analysis import first_request_fields

    index = first_request_fields(first_fields).index(name)
    units = RollupUnit._meta.db_table
    found: list[tuple[str, int, float]] = []
    for j in range(1, len(folds)):
        earlier = [f.window_id for f in folds[:j]]
        marks = ", ".join(["%s"] * len(earlier))
        by_arm = " AND u.arm = %s" if arm is not None else ""
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT u.arm, u.first{index}_k, u.first{index}_x FROM {units} u WHERE u.window_id = %s{by_arm} "
                f"AND u.first{index}_at IS NOT NULL AND EXISTS (SELECT 1 FROM {units} e WHERE e.window_id IN ({marks}) "
                f"AND e.unit = u.unit AND e.arm = u.arm AND e.first{index}_at IS NOT NULL)",
                [folds[j].window_id, *([arm] if arm is not None else []), *earlier],
            )  # fmt: skip
            found += [(str(a), int(k), float(x)) for a, k, x in cursor.fetchall()]
    return found


def first_request_bins(
    *, rollout_id: int, windows: Sequence[tuple[datetime, datetime | None]], fields: Iterable[str],
    relative_accuracy: float | None = None, thresholds: Mapping[str, Sequence[float]] | None = None,
    pre_period: PrePeriod | None = None, first_fields: Sequence[str] | None = None, rollups: Rollups | None = None,
) -> dict[str, dict[str, Bins]]:  # fmt: skip
    """{arm: {field: {bucket: sessions}}}: per arm, each session's first request in the windows that measured
    the field, by its sketch bucket. From the windows' rollups (`thresholds` and `pre_period`: the plan's tail
    SLO thresholds and the rollout's pre-period, and `first_fields` the fields of all its tail checks (by
    default `fields`), as `arm_sums` is given them, so that the rollups are the ones its looks fold already;
    `rollups`: the look's windows already read, `_folds`)."""
    from experiments.rollups import RELATIVE_ACCURACY

    names = list(fields)
    kept = tuple(names if first_fields is None else first_fields)
    if set(names) - set(kept) or relative_accuracy not in (None, RELATIVE_ACCURACY):
        folds = None
    else:
        folds = _folds(rollout_id, windows, thresholds, pre_period, kept, rollups)
    if folds is None:
        return first_request_bins_scratch(rollout_id=rollout_id, windows=windows, fields=names,
                                          relative_accuracy=relative_accuracy)  # fmt: skip
    totals: dict[tuple[str, str], dict[int, int]] = {}
    for folded in folds:
        for arm, rollup in folded.arms.items():
            for name in names:
                bins = totals.setdefault((arm, name), {})
                for key, n in rollup.firsts.get(name, {}).items():
                    bins[key] = bins.get(key, 0) + n
    for name in names:
        for arm, key, _ in _repeated(folds, name, kept):
            bins = totals.setdefault((arm, name), {})
            bins[key] = bins.get(key, 0) - 1
    out: dict[str, dict[str, Bins]] = {}
    for (arm, name), bins in sorted(totals.items()):
        nonzero = {key: n for key, n in sorted(bins.items()) if n}
        if nonzero:
            out.setdefault(arm, {})[name] = nonzero
    return out


def first_request_bins_scratch(
    *, rollout_id: int, windows: Sequence[tuple[datetime, datetime | None]], fields: Iterable[str],
    relative_accuracy: float | None = None,
) -> dict[str, dict[str, Bins]]:  # fmt: skip
    """`first_request_bins` counted from every record of the windows."""
    from experiments.rollups import RELATIVE_ACCURACY, sketch_key

    accuracy = RELATIVE_ACCURACY if relative_accuracy is None else relative_accuracy
    out: dict[str, dict[str, Bins]] = {}
    if not windows:
        return out
    records = request_records(rollout_id=rollout_id).filter(_in_windows(windows)).order_by()
    unit = unit_expression(RECORDS)
    for name in fields:
        column = RECORDS.latency[name]
        present = Q(**{RECORDS.outcome: "ok", f"{column}__isnull": False})
        if RECORDS.failover:
            present &= Q(**{RECORDS.failover: False})
        first = Window(RowNumber(), partition_by=[F("arm"), bytewise(unit)], order_by=[F("created_at").asc(), F("pk").asc()])
        inner = records.filter(present).annotate(first=first, bucket=sketch_key(column, accuracy)).values("arm", "first", "bucket")
        for arm, bucket, count in _grouped(inner, f"t.{connection.ops.quote_name('first')} = 1", "arm"):
            out.setdefault(str(arm), {}).setdefault(name, {})[int(bucket)] = int(count)
    return out


def shadow_pair_bins(
    *, rollout_id: int, since: datetime | None, fields: Iterable[str], relative_accuracy: float | None = None
) -> dict[str, dict[str, Bins]]:
    """{"baseline" | "candidate": {field: {bucket: sessions}}}: both sides of each session's first shadow pair
    since `since` among those where both sides answered ok with the latency."""
    from experiments.rollups import RELATIVE_ACCURACY, sketch_key

    accuracy = RELATIVE_ACCURACY if relative_accuracy is None else relative_accuracy
    pairs = _since(shadow_pairs(rollout_id=rollout_id).order_by(), since)
    first = Window(RowNumber(), partition_by=[bytewise(unit_expression(SHADOW))], order_by=[F("created_at").asc(), F("pk").asc()])
    quote = connection.ops.quote_name
    materialized = "MATERIALIZED " if connection.vendor == "postgresql" else ""
    out: dict[str, dict[str, Bins]] = {}
    for name in fields:
        base, cand = PAIRED_FIELDS[name]
        both = pairs.filter(candidate_outcome="ok", baseline_replay_outcome="ok", **{f"{base}__gt": 0.0, f"{cand}__gt": 0.0})
        # Each session's first pair once, both sides' buckets beside it (one window over the pairs per field).
        inner = both.annotate(first=first, kb=sketch_key(base, accuracy), kc=sketch_key(cand, accuracy))
        sql, params = inner.values("first", "kb", "kc").query.sql_with_params()
        statement = (
            f"WITH f AS {materialized}(SELECT t.{quote('kb')} AS kb, t.{quote('kc')} AS kc FROM ({sql}) t "
            f"WHERE t.{quote('first')} = 1) "
            "SELECT 'baseline', f.kb, COUNT(*) FROM f GROUP BY f.kb UNION ALL SELECT 'candidate', f.kc, COUNT(*) FROM f GROUP BY f.kc"
        )
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            for arm, bucket, count in cursor.fetchall():
                out.setdefault(str(arm), {}).setdefault(name, {})[int(bucket)] = int(count)
    return out


def shadow_pair_over(
    *, rollout_id: int, since: datetime | None, thresholds: Mapping[str, Sequence[float]]
) -> dict[tuple[str, float], tuple[int, int]]:
    """{(field, threshold): (sessions whose first shadow reply was over it, sessions)}: a shadow step's tail SLO
    sample, as `first_request_over` for live steps, over the candidate's replies since `since` that answered
    ok with the latency."""
    pairs = _since(shadow_pairs(rollout_id=rollout_id).order_by(), since)
    out: dict[tuple[str, float], tuple[int, int]] = {}
    for name, limits in thresholds.items():
        column = SHADOW.latency.get(name)
        if column is None or not limits:
            continue
        present = Q(**{SHADOW.outcome: "ok", f"{column}__isnull": False})
        out.update(_first_over(pairs.filter(present), unit=unit_expression(SHADOW), name=name, column=column,
                               limits=limits))  # fmt: skip
    return out


def _since(rows: QuerySet[Any], since: datetime | None) -> QuerySet[Any]:
    return rows if since is None else rows.filter(created_at__gte=since)


def _first_over(
    rows: QuerySet[Any], *, unit: Any, name: str, column: str, limits: Sequence[float]
) -> dict[tuple[str, float], tuple[int, int]]:
    """Among `rows` (those that measured `column`), each unit's first (by `created_at`, then id): how many
    were over each of `limits`, and how many units there are."""
    quote = connection.ops.quote_name
    first = Window(RowNumber(), partition_by=[bytewise(unit)], order_by=[F("created_at").asc(), F("pk").asc()])
    overs = {f"over{i}": Case(When(**{f"{column}__gt": limit}, then=Value(1)), default=Value(0), output_field=IntegerField())
             for i, limit in enumerate(limits)}  # fmt: skip
    inner = rows.annotate(first=first, **overs).values("first", *overs)
    sql, params = inner.query.sql_with_params()
    sums = ", ".join(f"SUM(t.{quote(key)})" for key in overs)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*), {sums} FROM ({sql}) t WHERE t.{quote('first')} = 1", params)
        row = cursor.fetchone()
    n = int(row[0] or 0)
    return {(name, float(limit)): (int(row[1 + i] or 0), n) for i, limit in enumerate(limits)}


def first_request_over(
    *, rollout_id: int, windows: Sequence[tuple[datetime, datetime | None]], thresholds: Mapping[str, Sequence[float]],
    arm: str = "candidate", pre_period: PrePeriod | None = None, first_fields: Sequence[str] | None = None,
    rollups: Rollups | None = None,
) -> dict[tuple[str, float], tuple[int, int]]:  # fmt: skip
    """{(field, threshold): (sessions whose first request was over it, sessions)}: the tail SLOs' sample,
    one request per session as for the guardrails, counted exactly at each threshold (no bins). From the
    windows' rollups, whose spec counts the first requests over each of `thresholds` (the plan's; with
    `pre_period`, `first_fields` and `rollups`, as for `first_request_bins`; by default the fields of
    `thresholds`)."""
    from experiments.rollups import over_key

    if not windows:
        return {}
    named = tuple(name for name, limits in thresholds.items() if limits)
    kept = named if first_fields is None else tuple(first_fields)
    # A field whose first requests the rollups do not keep: all counted from the records, as in
    # first_request_bins (a plan's tail SLOs' fields are always among its tail checks' fields).
    folds = None if set(named) - set(kept) else _folds(rollout_id, windows, thresholds, pre_period, kept, rollups)
    if folds is None:
        return first_request_over_scratch(rollout_id=rollout_id, windows=windows, thresholds=thresholds, arm=arm)
    out: dict[tuple[str, float], tuple[int, int]] = {}
    for name in named:
        limits = thresholds[name]
        repeated = _repeated(folds, name, kept, arm)
        n = sum(sum(f.arms[arm].firsts.get(name, {}).values()) for f in folds if arm in f.arms) - len(repeated)
        for limit in limits:
            over = sum(f.arms[arm].over.get(over_key(name, limit), 0) for f in folds if arm in f.arms)
            out[(name, float(limit))] = (over - sum(1 for _, _, x in repeated if x > limit), n)
    return out


def first_request_over_scratch(
    *, rollout_id: int, windows: Sequence[tuple[datetime, datetime | None]], thresholds: Mapping[str, Sequence[float]],
    arm: str = "candidate",
) -> dict[tuple[str, float], tuple[int, int]]:  # fmt: skip
    """`first_request_over` counted from every record of the windows."""
    out: dict[tuple[str, float], tuple[int, int]] = {}
    if not windows:
        return out
    records = request_records(rollout_id=rollout_id).filter(_in_windows(windows), arm=arm).order_by()
    unit = unit_expression(RECORDS)
    for name, limits in thresholds.items():
        if not limits:
            continue
        column = RECORDS.latency[name]
        present = Q(**{RECORDS.outcome: "ok", f"{column}__isnull": False})
        if RECORDS.failover:
            present &= Q(**{RECORDS.failover: False})
        out.update(_first_over(records.filter(present), unit=unit, name=name, column=column, limits=limits))
    return out
