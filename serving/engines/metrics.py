"""The vllm:* figures an engine's `/metrics` page gives, reduced to what the platform keeps per worker.

Pure: Prometheus text in, a JSON-ready dict out. Gauges and counters are summed over their labels (one
engine serves one model; `finished_reason` and the like are added up); histograms keep count, sum and
their cumulative buckets, so a page can estimate quantiles."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# DESIGN.md's list, by the sample name vLLM exposes.
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds")
KEPT = GAUGES + COUNTERS + HISTOGRAMS


class MetricsParseError(ValueError):
    """The text is not in Prometheus' exposition format."""


def _finite(value: float) -> float | None:
    # NaN and infinities are not JSON (PostgreSQL's jsonb refuses them).
    return value if math.isfinite(value) else None


def _add(total: float | None, value: float | None) -> float | None:
    """`total` + `value`, where an unknown (None) or non-finite value adds nothing and None + x is x."""
    if value is None:
        return total
    finite = _finite(value)
    if finite is None:
        return total
    return finite if total is None else total + finite


def parse_vllm_metrics(text: str) -> dict[str, Any]:
    """The kept vllm:* metrics found in `text`; a metric the engine does not expose is absent."""
    scalars: dict[str, float | None] = {}
    histograms: dict[str, dict[str, Any]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name
                if name in GAUGES or name in COUNTERS:
                    scalars[name] = _add(scalars.get(name), sample.value)
                    continue
                base, _, suffix = name.rpartition("_")
                if base not in HISTOGRAMS:
                    continue
                histogram = histograms.setdefault(base, {"count": None, "sum": None, "buckets": {}})
                if suffix in ("count", "sum"):
                    histogram[suffix] = _add(histogram[suffix], sample.value)
                elif suffix == "bucket":
                    le = sample.labels.get("le", "+Inf")
                    histogram["buckets"][le] = _add(histogram["buckets"].get(le), sample.value)
    except ValueError as exc:
        raise MetricsParseError(f"not Prometheus text: {exc}") from exc
    result: dict[str, Any] = dict(scalars)
    for name, histogram in histograms.items():
        result[name] = _histogram_out(histogram)
    return result


def _histogram_out(histogram: dict[str, Any]) -> dict[str, Any]:
    """Buckets (upper bound -> cumulative count) as [upper bound, cumulative count] in order; "+Inf" stays a
    string (JSON has no infinity)."""
    ordered = sorted(histogram["buckets"].items(), key=lambda item: float(item[0]))
    return {"count": histogram["count"], "sum": histogram["sum"],
            "buckets": [[le if le == "+Inf" else float(le), count] for le, count in ordered]}


def in_flight_from(text: str, gauges: tuple[str, ...]) -> float | None:
    """The sum of `gauges` over their labels (running + waiting, in whatever names the server uses);
    None when any of them is missing."""
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in gauges and math.isfinite(sample.value):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        raise MetricsParseError(f"not Prometheus text: {exc}") from exc
    if any(name not in totals for name in gauges):
        return None
    return sum(totals.values())


def requests_in_flight(metrics: dict[str, Any]) -> float | None:
    """running + waiting, the figure a drain waits on; None when the engine does not say."""
    running = metrics.get("vllm:num_requests_running")
    waiting = metrics.get("vllm:num_requests_waiting")
    if running is None or waiting is None:
        return None
    return float(running) + float(waiting)


def merge_replica_metrics(scrapes: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker's figures from its replicas' scrapes (the pods of a Kubernetes engine), added up as
    `parse_vllm_metrics` adds up a page's labels: requests running and waiting, counters, histograms' counts,
    sums and buckets (a bound only some replicas have counts theirs only, never a made-up count for the
    others); the KV-cache usage is the replicas' mean (each replica has its own cache, so the sum would not be
    a share). `replicas_scraped` says how many replicas the figures cover."""
    merged: dict[str, Any] = {}
    histograms: dict[str, dict[str, Any]] = {}
    kv_cache: list[float] = []
    for scrape in scrapes:
        for name, value in scrape.items():
            if value is None:
                continue
            if name == "vllm:kv_cache_usage_perc":
                kv_cache.append(float(value))
            elif name in HISTOGRAMS:
                histogram = histograms.setdefault(name, {"count": None, "sum": None, "buckets": {}})
                histogram["count"] = _add(histogram["count"], value.get("count"))
                histogram["sum"] = _add(histogram["sum"], value.get("sum"))
                buckets = histogram["buckets"]
                for le, count in value.get("buckets", ()):
                    buckets[le] = _add(buckets.get(le), count)
            elif name in GAUGES or name in COUNTERS:
                merged[name] = _add(merged.get(name), float(value))
    for name, histogram in histograms.items():
        merged[name] = _histogram_out(histogram)
    if kv_cache:
        merged["vllm:kv_cache_usage_perc"] = sum(kv_cache) / len(kv_cache)
    if scrapes:
        merged["replicas_scraped"] = len(scrapes)
    return merged
