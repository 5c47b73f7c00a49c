"""Pages of experiments: A/B results per metric (effect, always-valid interval, chance to win).

An experiment here is a rollout's two arms; the page reads the rollout through `rollouts.selectors` (the
web UI spans the apps; the experiments app's own code never imports rollouts) and the arm statistics
through `experiments.selectors`."""

from __future__ import annotations

from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from accounts.decorators import viewer_required
from config.errors import NotFound
from config.live import LiveRegion, live_region, live_response
from experiments.metrics import HIGHER, METRICS
from experiments.selectors import arm_comparisons
from rollouts import selectors as rollout_selectors

# The window and the N* of the analysis, so the intervals here are the ones the rollout decides on.
from rollouts.analysis import ROUTE_SETTLE
from rollouts.analysis import tuning_n_for_step as rollout_tuning_n
from rollouts.models import Rollout
from rollouts.plans import plan_from_stored
from rollouts.views.display import MISSING, fmt, rollout_summary

POLL_S = 2.0
STANDARD_METRICS = (
    "error_rate",
    "goodput",
    "ttft_mean_ms",
    "tpot_mean_ms",
    "e2e_mean_ms",
    "completion_tokens_mean",
)


def _metrics_of(rollout: Rollout) -> tuple[list[str], str | None]:
    plan = plan_from_stored(rollout.plan)
    primary = plan.primary_metric.metric if plan.primary_metric is not None else None
    names = ([primary] if primary else []) + [g.metric for g in plan.guardrails] + list(STANDARD_METRICS)
    if any(p for p in (rollout.baseline.price_input_per_million, rollout.baseline.price_output_per_million)):
        names.append("cost_per_request")
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen, primary


def _row_view(row: dict[str, Any], primary: str | None) -> dict[str, Any]:
    metric = METRICS[row["metric"]]
    unit_kind = {"ms": "ms", "share": "share"}.get(metric.unit, "number")
    relative = row["difference"] == "relative"

    def effect_text(value: float | None) -> str:
        if value is None:
            return MISSING
        return (
            fmt(value * 100, "percent", signed=True)
            if relative
            else fmt(value, "points" if unit_kind == "share" else unit_kind, signed=True)
        )

    chance = row.get("chance_to_win")
    effect = row.get("effect")
    better = None
    if effect is not None and row.get("ci_low") is not None and row.get("ci_high") is not None:
        if row["ci_low"] > 0 or row["ci_high"] < 0:
            up = row["ci_low"] > 0
            better = up if metric.direction == HIGHER else not up
    return {
        **row,
        "primary": row["metric"] == primary,
        "better_is": "higher" if metric.direction == HIGHER else "lower",
        "baseline_text": fmt(row.get("baseline"), unit_kind),
        "candidate_text": fmt(row.get("candidate"), unit_kind),
        "effect_text": effect_text(effect),
        "interval_text": f"{effect_text(row.get('ci_low'))} to {effect_text(row.get('ci_high'))}" if row.get("ci_low") is not None else MISSING,
        "chance_pct": round(chance * 100, 1) if chance is not None else None,
        "verdict": "better" if better is True else ("worse" if better is False else "undecided"),
        "status": "green" if better is True else ("red" if better is False else "amber"),
    }  # fmt: skip


def _results(rollout: Rollout) -> dict[str, Any]:
    names, primary = _metrics_of(rollout)
    since = (rollout.step_started_at + ROUTE_SETTLE) if rollout.step_started_at else None
    prices = {
        "baseline": (
            float(rollout.baseline.price_input_per_million),
            float(rollout.baseline.price_output_per_million),
        ),
        "candidate": (
            float(rollout.candidate.price_input_per_million),
            float(rollout.candidate.price_output_per_million),
        ),
    }
    plan = plan_from_stored(rollout.plan)
    latest = rollout_selectors.rollout_latest_analysis(rollout=rollout)
    decision = next((c for c in (latest.checks if latest else []) if c.get("type") == "primary"), None)
    rows = []
    step = rollout.current_step
    if since is not None and step is not None:
        comparisons = arm_comparisons(
            rollout_id=rollout.pk, since=since, until=rollout.ended_at, metrics=names, prices=prices, alpha=plan.alpha,
            tuning_n=rollout_tuning_n(plan, step),
            differences={plan.primary_metric.metric: plan.primary_metric.difference} if plan.primary_metric else None,
        )  # fmt: skip
        rows = [_row_view(row, primary) for row in comparisons]
    return {"rows": rows, "primary": primary, "decision": decision, "since": since, "latest": latest}


def _experiments() -> list[Rollout]:
    return list(rollout_selectors.rollout_list().filter(strategy=Rollout.Strategy.AB)[:50])


@viewer_required
@require_GET
def experiment_list(request: HttpRequest) -> HttpResponse:
    rows = []
    for rollout in _experiments():
        results = _results(rollout)
        primary = next((r for r in results["rows"] if r["primary"]), None)
        rows.append({"summary": rollout_summary(rollout), "primary": primary, "results": results})
    return render(request, "experiments/list.html", {"rows": rows})


def _rollout_or_404(rollout_id: int) -> Rollout:
    try:
        return rollout_selectors.rollout_get(rollout_id=rollout_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


def _region(request: HttpRequest, rollout: Rollout) -> LiveRegion:
    context = {"rollout": rollout, "summary": rollout_summary(rollout), **_results(rollout)}
    return live_region(
        request, template="experiments/_results.html", context=context, region_id="experiment-live",
        url=reverse("experiment-detail-live", args=[rollout.pk]), every_s=POLL_S, label="Experiment results",
    )  # fmt: skip


@viewer_required
@require_GET
def experiment_detail(request: HttpRequest, rollout_id: int) -> HttpResponse:
    rollout = _rollout_or_404(rollout_id)
    return render(request, "experiments/detail.html", {"rollout": rollout, "live": _region(request, rollout)})


@viewer_required
@require_GET
def experiment_detail_live(request: HttpRequest, rollout_id: int) -> HttpResponse:
    return live_response(request, _region(request, _rollout_or_404(rollout_id)))
