"""A session's requests before the rollout started: the pre-treatment covariate of its latencies (CUPED).

Where the gateway assigns arms by session, a session of the rollout's window has often used the alias
before the rollout started, when the baseline served every request. How slow its requests were then (a
long-prompt tenant, a far-away client) predicts how slow they are now, on either arm, and nothing the
candidate does can change it. So each latency metric ``<field>:log`` and ``<field>:mean`` of a window gets,
besides the prompt's length, a second covariate ratio: the same metric over the session's requests in
``[until - PRE_PERIOD, until)``, to the same alias, served by the baseline's version
(`experiments.stats.clustered`, which adjusts on both with theta pooled across arms).

Per unit the columns are ``pre_<field>_n`` (measured requests), ``pre_<field>_l`` (the sum of their log
latencies) and ``pre_<field>_s`` (the sum of the latencies), over the same requests the window's own
columns count (ok, not a failover, the latency present). A request without a session is a unit of its own
and has no history; nor has a session new to the alias: both get zeros, which the adjustment treats as the
covariate's mean (mean imputation, see `clustered`).

Only requests strictly before ``until`` count: the rollout's own requests, from ``until`` on, are never
a covariate, whatever their arm.

The columns are computed once per unit: the incremental look (`experiments.rollups`) fills them when it
first stores the unit's row (`rollups.UnitFill`), and from then on they are constant, so a look reads the
history of the sessions new to the window only; a look from scratch joins them to its per-unit rows
(`sessions.merge_rows`). A session first seen among records a look counts but does not fold yet (above
its commit horizon) has no history in that look, only in the next.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.expressions import RawSQL

from experiments.analysis.sessions import RECORDS, SessionSource, latency_sums
from serving.selectors import request_records

# How far back a session's history reaches: a day covers a daily user's previous visit, and bounds what the
# first look of a busy alias reads.
PRE_PERIOD = timedelta(hours=24)


@dataclass(frozen=True)
class PrePeriod:
    """Where a rollout's sessions' history is: requests to ``alias`` in ``[until - span, until)`` (``until``
    the rollout's start), served by ``model_version_id`` (the baseline's) when given."""

    alias: str
    until: datetime
    model_version_id: int | None = None
    span: timedelta = PRE_PERIOD

    def __post_init__(self) -> None:
        if not self.alias:
            raise ValueError("alias must not be empty")
        if self.span <= timedelta(0):
            raise ValueError(f"span must be positive, got {self.span!r}")

    @property
    def since(self) -> datetime:
        return self.until - self.span

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.alias, self.until.isoformat(), self.model_version_id, self.span.total_seconds())


def pre_columns(source: SessionSource = RECORDS) -> dict[str, Any]:
    """Per unit, the history's columns (name -> ORM aggregate over its earlier requests)."""
    own = Q(**{source.outcome: "ok"})
    if source.failover:
        own &= Q(**{source.failover: False})
    columns: dict[str, Any] = {}
    for name, column in source.latency.items():
        present = own & Q(**{f"{column}__isnull": False})
        columns.update(latency_sums(f"pre_{name}", column, present))
    return columns


def pre_column_names(source: SessionSource = RECORDS) -> list[str]:
    return list(pre_columns(source))


def pre_specs(source: SessionSource = RECORDS) -> dict[str, tuple[str, str]]:
    """Per metric key of `sessions.ratio_specs`, its history covariate's (numerator, denominator) columns."""
    specs: dict[str, tuple[str, str]] = {}
    for name in source.latency:
        specs[f"{name}:log"] = (f"pre_{name}_l", f"pre_{name}_n")
        specs[f"{name}:mean"] = (f"pre_{name}_s", f"pre_{name}_n")
    return specs


def pre_period_rows(pre: PrePeriod, *, units: tuple[str, tuple[Any, ...]] | None = None) -> QuerySet[Any]:
    """One row per session with a history: its hash first, then the `pre_columns`. ``units``, the SQL of one
    column of unit names and its parameters, limits it to those sessions."""
    records = _history(pre)
    if units is not None:
        records = records.filter(session_hash__in=RawSQL(*units))
    return records.order_by().values("session_hash").annotate(**pre_columns())


def _history(pre: PrePeriod) -> QuerySet[Any]:
    records = request_records(alias=pre.alias).filter(created_at__gte=pre.since, created_at__lt=pre.until)
    records = records.exclude(session_hash="")
    if pre.model_version_id is not None:
        records = records.filter(model_version_id=pre.model_version_id)
    return records


def pre_period_sql(pre: PrePeriod, units: tuple[str, tuple[Any, ...]]) -> tuple[str, tuple[Any, ...]]:
    """`pre_period_rows` for ``units`` as SQL whose first column is the unit, then the `pre_columns` by name.

    On PostgreSQL each unit's history is read by its own probe of the records' session index (a LATERAL
    subquery per distinct unit): a look's new sessions are a few hundred, while the alias's day of records
    is millions, and with a join the planner, which cannot know how few units there are (fresh rollup rows
    are not in its statistics), read the whole day and probed the units per record."""
    if connection.vendor != "postgresql":
        sql, params = pre_period_rows(pre, units=units).query.sql_with_params()
        return sql, tuple(params)
    inner, params = _one_session_sql(pre)
    units_sql, units_params = units
    sql = (
        f'SELECT d."unit" AS "unit", x.* FROM (SELECT DISTINCT v.unit AS "unit" FROM ({units_sql}) v) d '
        f"CROSS JOIN LATERAL ({inner} OFFSET 0) x"
    )
    return sql, (*units_params, *params)


@functools.lru_cache(maxsize=64)
def _one_session_sql(pre: PrePeriod) -> tuple[str, tuple[Any, ...]]:
    """On PostgreSQL, one session's history (the session is `d."unit"`) as SQL and its parameters: the same
    for every look of a rollout, built once (Django's compiler took about 10 ms a look)."""
    # The unit compares bytewise (experiments 0005); as the records' own collation, so their index serves.
    one = _history(pre).filter(session_hash=RawSQL('d."unit" COLLATE "default"', ()))
    sql, params = one.order_by().values("alias").annotate(**pre_columns()).query.sql_with_params()
    return sql, tuple(params)
