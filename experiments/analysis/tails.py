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

Shadow steps: each shadow pair is its own unit (mirrors are sampled request by request, as the rest of the
shadow analysis treats them), and its two sides, both timed by the mirror task, are the arms.

Unlike the moments, these samples are not folded incrementally: "the first request of a session" does not
merge by adding, so every look counts the windows again (one grouped query per field, only for the fields
a plan's tail guardrails name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Case, F, IntegerField, Q, QuerySet, Value, When, Window
from django.db.models.functions import RowNumber

from experiments.analysis.paired import PAIRED_FIELDS
from experiments.analysis.sessions import RECORDS, unit_expression
from serving.selectors import request_records, shadow_pairs

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


def first_request_bins(
    *, rollout_id: int, windows: Sequence[tuple[datetime, datetime | None]], fields: Iterable[str],
    relative_accuracy: float | None = None,
) -> dict[str, dict[str, Bins]]:  # fmt: skip
    """{arm: {field: {bucket: sessions}}}: per arm, each session's first request in the windows that measured
    the field, by its sketch bucket."""
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
        first = Window(RowNumber(), partition_by=[F("arm"), unit], order_by=[F("created_at").asc(), F("pk").asc()])
        inner = records.filter(present).annotate(first=first, bucket=sketch_key(column, accuracy)).values("arm", "first", "bucket")
        for arm, bucket, count in _grouped(inner, f"t.{connection.ops.quote_name('first')} = 1", "arm"):
            out.setdefault(str(arm), {}).setdefault(name, {})[int(bucket)] = int(count)
    return out


def shadow_pair_bins(
    *, rollout_id: int, since: datetime | None, fields: Iterable[str], relative_accuracy: float | None = None
) -> dict[str, dict[str, Bins]]:
    """{"baseline" | "candidate": {field: {bucket: pairs}}}: both sides of the shadow pairs since `since`
    where both answered ok with the latency, each pair its own unit."""
    from django.db.models import Count

    from experiments.rollups import RELATIVE_ACCURACY, sketch_key

    accuracy = RELATIVE_ACCURACY if relative_accuracy is None else relative_accuracy
    pairs = shadow_pairs(rollout_id=rollout_id).order_by()
    if since is not None:
        pairs = pairs.filter(created_at__gte=since)
    out: dict[str, dict[str, Bins]] = {}
    for name in fields:
        base, cand = PAIRED_FIELDS[name]
        both = pairs.filter(candidate_outcome="ok", baseline_replay_outcome="ok", **{f"{base}__gt": 0.0, f"{cand}__gt": 0.0})
        for arm, column in (("baseline", base), ("candidate", cand)):
            rows = both.annotate(bucket=sketch_key(column, accuracy)).values("bucket").annotate(n=Count("pk"))
            for row in rows:
                out.setdefault(arm, {}).setdefault(name, {})[int(row["bucket"])] = int(row["n"])
    return out


def first_request_over(
    *, rollout_id: int, windows: Sequence[tuple[datetime, datetime | None]], thresholds: Mapping[str, Sequence[float]],
    arm: str = "candidate",
) -> dict[tuple[str, float], tuple[int, int]]:  # fmt: skip
    """{(field, threshold): (sessions whose first request was over it, sessions)}: the tail SLOs' sample,
    one request per session as for the guardrails, counted exactly at each threshold (no bins)."""
    out: dict[tuple[str, float], tuple[int, int]] = {}
    if not windows:
        return out
    quote = connection.ops.quote_name
    records = request_records(rollout_id=rollout_id).filter(_in_windows(windows), arm=arm).order_by()
    unit = unit_expression(RECORDS)
    for name, limits in thresholds.items():
        if not limits:
            continue
        column = RECORDS.latency[name]
        present = Q(**{RECORDS.outcome: "ok", f"{column}__isnull": False})
        if RECORDS.failover:
            present &= Q(**{RECORDS.failover: False})
        first = Window(RowNumber(), partition_by=[unit], order_by=[F("created_at").asc(), F("pk").asc()])
        overs = {f"over{i}": Case(When(**{f"{column}__gt": limit}, then=Value(1)), default=Value(0), output_field=IntegerField())
                 for i, limit in enumerate(limits)}  # fmt: skip
        inner = records.filter(present).annotate(first=first, **overs).values("first", *overs)
        sql, params = inner.query.sql_with_params()
        sums = ", ".join(f"SUM(t.{quote(key)})" for key in overs)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*), {sums} FROM ({sql}) t WHERE t.{quote('first')} = 1", params)
            row = cursor.fetchone()
        n = int(row[0] or 0)
        for i, limit in enumerate(limits):
            out[(name, float(limit))] = (int(row[1 + i] or 0), n)
    return out
