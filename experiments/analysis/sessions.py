"""Per-session sufficient statistics in SQL, and their merge into per-arm sums: the seam of every look.

The gateway assigns an arm per session, so the session is the unit of every comparison (DESIGN.md, "Real
traffic and production"). A look computes, in two SQL steps and without loading a request into Python:

1. ``session_rows``: one row per (arm, unit) of a window, where a unit is the session the gateway hashed
   (`user` or X-Session-Id) or, for a request that had none, the request itself. A row holds
   ``session_columns``: counts and sums only, plus the unit's first non-failover request time. Rows of
   one (arm, unit) from two windows merge by adding them (``first_at`` by its minimum), so a store of
   per-(rollout, step, arm, unit) rollups can keep exactly these columns (issue 20).
2. ``merge_rows``: per arm, from such rows, the number of units, the units first exposed in that arm, the
   sum of every column and the sums of the products the metrics pair (sum a_i^2, sum a_i b_i, ...):
   ``UnitMoments``, from which ``UnitMoments.ratio`` gives the ``experiments.stats.RatioStats`` of any metric.
   It is SQL over the rows of step 1, so it runs unchanged over a rollup table instead of a subquery.

Exposure: a session counts once, in the arm of its first request in the window that was not a failover
(a failover attempt goes to the other arm after the assigned one failed: the session was not assigned
there, and its `assigned_arm` says so). Every attempt is a record of the arm it went to: a candidate's
failed attempt counts against the candidate even when the baseline answered.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import connection, connections
from django.db.models import CharField, Count, F, FloatField, Min, Q, QuerySet, Sum, Value
from django.db.models.functions import Collate, Greatest, Ln

from experiments.stats import RatioStats
from experiments.stats.clustered import product_field
from serving.selectors import session_unit

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

# DESIGN.md: an error is the engine's fault (5xx, connection failure, in-stream error, cut stream), and a
# request that found no engine failed its user too. Client 4xx and cancellations are nobody's verdict.
ERROR_OUTCOMES = ("engine_error", "no_engine")
UNCOUNTED_OUTCOMES = ("client_error", "cancelled")
# Latencies are logged at no less than a microsecond: a 0 (a clock's resolution) must not become -inf.
LOG_FLOOR_MS = 1e-3


@dataclass(frozen=True)
class SessionSource:
    """Where a table keeps what the per-session rows need (request records, or shadow pairs)."""

    outcome: str
    latency: Mapping[str, str]  # logical field (ttft_ms, tpot_ms, e2e_ms) -> column
    completion_tokens: str
    prompt_tokens: str | None = None
    prompt_chars: str | None = None  # the prompt's length as the gateway received it: the covariate
    session: str | None = None
    request_id: str = "request_id"
    failover: str | None = None
    arm: str | None = "arm"  # None: every row is the candidate's (shadow replies)


RECORDS = SessionSource(
    outcome="outcome", latency={"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "e2e_ms": "e2e_ms"},
    completion_tokens="completion_tokens", prompt_tokens="prompt_tokens", prompt_chars="prompt_chars",
    session="session_hash", failover="failover",
)  # fmt: skip
SHADOW = SessionSource(
    outcome="candidate_outcome",
    latency={"ttft_ms": "candidate_ttft_ms", "tpot_ms": "candidate_tpot_ms", "e2e_ms": "candidate_e2e_ms"},
    completion_tokens="candidate_completion_tokens", session="session_hash", arm=None,
)  # fmt: skip


@dataclass(frozen=True)
class RatioSpec:
    """A metric as a ratio over units: sum of ``num`` columns (times coefficients given later) over sum of
    ``den``; ``covariate`` the (numerator, denominator) columns of the regression covariate, if any (the
    prompt's length), and ``pre`` those of the same metric before the rollout (`preperiod`), if any."""

    num: tuple[str, ...]
    den: str
    covariate: tuple[str, str] | None = None
    pre: tuple[str, str] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.num, self.den, *(self.covariate or ()), *(self.pre or ()))


def over_column(field_name: str, index: int) -> str:
    return f"{field_name}_o{index}"


def ratio_specs(
    source: SessionSource, thresholds: Mapping[str, Sequence[float]], *, pre: Mapping[str, tuple[str, str]] | None = None
) -> dict[str, RatioSpec]:
    """Every metric a look may test, by key: error_rate, goodput, <field>:mean, <field>:log,
    <field>:over<i> (the i-th threshold of that field), tokens (prompt and completion over ok requests).
    ``pre``: per key, the columns of its history covariate (`preperiod.pre_specs`)."""
    rates = ("chars", "counted") if source.prompt_chars else None
    served = ("ok_chars", "ok") if source.prompt_chars else None
    specs = {
        "error_rate": RatioSpec(("errors",), "counted", rates),
        "goodput": RatioSpec(("good",), "counted", rates),
        "tokens": RatioSpec(("tok_p", "tok_c") if source.prompt_tokens else ("tok_c",), "tok_n", served),
    }
    before = pre or {}
    for name in source.latency:
        specs[f"{name}:mean"] = RatioSpec((f"{name}_s",), f"{name}_n", served, before.get(f"{name}:mean"))
        specs[f"{name}:log"] = RatioSpec((f"{name}_l",), f"{name}_n", served, before.get(f"{name}:log"))
        for i, _ in enumerate(thresholds.get(name, ())):
            specs[f"{name}:over{i}"] = RatioSpec((over_column(name, i),), f"{name}_n")
    return specs


def _good_filter(source: SessionSource, ok: Q, thresholds: Mapping[str, Sequence[float]]) -> Q:
    good = ok
    for name, limits in thresholds.items():
        column = source.latency.get(name)
        if column and limits:
            # A request without the measurement (a non-streamed body has no TTFT) is not held against it.
            good &= Q(**{f"{column}__isnull": True}) | Q(**{f"{column}__lte": min(limits)})
    return good


def latency_sums(prefix: str, column: str, present: Q) -> dict[str, Any]:
    """A latency column's count, sum and sum of logs (floored at LOG_FLOOR_MS) over the rows `present`
    selects, as `<prefix>_n`, `<prefix>_s` and `<prefix>_l`: the moments of the mean and geometric-mean
    guardrails, for a look's requests and for a session's history alike."""
    return {
        f"{prefix}_n": Count("pk", filter=present),
        f"{prefix}_s": Sum(column, filter=present, output_field=FloatField()),
        f"{prefix}_l": Sum(
            Ln(Greatest(F(column), Value(LOG_FLOOR_MS), output_field=FloatField())), filter=present,
            output_field=FloatField(),
        ),
    }


def session_columns(source: SessionSource, thresholds: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """The per-unit aggregates (column name -> ORM aggregate) of ``session_rows``."""
    ok = Q(**{source.outcome: "ok"})
    counted = ~Q(**{f"{source.outcome}__in": UNCOUNTED_OUTCOMES})
    columns: dict[str, Any] = {
        "requests": Count("pk"),
        "counted": Count("pk", filter=counted),
        "errors": Count("pk", filter=Q(**{f"{source.outcome}__in": ERROR_OUTCOMES})),
        "ok": Count("pk", filter=ok),
        "good": Count("pk", filter=_good_filter(source, ok, thresholds)),
    }
    if source.prompt_chars:
        chars = F(source.prompt_chars)
        columns["chars"] = Sum(chars, filter=counted, output_field=FloatField())
        columns["ok_chars"] = Sum(chars, filter=ok, output_field=FloatField())
    # A failover attempt's latency is timed from the first attempt's send on the other arm: it mixes both
    # arms, so latencies are each arm's own attempts. Its error or success still counts for its arm.
    own = Q(**{source.failover: False}) if source.failover else Q()
    for name, column in source.latency.items():
        present = ok & own & Q(**{f"{column}__isnull": False})
        columns.update(latency_sums(name, column, present))
        for i, limit in enumerate(thresholds.get(name, ())):
            columns[over_column(name, i)] = Count("pk", filter=present & Q(**{f"{column}__gt": limit}))
    tokens = ok & Q(**{f"{source.completion_tokens}__isnull": False})
    if source.prompt_tokens:
        tokens &= Q(**{f"{source.prompt_tokens}__isnull": False})
        columns["tok_p"] = Sum(source.prompt_tokens, filter=tokens, output_field=FloatField())
    columns["tok_n"] = Count("pk", filter=tokens)
    columns["tok_c"] = Sum(source.completion_tokens, filter=tokens, output_field=FloatField())
    if source.failover:
        columns["first_at"] = Min("created_at", filter=Q(**{source.failover: False}))
    else:
        columns["first_at"] = Min("created_at")
    return columns


def unit_expression(source: SessionSource) -> Any:
    """The unit of a row: its session hash, or "r:<request id>" for a request without a session."""
    return session_unit(session=source.session, request_id=source.request_id)


def sql_float(vendor: str) -> str:
    """The SQL type the per-session sums are cast to on a database of this vendor: SQLite's REAL is its
    double; PostgreSQL's REAL would be single precision."""
    return "REAL" if vendor == "sqlite" else "DOUBLE PRECISION"


def bytewise(unit: Any) -> Any:
    """A unit as a window partitions (sorts) by it: on PostgreSQL by its bytes. The partitions are the same
    as under the database's collation (a deterministic one: equal only when the bytes are), without a
    strcoll call per comparison (at 200,000 shadow pairs, 257 against 183 ms to find each session's first)."""
    return Collate(unit, "C") if connection.vendor == "postgresql" else unit


def session_rows(
    rows: QuerySet[Any], *, source: SessionSource, thresholds: Mapping[str, Sequence[float]]
) -> QuerySet[Any]:
    """One row per (arm, unit) of ``rows`` with ``session_columns`` (a lazy queryset: it is the subquery
    ``merge_rows`` aggregates)."""
    annotated = rows.order_by().annotate(unit=unit_expression(source))
    if source.arm is None:
        annotated = annotated.annotate(arm_label=Value("candidate", output_field=CharField()))
        keys = ("arm_label", "unit")
    else:
        annotated = annotated.annotate(arm_label=F(source.arm))
        keys = ("arm_label", "unit")
    return annotated.values(*keys).annotate(**session_columns(source, thresholds))


@dataclass(frozen=True)
class UnitMoments:
    """One arm's merged per-unit statistics: units, units first exposed here, column sums, product sums."""

    units: int = 0
    exposed: int = 0
    sums: Mapping[str, float] = field(default_factory=dict)
    products: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def total(self, column: str) -> float:
        return float(self.sums.get(column, 0.0))

    def product(self, a: str, b: str) -> float:
        return float(self.products.get(_pair(a, b), 0.0))

    def ratio(self, spec: RatioSpec, coefficients: Sequence[float] | None = None) -> RatioStats:
        """The ``RatioStats`` of a metric: its numerator the weighted sum of ``spec.num`` (weights 1 unless
        given, e.g. prices per token for cost), its denominator ``spec.den``."""
        if self.units == 0:
            return RatioStats.empty()
        weights = list(coefficients) if coefficients is not None else [1.0] * len(spec.num)
        if len(weights) != len(spec.num):
            raise ValueError(f"need {len(spec.num)} coefficients for {spec.num}, got {len(weights)}")
        terms = list(zip(spec.num, weights, strict=True))
        # The RatioStats columns other than num, and the unit columns that give them.
        roles = {"den": spec.den}
        if spec.covariate is not None:
            roles.update(cov_num=spec.covariate[0], cov_den=spec.covariate[1])
        if spec.pre is not None:
            roles.update(pre_num=spec.pre[0], pre_den=spec.pre[1])

        def num_with(other: str) -> float:
            return sum(w * self.product(col, other) for col, w in terms)

        values: dict[str, float] = {
            "num": sum(w * self.total(col) for col, w in terms),
            "num_sq": sum(wa * wb * self.product(a, b) for (a, wa), (b, wb) in itertools.product(terms, terms)),
        }
        for role, column in roles.items():
            values[role] = self.total(column)
            values[product_field("num", role)] = num_with(column)
        for x, y in itertools.combinations_with_replacement(roles, 2):
            values[product_field(x, y)] = self.product(roles[x], roles[y])
        return RatioStats(self.units, **values)

    def merge(self, other: UnitMoments) -> UnitMoments:
        """Two disjoint sets of units (two steps' windows)."""
        sums = {k: self.total(k) + other.total(k) for k in {*self.sums, *other.sums}}
        products = {k: self.products.get(k, 0.0) + other.products.get(k, 0.0) for k in {*self.products, *other.products}}
        return UnitMoments(self.units + other.units, self.exposed + other.exposed, sums, products)


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def product_pairs(specs: Iterable[RatioSpec]) -> list[tuple[str, str]]:
    """Every product of two columns that some metric's variance needs (squares included)."""
    pairs: set[tuple[str, str]] = set()
    for spec in specs:
        columns = spec.columns
        for a, b in itertools.combinations_with_replacement(columns, 2):
            pairs.add(_pair(a, b))
    return sorted(pairs)


def merge_rows(
    rows: QuerySet[Any], *, columns: Sequence[str], pairs: Sequence[tuple[str, str]], group: str = "arm_label",
    exposure: bool = True, joined: Callable[[tuple[str, tuple[Any, ...]]], tuple[str, tuple[Any, ...]]] | None = None,
    joined_columns: Sequence[str] = (),
) -> dict[str, UnitMoments]:  # fmt: skip
    """Per value of ``group`` (the arm), the ``UnitMoments`` of per-unit rows (``session_rows``) in one query.

    ``joined``: given the SQL of the rows' units (and its parameters), the SQL of one row per unit it knows,
    the unit first, with ``joined_columns`` (a session's history, `preperiod`); a unit it does not know has
    zeros there."""
    connection = connections[rows.db]
    quote = connection.ops.quote_name
    real = sql_float(connection.vendor)
    inner, params = rows.query.sql_with_params()

    extra = set(joined_columns) if joined is not None else set()

    def col(name: str) -> str:
        return f"CAST(COALESCE({'p' if name in extra else 't'}.{quote(name)}, 0) AS {real})"

    selects = [f"t.{quote(group)}", "COUNT(*)"]
    if exposure:
        selects.append(f"SUM(CASE WHEN t.{quote('first_at')} = t.unit_first THEN 1 ELSE 0 END)")
    else:
        selects.append("0")
    selects += [f"SUM({col(c)})" for c in columns]
    selects += [f"SUM({col(a)} * {col(b)})" for a, b in pairs]
    window = f", MIN(s.{quote('first_at')}) OVER (PARTITION BY s.{quote('unit')}) AS unit_first" if exposure else ""
    head, source, join = "", f"({inner})", ""
    if joined is not None:
        head, params, key = with_unit_history(inner, params, joined, connection)
        source, join = "unit_rows", f" LEFT JOIN history p ON p.{key} = t.unit"
    sql = (
        f"{head}SELECT {', '.join(selects)} FROM (SELECT s.*{window} FROM {source} s) t{join} GROUP BY t.{quote(group)}"
    )
    out: dict[str, UnitMoments] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        for row in cursor.fetchall():
            values = [float(v) if v is not None else 0.0 for v in row[3:]]
            sums = dict(zip(columns, values[: len(columns)], strict=True))
            products = dict(zip(pairs, values[len(columns) :], strict=True))
            out[str(row[0])] = UnitMoments(int(row[1]), int(row[2] or 0), sums, products)
    return out


def with_unit_history(
    rows_sql: str, rows_params: Sequence[Any], history: Callable[[tuple[str, tuple[Any, ...]]], tuple[str, tuple[Any, ...]]],
    connection: BaseDatabaseWrapper,
) -> tuple[str, tuple[Any, ...], str]:  # fmt: skip
    """Per-unit rows (`rows_sql`, a ``unit`` column) beside their units' history, as ``WITH unit_rows AS
    (...), history AS (...) `` and its parameters, and the history's unit column, quoted: the caller's query
    that follows joins ``history p ON p.<column> = <row>.unit``. `history`, given the SQL of one column of
    units, gives one row per unit it knows (a `rollups.UnitFill`'s `sql`). Each is computed once
    (MATERIALIZED on PostgreSQL): the history's units are read from the rows, not by grouping the records a
    second time, and as a subquery joined to the rows the history could be re-run (a probe per unit) for
    every unit row (minutes for a thousand sessions, once, in `experiments.rollups._fill_units`). `connection`: the database the SQL is
    for (its dialect and quoting)."""
    materialized = "MATERIALIZED " if connection.vendor == "postgresql" else ""
    found_sql, found_params = history(("SELECT s.unit FROM unit_rows s", ()))
    head = f"WITH unit_rows AS {materialized}({rows_sql}), history AS {materialized}({found_sql}) "
    return head, (*rows_params, *found_params), connection.ops.quote_name(first_column(found_sql))


def first_column(sql: str) -> str:
    """The name of the first column a SELECT gives, as Django writes it (the unit of a joined query)."""
    match = re.match(r'\s*SELECT\s+(?:DISTINCT\s+)?(?:\S+?\.)?"(\w+)"', sql)
    if match is None:
        raise RuntimeError(f"cannot read the first column of {sql[:120]!r}")
    return match.group(1)


def numeric_columns(source: SessionSource, thresholds: Mapping[str, Sequence[float]]) -> list[str]:
    return [name for name in session_columns(source, thresholds) if name != "first_at"]
