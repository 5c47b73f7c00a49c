"""The analysis facade: request records (and outcome events, and shadow pairs) to per-arm statistics over
sessions, by SQL aggregates. No request row is loaded into Python.

`arm_sums` gives an `ArmSums` per arm of a window: per-session rows (`sessions.session_rows`) merged per
arm in the database (`sessions.merge_rows`), outcome events once per request, and nearest-rank percentiles
for display (one single-value query each). `ArmSums.ratio_for(metric)` is the `RatioStats` that
`experiments.stats` tests; `arm_summary` the compact JSON a look stores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import connection
from django.db.models import CharField, Count, F, FloatField, Max, Q, QuerySet, Sum, Value
from django.db.models.functions import Cast, Concat
from django.utils import timezone

from experiments.analysis.arms import ArmSums, arm_summary
from experiments.analysis.paired import PairedLatency, PairedSums, shadow_paired_latency
from experiments.analysis.preperiod import PrePeriod, pre_column_names, pre_period_sql, pre_specs
from experiments.analysis.sessions import (
    ERROR_OUTCOMES,
    RECORDS,
    SHADOW,
    UNCOUNTED_OUTCOMES,
    RatioSpec,
    SessionSource,
    UnitMoments,
    merge_rows,
    numeric_columns,
    product_pairs,
    ratio_specs,
    session_rows,
    unit_expression,
)
from experiments.analysis.tails import (
    first_request_bins,
    first_request_over,
    shadow_pair_bins,
    shadow_pair_over,
)
from experiments.models import OutcomeEvent
from experiments.stats import RatioStats
from serving.selectors import request_records, shadow_pairs

if TYPE_CHECKING:
    from experiments.rollups import ArmRollup, Folded, RollupSpec

BASELINE = "baseline"
CANDIDATE = "candidate"
ARMS = (BASELINE, CANDIDATE)
SUMMARY_PERCENTILES = {"p50": 0.50, "p99": 0.99}

__all__ = [
    "ARMS",
    "BASELINE",
    "CANDIDATE",
    "ERROR_OUTCOMES",
    "UNCOUNTED_OUTCOMES",
    "ArmSums",
    "PairedLatency",
    "PairedSums",
    "PrePeriod",
    "RatioSpec",
    "SessionSource",
    "UnitMoments",
    "alias_history",
    "arm_summary",
    "arm_sums",
    "first_request_bins",
    "first_request_over",
    "outcome_unit_stats",
    "records_fold",
    "records_rollup",
    "shadow_candidate_sums",
    "shadow_pair_bins",
    "shadow_pair_over",
    "shadow_paired_latency",
    "window_moments",
]


def _window(qs: QuerySet[Any], since: datetime | None, until: datetime | None) -> QuerySet[Any]:
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    if until is not None:
        qs = qs.filter(created_at__lt=until)
    return qs


def _percentile(qs: QuerySet[Any], column: str, n: int, quantile: float) -> float | None:
    """Nearest rank, with enough samples that the rank is not the maximum by default."""
    if n < max(10, math.ceil(1.0 / (1.0 - quantile))):
        return None
    rank = max(1, math.ceil(quantile * n))
    value = qs.filter(**{f"{column}__isnull": False}).order_by(column).values_list(column, flat=True)[rank - 1 : rank]
    found = list(value)
    return float(found[0]) if found else None


def _percentiles(rows: QuerySet[Any], source: SessionSource, moments: UnitMoments) -> dict[str, float | None]:
    ok_rows = rows.filter(**{source.outcome: "ok"})
    tails: dict[str, float | None] = {}
    for name, column in source.latency.items():
        n = int(moments.total(f"{name}_n"))
        for label, quantile in SUMMARY_PERCENTILES.items():
            tails[_percentile_key(name, label)] = _percentile(ok_rows, column, n, quantile)
    return tails


def window_moments(
    rows: QuerySet[Any], *, source: SessionSource, thresholds: Mapping[str, Sequence[float]],
    pre_period: PrePeriod | None = None,
) -> tuple[dict[str, UnitMoments], dict[str, RatioSpec]]:  # fmt: skip
    """Per arm, the merged per-session moments of ``rows`` (one query), and the metric specs they serve;
    with ``pre_period``, each session's history joined to its row (`preperiod`)."""
    specs = ratio_specs(source, thresholds, pre=pre_specs(source) if pre_period is not None else None)
    per_unit = session_rows(rows, source=source, thresholds=thresholds)
    columns = numeric_columns(source, thresholds)
    if pre_period is None:
        return merge_rows(per_unit, columns=columns, pairs=product_pairs(specs.values())), specs
    before = pre_column_names(source)
    moments = merge_rows(
        per_unit, columns=[*columns, *before], pairs=product_pairs(specs.values()),
        joined=lambda units: pre_period_sql(pre_period, units), joined_columns=before,
    )  # fmt: skip
    return moments, specs


def threshold_tuples(thresholds: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, ...]]:
    return {name: tuple(limits) for name, limits in (thresholds or {}).items()}


def arm_sums(
    *,
    rollout_id: int,
    since: datetime | None = None,
    until: datetime | None = None,
    thresholds: Mapping[str, Sequence[float]] | None = None,
    percentiles: bool = True,
    outcomes: bool = True,
    pre_period: PrePeriod | None = None,
    first_fields: Sequence[str] = (),
) -> dict[str, ArmSums]:
    """Per-arm statistics over sessions of a rollout's served requests in [since, until).

    `thresholds` maps a latency field (ttft_ms, tpot_ms, e2e_ms) to the limits of tail SLOs: each gets a
    count of requests over it, and together they define goodput. `pre_period`: where the sessions' requests
    before the rollout are, the latencies' second covariate (`preperiod`). `first_fields`: the latency fields
    of the plan's tail checks, whose first request per session the window's rollup keeps for them
    (`tails`: they read the same rollup when given the same fields, thresholds and pre-period)."""
    limits = threshold_tuples(thresholds)
    records = _window(request_records(rollout_id=rollout_id), since, until)
    incremental = _incremental(rollout_id, since, until, limits, pre_period, first_fields) if since is not None else None
    if incremental is not None:
        moments, specs, sketched = incremental
    else:
        moments, specs = window_moments(records, source=RECORDS, thresholds=limits, pre_period=pre_period)
    outcome_stats = outcome_unit_stats(rollout_id=rollout_id, since=since, until=until) if outcomes else {}
    result: dict[str, ArmSums] = {}
    for arm in ARMS:
        arm_moments = moments.get(arm, UnitMoments())
        if not percentiles:
            tails: dict[str, float | None] = {}
        elif incremental is not None:
            tails = sketched.get(arm, {})
        else:
            tails = _percentiles(records.filter(arm=arm), RECORDS, arm_moments)
        result[arm] = ArmSums(arm_moments, specs, limits, outcome_stats.get(arm, {}), tails)
    return result


def _incremental(
    rollout_id: int, since: datetime, until: datetime | None, limits: dict[str, tuple[float, ...]],
    pre_period: PrePeriod | None = None, first_fields: Sequence[str] = (),
) -> tuple[dict[str, UnitMoments], dict[str, RatioSpec], dict[str, dict[str, float | None]]] | None:
    """A window's moments from its rollup (experiments.rollups): the look reads only the records committed
    since the previous one. Percentiles come from the window's DDSketches, each within
    rollups.RELATIVE_ACCURACY of the nearest-rank value. None when the spec does not fit a rollup. A
    session's history (`pre_period`) is read once, when the rollup first stores the session."""
    specs = ratio_specs(RECORDS, limits, pre=pre_specs(RECORDS) if pre_period is not None else None)
    folded = records_rollup(rollout_id=rollout_id, since=since, until=until, limits=limits, pre_period=pre_period,
                            first_fields=first_fields)  # fmt: skip
    if folded is None:
        return None
    moments = {arm: UnitMoments(a.units, a.exposed, dict(a.sums), dict(a.products)) for arm, a in folded.arms.items()}
    tails = {arm: sketch_percentiles(a, RECORDS.latency) for arm, a in folded.arms.items()}
    return moments, specs, tails


def sketch_percentiles(arm: ArmRollup, names: Iterable[str]) -> dict[str, float | None]:
    """The display percentiles (`_percentiles`' keys) from an arm's DDSketches, each within
    `experiments.rollups.RELATIVE_ACCURACY` of the nearest-rank value."""
    return {_percentile_key(name, label): arm.quantile(name, q) for name in names for label, q in SUMMARY_PERCENTILES.items()}


def _percentile_key(name: str, label: str) -> str:
    """ttft_ms, p50 -> ttft_p50_ms: the name a display percentile goes by in `ArmSums.percentiles`."""
    return f"{name.removesuffix('_ms')}_{label}_ms"


def first_request_fields(fields: Iterable[str]) -> tuple[str, ...]:
    """The first-request fields of a rollup, in the order of its unit rows' slots."""
    return tuple(sorted(set(fields)))


def records_rollup_spec(
    *, limits: Mapping[str, Sequence[float]], history: bool = False, first_fields: Sequence[str] = ()
) -> RollupSpec | None:
    """What `records_rollup`'s window keeps: the per-session columns of the request records with the tail
    SLOs' `limits` (and the history's, with `history`), the products their metrics need, the sketches, and
    the first requests of `first_fields` with the counts over `limits`. None when it does not fit a rollup."""
    from experiments.rollups import RollupSpec

    limits = threshold_tuples(limits)
    fields = first_request_fields(first_fields)
    specs = ratio_specs(RECORDS, limits, pre=pre_specs(RECORDS) if history else None)
    before = pre_column_names(RECORDS) if history else []
    try:
        return RollupSpec(
            columns=(*numeric_columns(RECORDS, limits), *before), pairs=tuple(product_pairs(specs.values())),
            sketch=tuple(RECORDS.latency.items()), firsts=tuple((name, RECORDS.latency[name]) for name in fields),
            over=tuple((name, float(limit)) for name, values in sorted(limits.items()) if name in fields for limit in values),
        )  # fmt: skip
    except ValueError:
        return None


def records_rollup(
    *, rollout_id: int, since: datetime, until: datetime | None, limits: Mapping[str, Sequence[float]],
    pre_period: PrePeriod | None = None, first_fields: Sequence[str] = (),
) -> Folded | None:
    """The window's rollup after this look's fold (experiments.rollups.window_fold): the moments, the
    sketches, and for `first_fields` (the tail checks' latency fields) each session's first request
    (experiments.analysis.tails) with the counts over the tail SLOs' thresholds `limits`. None when the
    spec does not fit a rollup. The same arguments, the same window (`arm_sums`' and the tail checks' folds
    share it). Only the fields a plan's tail checks name: keeping a field costs the fold per touched session."""
    from experiments.rollups import window_fold

    fold = records_fold(limits=limits, pre_period=pre_period, first_fields=first_fields)
    if fold is None:
        return None
    return window_fold(rollout_id=rollout_id, since=since, until=until, **fold)


def records_fold(
    *, limits: Mapping[str, Sequence[float]], pre_period: PrePeriod | None = None, first_fields: Sequence[str] = ()
) -> dict[str, Any] | None:
    """`records_rollup`'s arguments to `experiments.rollups.window_fold` besides the window (the spec, the
    per-session rows, their key, the history's `fill`, what a first request is, the unit); all but `rows_key`
    are `window_scratch`'s too. None when the spec does not fit a rollup."""
    from experiments.rollups import UnitFill

    limits = threshold_tuples(limits)
    spec = records_rollup_spec(limits=limits, history=pre_period is not None, first_fields=first_fields)
    if spec is None:
        return None
    before = pre_column_names(RECORDS) if pre_period is not None else []
    fill = None
    if pre_period is not None:
        period = pre_period
        fill = UnitFill(columns=tuple(before), sql=lambda units: pre_period_sql(period, units), key=period.key)
    # Typed: an untyped NULL is text to PostgreSQL in the fold's CTE.
    nulls = {name: Cast(Value(None), output_field=FloatField()) for name in before}
    first_ok = Q(**{RECORDS.outcome: "ok"})
    if RECORDS.failover:
        first_ok &= Q(**{RECORDS.failover: False})
    return {
        "spec": spec, "session_rows": lambda rows: session_rows(rows, source=RECORDS, thresholds=limits).annotate(**nulls),
        "rows_key": ("records", tuple(sorted(limits.items())), bool(before)), "fill": fill, "first_ok": first_ok,
        "unit": unit_expression(RECORDS),
    }  # fmt: skip


def shadow_candidate_sums(
    *,
    rollout_id: int,
    since: datetime | None = None,
    until: datetime | None = None,
    thresholds: Mapping[str, Sequence[float]] | None = None,
    percentiles: bool = True,
) -> ArmSums:
    """The candidate's statistics from its shadow replies (weight-0 steps): no user saw these answers. The
    units are sessions, as for the live arms: the pair keeps its request's session hash, and a sticky user's
    replies share their prompts; a pair without a session is its own unit."""
    limits = threshold_tuples(thresholds)
    pairs = _window(shadow_pairs(rollout_id=rollout_id), since, until)
    moments, specs = window_moments(pairs, source=SHADOW, thresholds=limits)
    candidate = moments.get(CANDIDATE, UnitMoments())
    tails = _sketched_percentiles(pairs, SHADOW) if percentiles else {}
    return ArmSums(candidate, specs, limits, {}, tails)


def _sketched_percentiles(rows: QuerySet[Any], source: SessionSource) -> dict[str, float | None]:
    """`_percentiles` read from DDSketch buckets, as the live arms' are (`_incremental`): each within
    `experiments.rollups.RELATIVE_ACCURACY` of the nearest-rank value, the buckets of every latency field
    counted in one statement (a hash aggregate per field, where nearest ranks sorted the rows twice per field:
    400 of a shadow step's 730 ms for these sums at 200,000 pairs)."""
    from experiments.rollups import RELATIVE_ACCURACY, ArmRollup, sketch_key

    quote = connection.ops.quote_name
    names = list(source.latency)
    parts, params = [], []
    for i, name in enumerate(names):
        column = source.latency[name]
        measured = rows.order_by().filter(**{source.outcome: "ok", f"{column}__isnull": False})
        buckets = measured.annotate(bucket=sketch_key(column, RELATIVE_ACCURACY)).values("bucket").annotate(n=Count("pk"))
        sql, found = buckets.values_list("bucket", "n").query.sql_with_params()
        parts.append(f"SELECT {i}, t.{quote('bucket')}, t.{quote('n')} FROM ({sql}) t")
        params += found
    sketched = ArmRollup()
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(parts), params)
        for index, bucket, n in cursor.fetchall():
            sketched.sketches.setdefault(names[int(index)], {})[int(bucket)] = int(n)
    return sketch_percentiles(sketched, names)


def outcome_unit_stats(
    *, rollout_id: int, since: datetime | None = None, until: datetime | None = None
) -> dict[str, dict[str, RatioStats]]:
    """Per arm, per outcome kind: the events as a ratio over sessions (sum of values / events).

    An application that reports the same outcome twice (a retry without an id, a double click) is counted
    once: per request (or, for an outcome about a session, per request it was joined to) and kind, the
    latest event stands."""
    events = OutcomeEvent.objects.filter(rollout_id=rollout_id)
    if since is not None:
        events = events.filter(request_created_at__gte=since)
    if until is not None:
        events = events.filter(request_created_at__lt=until)
    latest = events.order_by().values("kind", "request_id", "session_hash", "request_created_at").annotate(last=Max("pk"))
    unique = events.filter(pk__in=latest.values("last"))
    source = SessionSource(outcome="kind", latency={}, completion_tokens="value", session="session_hash")
    per_unit = (
        unique.order_by()
        .annotate(unit=unit_expression(source), group=Concat(F("arm"), Value("|"), F("kind"), output_field=CharField()))
        .values("group", "unit")
        .annotate(events=Count("pk"), total=Sum("value", output_field=FloatField()))
    )
    spec = RatioSpec(("total",), "events")
    moments = merge_rows(per_unit, columns=["events", "total"], pairs=product_pairs([spec]), group="group", exposure=False)
    out: dict[str, dict[str, RatioStats]] = {}
    for group, found in moments.items():
        arm, _, kind = group.partition("|")
        out.setdefault(arm, {})[kind] = found.ratio(spec)
    return out


def alias_history(
    *, alias: str, model_version_id: int | None, since: datetime, thresholds: Mapping[str, Sequence[float]] | None = None
) -> tuple[ArmSums, float]:
    """What a version has served on an alias since `since` (all rollouts and none), as one arm over its
    sessions, and the alias's request rate per second: the planning estimates' baseline."""
    records = _window(request_records(alias=alias), since, None).order_by()
    rate_n = records.count()
    if model_version_id is not None:
        records = records.filter(model_version_id=model_version_id)
    source = replace(RECORDS, arm=None)
    limits = threshold_tuples(thresholds)
    moments, specs = window_moments(records, source=source, thresholds=limits)
    span = max((timezone.now() - since).total_seconds(), 1.0)
    return ArmSums(moments.get(CANDIDATE, UnitMoments()), specs, limits), rate_n / span
