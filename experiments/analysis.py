"""The analysis facade: request records (and outcome events, and shadow pairs) to per-arm sufficient
statistics, by SQL aggregates. No request row is loaded into Python: one grouped aggregate query per
source, plus one single-value query per reported percentile (nearest rank, DESIGN.md).

`arm_sums` gives an `ArmSums` per arm; `ArmSums.stats_for(metric)` turns it into the `ArmStats` that
`experiments.stats` tests; `arm_summary` makes the compact per-arm JSON the rollout stores and charts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Count, F, FloatField, Q, QuerySet, Sum
from django.db.models.functions import Cast
from django.utils import timezone

from experiments.metrics import LATENCY_FIELDS, METRICS, Metric
from experiments.models import OutcomeEvent
from experiments.stats import ArmStats
from serving.selectors import request_records, shadow_pairs

BASELINE = "baseline"
CANDIDATE = "candidate"
ARMS = (BASELINE, CANDIDATE)
# DESIGN.md: an error is the engine's fault (5xx, connection failure, in-stream error, cut stream), and a
# request that found no engine failed its user too. Client 4xx and cancellations are nobody's verdict.
ERROR_OUTCOMES = ("engine_error", "no_engine")
UNCOUNTED_OUTCOMES = ("client_error", "cancelled")
SUMMARY_PERCENTILES = {"p50": 0.50, "p99": 0.99}


@dataclass(frozen=True)
class TokenSums:
    """Token counts of successful requests: n, sums, squares and the cross product (for cost's variance)."""

    n: int = 0
    prompt: float = 0.0
    completion: float = 0.0
    prompt_sq: float = 0.0
    completion_sq: float = 0.0
    cross: float = 0.0

    def cost(self, price_in: float, price_out: float) -> ArmStats:
        """Per-request cost = (prompt x price_in + completion x price_out) / 1e6, from the same sums."""
        a, b = price_in / 1e6, price_out / 1e6
        total = a * self.prompt + b * self.completion
        squares = a * a * self.prompt_sq + 2 * a * b * self.cross + b * b * self.completion_sq
        return ArmStats(self.n, total, max(squares, total * total / self.n if self.n else 0.0))


@dataclass(frozen=True)
class ArmSums:
    requests: int = 0  # every record
    counted: int = 0  # the denominator of rates: not client errors, not cancelled
    errors: int = 0
    ok: int = 0
    good: int = 0  # ok and within every latency threshold asked for
    latency: dict[str, ArmStats] = field(default_factory=dict)  # by record field: ttft_ms, tpot_ms, e2e_ms
    over: dict[str, dict[float, int]] = field(default_factory=dict)  # field -> threshold -> requests over it
    tokens: TokenSums = field(default_factory=TokenSums)
    outcomes: dict[str, ArmStats] = field(default_factory=dict)  # by outcome kind
    percentiles: dict[str, float | None] = field(default_factory=dict)  # "ttft_p99_ms" -> value

    def stats_for(
        self, metric: Metric | str, *, threshold: float | None = None, prices: tuple[float, float] = (0.0, 0.0)
    ) -> ArmStats | None:
        """The sufficient statistics a test of `metric` needs, or None when the arm has none.

        Percentile metrics give the 0/1 "over `threshold`" statistics (a tail SLO); `goodput` and
        proportions give 0/1 statistics of their events."""
        if isinstance(metric, str):
            metric = METRICS[metric]
        if metric.outcome:
            return self.outcomes.get(metric.source)
        if metric.shape == "percentile":
            base = self.latency.get(metric.source)
            if base is None or threshold is None:
                return None
            return ArmStats.from_counts(self.over.get(metric.source, {}).get(threshold, 0), base.n)
        if metric.is_latency:
            return self.latency.get(metric.source)
        if metric.name == "error_rate":
            return ArmStats.from_counts(self.errors, self.counted)
        if metric.name == "goodput":
            return ArmStats.from_counts(self.good, self.counted)
        if metric.name == "cost_per_request":
            return self.tokens.cost(*prices) if self.tokens.n else None
        if metric.name == "completion_tokens_mean":
            t = self.tokens
            return ArmStats(t.n, t.completion, t.completion_sq) if t.n else None
        return None


def _latency_aggregates(
    fields: dict[str, str], ok: Q, thresholds: dict[str, list[float]]
) -> dict[str, Any]:
    aggregates: dict[str, Any] = {}
    for logical, column in fields.items():
        present = ok & Q(**{f"{column}__isnull": False})
        aggregates[f"{logical}__n"] = Count("pk", filter=present)
        aggregates[f"{logical}__s"] = Sum(column, filter=present)
        aggregates[f"{logical}__q"] = Sum(F(column) * F(column), filter=present, output_field=FloatField())
        for i, threshold in enumerate(thresholds.get(logical, [])):
            aggregates[f"{logical}__over{i}"] = Count("pk", filter=present & Q(**{f"{column}__gt": threshold}))
    return aggregates


def _good_filter(fields: dict[str, str], ok: Q, thresholds: dict[str, list[float]]) -> Q:
    good = ok
    for logical, limits in thresholds.items():
        column = fields.get(logical)
        if column and limits:
            # A request without the measurement (a non-streamed body has no TTFT) is not held against it.
            good &= Q(**{f"{column}__isnull": True}) | Q(**{f"{column}__lte": min(limits)})
    return good


def _as_float(value: Any) -> float:
    return float(value) if value is not None else 0.0


def _percentile(qs: QuerySet[Any], column: str, n: int, quantile: float) -> float | None:
    """Nearest rank, with enough samples that the rank is not the maximum by default."""
    if n < max(10, math.ceil(1.0 / (1.0 - quantile))):
        return None
    rank = max(1, math.ceil(quantile * n))
    value = qs.filter(**{f"{column}__isnull": False}).order_by(column).values_list(column, flat=True)[rank - 1 : rank]
    found = list(value)
    return float(found[0]) if found else None


def _sums_from_row(
    row: dict[str, Any], fields: dict[str, str], thresholds: dict[str, list[float]], has_prompt_tokens: bool
) -> ArmSums:
    latency: dict[str, ArmStats] = {}
    over: dict[str, dict[float, int]] = {}
    for logical in fields:
        n = int(row.get(f"{logical}__n") or 0)
        total = _as_float(row.get(f"{logical}__s"))
        squares = _as_float(row.get(f"{logical}__q"))
        latency[logical] = ArmStats(n, total, max(squares, total * total / n if n else 0.0)) if n else ArmStats.empty()
        over[logical] = {
            threshold: int(row.get(f"{logical}__over{i}") or 0) for i, threshold in enumerate(thresholds.get(logical, []))
        }
    tokens = TokenSums(
        n=int(row.get("tok__n") or 0),
        prompt=_as_float(row.get("tok__p")) if has_prompt_tokens else 0.0,
        completion=_as_float(row.get("tok__c")),
        prompt_sq=_as_float(row.get("tok__pp")) if has_prompt_tokens else 0.0,
        completion_sq=_as_float(row.get("tok__cc")),
        cross=_as_float(row.get("tok__pc")) if has_prompt_tokens else 0.0,
    )
    return ArmSums(
        requests=int(row.get("requests") or 0),
        counted=int(row.get("counted") or 0),
        errors=int(row.get("errors") or 0),
        ok=int(row.get("ok") or 0),
        good=int(row.get("good") or 0),
        latency=latency,
        over=over,
        tokens=tokens,
    )


def _token_aggregates(ok: Q, prompt: str | None, completion: str) -> dict[str, Any]:
    present = ok & Q(**{f"{completion}__isnull": False})
    c = Cast(completion, FloatField())
    aggregates: dict[str, Any] = {
        "tok__n": Count("pk", filter=present),
        "tok__c": Sum(c, filter=present),
        "tok__cc": Sum(c * c, filter=present),
    }
    if prompt:
        present &= Q(**{f"{prompt}__isnull": False})
        p = Cast(prompt, FloatField())
        aggregates["tok__n"] = Count("pk", filter=present)
        aggregates["tok__c"] = Sum(c, filter=present)
        aggregates["tok__cc"] = Sum(c * c, filter=present)
        aggregates["tok__p"] = Sum(p, filter=present)
        aggregates["tok__pp"] = Sum(p * p, filter=present)
        aggregates["tok__pc"] = Sum(p * c, filter=present)
    return aggregates


# On request records the logical name is the column; shadow pairs hold the candidate's in other columns.
_RECORD_FIELDS = {column: column for column in LATENCY_FIELDS.values()}
_SHADOW_FIELDS = {"ttft_ms": "candidate_ttft_ms", "tpot_ms": "candidate_tpot_ms", "e2e_ms": "candidate_e2e_ms"}


def _window(qs: QuerySet[Any], since: datetime | None, until: datetime | None) -> QuerySet[Any]:
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    if until is not None:
        qs = qs.filter(created_at__lt=until)
    return qs


def _record_aggregates(thresholds: dict[str, list[float]]) -> dict[str, Any]:
    ok = Q(outcome="ok")
    return {
        "requests": Count("pk"),
        "counted": Count("pk", filter=~Q(outcome__in=UNCOUNTED_OUTCOMES)),
        "errors": Count("pk", filter=Q(outcome__in=ERROR_OUTCOMES)),
        "ok": Count("pk", filter=ok),
        "good": Count("pk", filter=_good_filter(_RECORD_FIELDS, ok, thresholds)),
        **_latency_aggregates(_RECORD_FIELDS, ok, thresholds),
        **_token_aggregates(ok, "prompt_tokens", "completion_tokens"),
    }


def alias_history(*, alias: str, model_version_id: int | None, since: datetime) -> tuple[ArmSums, float]:
    """What a version has served on an alias since `since` (all rollouts and none), and the alias's
    request rate per second: the planning estimates' baseline."""
    records = _window(request_records(alias=alias), since, None).order_by()
    rate_n = records.count()
    if model_version_id is not None:
        records = records.filter(model_version_id=model_version_id)
    row = records.aggregate(**_record_aggregates({}))
    span = max((timezone.now() - since).total_seconds(), 1.0)
    return _sums_from_row(row, _RECORD_FIELDS, {}, has_prompt_tokens=True), rate_n / span


def arm_sums(
    *,
    rollout_id: int,
    since: datetime | None = None,
    until: datetime | None = None,
    thresholds: dict[str, list[float]] | None = None,
    percentiles: bool = True,
    outcomes: bool = True,
) -> dict[str, ArmSums]:
    """Per-arm sufficient statistics of a rollout's served requests in [since, until).

    `thresholds` maps a latency field (ttft_ms, tpot_ms, e2e_ms) to the limits of tail SLOs: each gets a
    count of requests over it, and together they define goodput."""
    thresholds = thresholds or {}
    records = _window(request_records(rollout_id=rollout_id), since, until).order_by()
    rows = {row["arm"]: row for row in records.values("arm").annotate(**_record_aggregates(thresholds))}
    result: dict[str, ArmSums] = {}
    outcome_stats = outcome_arm_stats(rollout_id=rollout_id, since=since, until=until) if outcomes else {}
    for arm in ARMS:
        sums = _sums_from_row(rows.get(arm, {}), _RECORD_FIELDS, thresholds, has_prompt_tokens=True)
        tails = {}
        if percentiles:
            arm_ok = records.filter(arm=arm, outcome="ok")
            for logical in _RECORD_FIELDS:
                for label, quantile in SUMMARY_PERCENTILES.items():
                    name = f"{logical.removesuffix('_ms')}_{label}_ms"
                    tails[name] = _percentile(arm_ok, logical, sums.latency[logical].n, quantile)
        result[arm] = ArmSums(
            requests=sums.requests, counted=sums.counted, errors=sums.errors, ok=sums.ok, good=sums.good,
            latency=sums.latency, over=sums.over, tokens=sums.tokens, outcomes=outcome_stats.get(arm, {}),
            percentiles=tails,
        )  # fmt: skip
    return result


def shadow_candidate_sums(
    *,
    rollout_id: int,
    since: datetime | None = None,
    until: datetime | None = None,
    thresholds: dict[str, list[float]] | None = None,
    percentiles: bool = True,
) -> ArmSums:
    """The candidate's statistics from its shadow replies (weight-0 steps): no user saw these answers."""
    thresholds = thresholds or {}
    ok = Q(candidate_outcome="ok")
    pairs = _window(shadow_pairs(rollout_id=rollout_id), since, until).order_by()
    aggregates = {
        "requests": Count("pk"),
        "counted": Count("pk", filter=~Q(candidate_outcome__in=UNCOUNTED_OUTCOMES)),
        "errors": Count("pk", filter=Q(candidate_outcome__in=ERROR_OUTCOMES)),
        "ok": Count("pk", filter=ok),
        "good": Count("pk", filter=_good_filter(_SHADOW_FIELDS, ok, thresholds)),
        **_latency_aggregates(_SHADOW_FIELDS, ok, thresholds),
        **_token_aggregates(ok, None, "candidate_completion_tokens"),
    }
    row = pairs.aggregate(**aggregates)
    sums = _sums_from_row(row, _SHADOW_FIELDS, thresholds, has_prompt_tokens=False)
    tails: dict[str, float | None] = {}
    if percentiles:
        ok_pairs = pairs.filter(ok)
        for logical, column in _SHADOW_FIELDS.items():
            for label, quantile in SUMMARY_PERCENTILES.items():
                name = f"{logical.removesuffix('_ms')}_{label}_ms"
                tails[name] = _percentile(ok_pairs, column, sums.latency[logical].n, quantile)
    # The shadow replies' prompt tokens are the served request's; without them cost is not comparable.
    return ArmSums(
        requests=sums.requests, counted=sums.counted, errors=sums.errors, ok=sums.ok, good=sums.good,
        latency=sums.latency, over=sums.over, tokens=TokenSums(), percentiles=tails,
    )  # fmt: skip


def outcome_arm_stats(
    *, rollout_id: int, since: datetime | None = None, until: datetime | None = None
) -> dict[str, dict[str, ArmStats]]:
    """Per arm, per outcome kind: the sufficient statistics of the events joined to that arm's requests."""
    events = OutcomeEvent.objects.filter(rollout_id=rollout_id)
    if since is not None:
        events = events.filter(request_created_at__gte=since)
    if until is not None:
        events = events.filter(request_created_at__lt=until)
    rows = (
        events.order_by()
        .values("arm", "kind")
        .annotate(n=Count("pk"), s=Sum("value"), q=Sum(F("value") * F("value"), output_field=FloatField()))
    )
    out: dict[str, dict[str, ArmStats]] = {}
    for row in rows:
        n, total, squares = int(row["n"]), _as_float(row["s"]), _as_float(row["q"])
        out.setdefault(row["arm"], {})[row["kind"]] = ArmStats(n, total, max(squares, total * total / n))
    return out


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.5g}")


def arm_summary(
    sums: ArmSums, *, window_s: float | None = None, prices: tuple[float, float] = (0.0, 0.0)
) -> dict[str, Any]:
    """Compact per-arm JSON for an analysis row or an event's evidence (what the UI charts)."""

    def mean(stats: ArmStats | None) -> float | None:
        return _round(stats.mean) if stats is not None and stats.n else None

    summary: dict[str, Any] = {
        "n": sums.requests,
        "errors": sums.errors,
        "error_rate": _round(sums.errors / sums.counted) if sums.counted else None,
        "goodput": _round(sums.good / sums.counted) if sums.counted else None,
    }
    if window_s:
        summary["rps"] = _round(sums.requests / window_s)
    for logical, stats in sums.latency.items():
        summary[f"{logical.removesuffix('_ms')}_mean_ms"] = mean(stats)
    for name, value in sums.percentiles.items():
        summary[name] = _round(value)
    if sums.tokens.n:
        summary["completion_tokens_mean"] = _round(sums.tokens.completion / sums.tokens.n)
        if any(prices):
            summary["cost_per_request"] = _round(sums.tokens.cost(*prices).mean)
    for kind, stats in sums.outcomes.items():
        summary[f"outcome_{kind}"] = {"n": stats.n, "mean": _round(stats.mean)}
    return summary
