"""Pages of serving: model versions (lineage, engines) and engine workers (state, health, restarts, recent
logs, live engine metrics). Read-only; engines are started and stopped through the API or the agent.

Serving depends on no other app, so a version's eval history is a partial the evals app serves, which
the page loads with htmx."""

from __future__ import annotations

import math
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from accounts.decorators import viewer_required
from config.errors import NotFound
from config.live import LiveRegion, live_region, live_response
from serving.models import EngineWorker, ModelVersion
from serving.selectors import engine_worker_get, engine_worker_list, model_version_get, model_version_list

POLL_S = 2.0
MISSING = "\u2013"  # an en dash where there is no number yet
STATE_STATUS = {
    "ready": "green", "starting": "amber", "pending": "amber", "draining": "amber", "unhealthy": "red",
    "crashed": "red", "failed": "red", "stopped": "grey",
}  # fmt: skip
LINEAGE_PARTS = (
    ("weights", "Weights"), ("tokenizer", "Tokenizer"), ("chat_template", "Chat template"),
    ("sampling", "Sampling defaults"), ("hub_id", "Hub id"),
)  # fmt: skip


def _quantile(histogram: dict[str, Any] | None, q: float) -> float | None:
    """A quantile from cumulative Prometheus buckets, by linear interpolation inside the bucket."""
    if not histogram or not histogram.get("count"):
        return None
    total = float(histogram["count"])
    target = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in histogram.get("buckets") or []:
        if count is None:
            continue
        if float(count) >= target:
            if bound == "+Inf":
                return previous_bound
            width = float(count) - previous_count
            share = (target - previous_count) / width if width > 0 else 1.0
            return previous_bound + (float(bound) - previous_bound) * share
        if bound != "+Inf":
            previous_bound, previous_count = float(bound), float(count)
    return None


def _seconds_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    ms = value * 1000
    return f"{ms:.3g} ms" if ms < 10 else f"{ms:.0f} ms"


def engine_metrics_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scraped vllm:* figures as a person reads them."""

    def number(name: str) -> float | None:
        value = metrics.get(name)
        return float(value) if isinstance(value, int | float) else None

    histograms = []
    for name, label in (
        ("vllm:time_to_first_token_seconds", "Time to first token"),
        ("vllm:inter_token_latency_seconds", "Time per output token"),
        ("vllm:e2e_request_latency_seconds", "End to end"),
    ):
        histogram = metrics.get(name)
        if not isinstance(histogram, dict):
            continue
        count = histogram.get("count") or 0
        mean = (histogram.get("sum") or 0.0) / count if count else None
        histograms.append({
            "label": label, "count": int(count), "mean": _seconds_ms(mean),
            "p50": _seconds_ms(_quantile(histogram, 0.5)), "p99": _seconds_ms(_quantile(histogram, 0.99)),
        })  # fmt: skip
    kv = number("vllm:kv_cache_usage_perc")
    return {
        "running": number("vllm:num_requests_running"),
        "waiting": number("vllm:num_requests_waiting"),
        "kv_cache_pct": round(kv * 100, 1) if kv is not None else None,
        "succeeded": number("vllm:request_success_total"),
        "prompt_tokens": number("vllm:prompt_tokens_total"),
        "generation_tokens": number("vllm:generation_tokens_total"),
        "histograms": histograms,
        # A Kubernetes engine's figures are its serving pods' added up (merge_replica_metrics).
        "pods": number("replicas_scraped"),
        "any": bool(metrics),
    }


def engine_view(worker: EngineWorker) -> dict[str, Any]:
    return {
        "worker": worker,
        "status": STATE_STATUS.get(worker.state, "grey"),
        "health": "green" if worker.last_health_ok else ("red" if worker.last_health_ok is False else "grey"),
        "metrics": engine_metrics_view(worker.metrics or {}),
        "last_lines": (worker.log_tail or "").strip().splitlines()[-1:] or [""],
    }


# --- model versions -------------------------------------------------------------------------------


@viewer_required
@require_GET
def model_version_list_page(request: HttpRequest) -> HttpResponse:
    versions = list(model_version_list())
    engines: dict[int, list[EngineWorker]] = {}
    for worker in engine_worker_list():
        engines.setdefault(worker.model_version_id, []).append(worker)
    by_lineage: dict[str, list[str]] = {}
    for version in versions:
        if version.lineage_hash:
            by_lineage.setdefault(version.lineage_hash, []).append(version.label)
    rows = [
        {
            "version": v,
            "engines": [engine_view(w) for w in engines.get(v.pk, [])],
            "ready": sum(1 for w in engines.get(v.pk, []) if w.state == EngineWorker.State.READY),
            "twins": [label for label in by_lineage.get(v.lineage_hash, []) if label != v.label],
        }
        for v in versions
    ]
    return render(request, "serving/model_versions.html", {"rows": rows})


def _version_or_404(version_id: int) -> ModelVersion:
    try:
        return model_version_get(ref=version_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


@viewer_required
@require_GET
def model_version_detail(request: HttpRequest, version_id: int) -> HttpResponse:
    version = _version_or_404(version_id)
    lineage = version.lineage or {}
    parts = [{"label": label, "hash": lineage[key]} for key, label in LINEAGE_PARTS if lineage.get(key)]
    twins = (
        [v for v in model_version_list().filter(lineage_hash=version.lineage_hash).exclude(pk=version.pk)]
        if version.lineage_hash
        else []
    )
    return render(request, "serving/model_version_detail.html", {
        "version": version, "parts": parts, "twins": twins,
        "engines": [engine_view(w) for w in engine_worker_list(model_version=version)],
    })  # fmt: skip


# --- engine workers -------------------------------------------------------------------------------


def _engines_region(request: HttpRequest) -> LiveRegion:
    rows = [engine_view(w) for w in engine_worker_list()]
    return live_region(
        request, template="serving/_engines.html", context={"rows": rows}, region_id="engines-live",
        url=reverse("engine-list-live"), every_s=POLL_S, label="Engine workers",
    )  # fmt: skip


@viewer_required
@require_GET
def engine_list(request: HttpRequest) -> HttpResponse:
    return render(request, "serving/engines.html", {"live": _engines_region(request)})


@viewer_required
@require_GET
def engine_list_live(request: HttpRequest) -> HttpResponse:
    return live_response(request, _engines_region(request))


def _engine_or_404(worker_id: int) -> EngineWorker:
    try:
        return engine_worker_get(worker_id=worker_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


def _engine_region(request: HttpRequest, worker: EngineWorker) -> LiveRegion:
    return live_region(
        request, template="serving/_engine.html", context={"e": engine_view(worker)}, region_id="engine-live",
        url=reverse("engine-detail-live", args=[worker.pk]), every_s=POLL_S, label="Engine worker",
    )  # fmt: skip


@viewer_required
@require_GET
def engine_detail(request: HttpRequest, worker_id: int) -> HttpResponse:
    worker = _engine_or_404(worker_id)
    return render(
        request, "serving/engine_detail.html", {"worker": worker, "live": _engine_region(request, worker)}
    )


@viewer_required
@require_GET
def engine_detail_live(request: HttpRequest, worker_id: int) -> HttpResponse:
    return live_response(request, _engine_region(request, _engine_or_404(worker_id)))
