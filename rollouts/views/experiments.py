"""Pages of experiments: a rollout's two arms compared metric by metric.

Everything here is read from the rollout's latest stored look (`RolloutAnalysis`), never recomputed: the
checks with the very intervals the decision used (each at its share of the rollout's alpha split), and the
exploratory comparisons the look reported beside them. A rollout's page costs two small reads however many
requests it has served; the list reads the latest looks of all its rollouts at once."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from accounts.decorators import viewer_required
from config.live import LiveRegion, live_region, live_response
from experiments.metrics import HIGHER, METRICS
from rollouts import selectors
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.plans import plan_from_stored
from rollouts.plans.alpha import alpha_split
from rollouts.views.display import MISSING, check_view, fmt, rollout_or_404, rollout_summary

POLL_S = 2.0
DECISION_TYPES = ("primary", "guardrail", "slo", "quality")


def comparison_view(row: dict[str, Any]) -> dict[str, Any]:
    """One exploratory row (`rollouts.analysis.checks.exploratory_comparisons`) for the results table."""
    metric = METRICS.get(str(row.get("metric")))
    unit = {"ms": "ms", "share": "share"}.get(metric.unit, "number") if metric else "number"
    relative = row.get("difference") == "relative"

    def effect_text(value: Any) -> str:
        if value is None:
            return MISSING
        return fmt(value * 100, "percent", signed=True) if relative else fmt(value, "points" if unit == "share" else unit, signed=True)

    low, high = row.get("low"), row.get("high")
    better = None
    if low is not None and high is not None and (low > 0 or high < 0):
        up = low > 0
        better = up if (metric and metric.direction == HIGHER) else not up
    chance = row.get("chance_better")
    return {
        **row,
        "better_is": "higher" if metric and metric.direction == HIGHER else "lower",
        "baseline_text": fmt(row.get("baseline"), unit),
        "candidate_text": fmt(row.get("candidate"), unit),
        "effect_text": effect_text(row.get("effect")),
        "interval_text": f"{effect_text(low)} to {effect_text(high)}" if low is not None and high is not None else MISSING,
        "chance_pct": round(chance * 100, 1) if chance is not None else None,
        "verdict": "better" if better is True else ("worse" if better is False else "no difference shown"),
        "status": "green" if better is True else ("red" if better is False else "amber"),
        "n_text": " / ".join(fmt(x, "count") for x in row.get("n") or []),
        "sessions_text": " / ".join(fmt(x, "count") for x in row.get("sessions") or []),
    }  # fmt: skip


def _primary(latest: RolloutAnalysis | None) -> dict[str, Any] | None:
    return next((c for c in (latest.checks if latest else []) if c.get("type") == "primary"), None)


def _results(rollout: Rollout) -> dict[str, Any]:
    latest = selectors.rollout_latest_analysis(rollout=rollout)
    raw = [c for c in (latest.checks if latest else []) if c.get("type") in DECISION_TYPES]
    primary = _primary(latest)
    return {
        "latest": latest,
        "checks": [check_view(c) for c in raw],
        "primary": primary,
        "primary_view": check_view(primary) if primary else None,
        "rows": [comparison_view(r) for r in (latest.comparisons if latest else [])],
        "split": alpha_split(plan_from_stored(rollout.plan)),
    }


def _experiments() -> list[Rollout]:
    return list(selectors.rollout_list().filter(strategy=Rollout.Strategy.AB)[:50])


@viewer_required
@require_GET
def experiment_list(request: HttpRequest) -> HttpResponse:
    # The list shows each rollout's primary check as its latest look decided it: the latest looks in one
    # read for the page (never one query per rollout), and no other check formatted.
    rollouts = _experiments()
    looks = selectors.rollout_latest_analyses(rollout_ids=[r.pk for r in rollouts])
    rows = []
    for rollout in rollouts:
        primary = _primary(looks.get(rollout.pk))
        rows.append({"summary": rollout_summary(rollout, looks.get(rollout.pk)),
                     "primary_view": check_view(primary) if primary else None})  # fmt: skip
    return render(request, "experiments/list.html", {"rows": rows})


def _region(request: HttpRequest, rollout: Rollout) -> LiveRegion:
    context = {"rollout": rollout, "summary": rollout_summary(rollout), **_results(rollout)}
    return live_region(
        request, template="experiments/_results.html", context=context, region_id="experiment-live",
        url=reverse("experiment-detail-live", args=[rollout.pk]), every_s=POLL_S, label="Experiment results",
    )  # fmt: skip


@viewer_required
@require_GET
def experiment_detail(request: HttpRequest, rollout_id: int) -> HttpResponse:
    rollout = rollout_or_404(rollout_id)
    return render(request, "experiments/detail.html", {"rollout": rollout, "live": _region(request, rollout)})


@viewer_required
@require_GET
def experiment_detail_live(request: HttpRequest, rollout_id: int) -> HttpResponse:
    return live_response(request, _region(request, rollout_or_404(rollout_id)))
