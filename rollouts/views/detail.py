"""One rollout's page: its status and checks and its timeline, steps, eval gate and shadow pairs (two live
partials the page embeds and htmx polls), and the charts' series."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET

from accounts.decorators import viewer_required
from config.live import LiveRegion, live_region, live_response
from evals.selectors import eval_gate_get, eval_gate_result
from rollouts import selectors
from rollouts.approvals import approval_status, step_approvers
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.planning import plan_sample_sizes
from rollouts.plans import plan_from_stored
from rollouts.plans.alpha import alpha_split
from rollouts.views.actions import actions_for
from rollouts.views.display import (
    ARM_FIELDS,
    POLL_S,
    State,
    arm_rows,
    check_numbers,
    check_view,
    duration,
    estimate_view,
    event_view,
    finite,
    percent,
    plan_yaml,
    rollout_or_404,
    rollout_summary,
)
from rollouts.watchdog import rollout_staleness
from serving.redaction import redact
from serving.selectors import shadow_pairs


def _steps_view(rollout: Rollout) -> list[dict[str, Any]]:
    approvals = step_approvers(rollout=rollout)
    rows = []
    for index, step in enumerate(rollout.steps):
        if rollout.state == State.PROMOTED or index < rollout.step_index:
            status = "done"
        elif index == rollout.step_index and rollout.is_live:
            status = "current"
        elif index == rollout.step_index:
            status = "ended here"
        elif rollout.state == State.AWAITING_APPROVAL and index == rollout.step_index + 1:
            status = "waiting for approval"
        else:
            status = "to come"
        rows.append({
            "number": index + 1, "weight": percent(float(step["weight"])), "shadow": percent(float(step["shadow_rate"])),
            "min_duration": duration(step["min_duration_s"]), "min_requests": step["min_candidate_requests"],
            "requires_approval": step["requires_approval"], "approval": approvals.get(index), "status": status,
        })  # fmt: skip
    if rollout.plan.get("promotion_requires_approval"):
        rows.append({
            "number": None, "weight": "promotion", "shadow": "", "min_duration": "", "min_requests": "",
            "requires_approval": True, "approval": approvals.get(len(rollout.steps)),
            "status": "done" if rollout.state == State.PROMOTED else (
                "waiting for approval" if rollout.state == State.AWAITING_APPROVAL and rollout.step_index + 1 >= len(rollout.steps) else "to come"
            ),
        })  # fmt: skip
    return rows


def _gate_view(rollout: Rollout) -> dict[str, Any] | None:
    if not rollout.plan.get("eval_gate"):
        return None
    gate = eval_gate_get(rollout_id=rollout.pk)
    result = eval_gate_result(rollout_id=rollout.pk)
    evidence = (result.evidence if result is not None else {}) or {}
    runs = []
    if gate is not None:
        for side, run in (("baseline", gate.baseline_run), ("candidate", gate.candidate_run)):
            if run is not None:
                pct = round(100 * run.done / run.total) if run.total else 100
                runs.append({"side": side, "run": run, "pct": pct})
    spec = rollout.plan["eval_gate"]
    status = result.status if result is not None else "not started"
    return {
        "spec": spec, "status": status,
        "badge": {"passed": "green", "failed": "red", "undecided": "red", "error": "red", "pending": "amber"}.get(status, "grey"),
        "reason": result.reason if result is not None else "The gate runs when the rollout starts.",
        "overall": evidence.get("overall"), "per_tag": evidence.get("per_tag") or [], "runs": runs,
        "decision": evidence.get("decision") or {},
    }  # fmt: skip


def _shadow_view(rollout: Rollout, limit: int = 5) -> list[dict[str, Any]]:
    pairs = shadow_pairs(rollout_id=rollout.pk).order_by("-created_at", "-id")[:limit]
    # Stored redacted already (serving redacts before writing); redacting again costs little and keeps a
    # page from ever showing a stored value that slipped through.
    return [
        {
            "pair": pair,
            "prompt": redact(pair.prompt_text),
            "baseline": redact(pair.baseline_output),
            "candidate": redact(pair.candidate_output),
            "scores": pair.scores,
        }
        for pair in pairs
    ]


def _status_context(request: HttpRequest, rollout: Rollout) -> dict[str, Any]:
    analysis = selectors.rollout_latest_analysis(rollout=rollout)
    weights = selectors.rollout_weights(rollout=rollout)
    return {
        "summary": rollout_summary(rollout, analysis),
        "rollout": rollout,
        "analysis": analysis,
        "checks": [check_view(c) for c in (analysis.checks if analysis is not None else [])],
        "arms": arm_rows(analysis.arms, tuple(ARM_FIELDS)) if analysis is not None else [],
        "srm": analysis.srm if analysis is not None else None,
        "srm_applies": 0 < weights["candidate"] < 1,
        "actions": actions_for(rollout, request.user),
        "latest_look_id": analysis.pk if analysis is not None else 0,
        "look_step": analysis.step_index + 1 if analysis is not None else None,
        "look_is_older_step": analysis is not None and analysis.step_index != rollout.step_index,
        "alpha_split": alpha_split(plan_from_stored(rollout.plan)),
        "staleness": rollout_staleness(rollout=rollout),
        "approval": approval_status(rollout=rollout),
    }  # fmt: skip


def _history_context(rollout: Rollout) -> dict[str, Any]:
    events = list(selectors.rollout_events(rollout=rollout))
    return {
        "rollout": rollout,
        "steps": _steps_view(rollout),
        "steps_have_shadow": any(float(step["shadow_rate"]) for step in rollout.steps),
        "events": [event_view(e) for e in reversed(events)],
        "gate": _gate_view(rollout),
        "shadow": _shadow_view(rollout),
        "shadow_expected": bool((rollout.plan.get("shadow") or {}).get("rate")) or rollout.strategy in ("shadow", "blue_green"),
    }  # fmt: skip


def _status_region(request: HttpRequest, rollout: Rollout) -> LiveRegion:
    return live_region(
        request, template="rollouts/_status.html", context=_status_context(request, rollout), region_id="rollout-status",
        url=reverse("rollout-status", args=[rollout.pk]), every_s=POLL_S, label="Live status of the rollout",
    )  # fmt: skip


def _history_region(request: HttpRequest, rollout: Rollout) -> LiveRegion:
    return live_region(
        request, template="rollouts/_history.html", context=_history_context(rollout), region_id="rollout-history",
        url=reverse("rollout-history", args=[rollout.pk]), every_s=POLL_S, label="Timeline and steps of the rollout",
    )  # fmt: skip


@viewer_required
@require_GET
def rollout_detail(request: HttpRequest, rollout_id: int) -> HttpResponse:
    rollout = rollout_or_404(rollout_id)
    estimate = None
    if rollout.state == State.DRAFT:
        estimate = estimate_view(
            plan_sample_sizes(plan=plan_from_stored(rollout.plan), baseline=rollout.baseline)
        )
    return render(request, "rollouts/detail.html", {
        "rollout": rollout,
        "summary": rollout_summary(rollout),
        "status": _status_region(request, rollout),
        "history": _history_region(request, rollout),
        "series": series_payload(selectors.rollout_series(rollout=rollout)),
        "charts": _chart_specs(rollout),
        "plan_yaml": plan_yaml(rollout.plan),
        "estimate": estimate,
        "interval_s": int(POLL_S),
    })  # fmt: skip


@viewer_required
@require_GET
def rollout_status(request: HttpRequest, rollout_id: int) -> HttpResponse:
    return live_response(request, _status_region(request, rollout_or_404(rollout_id)))


@viewer_required
@require_GET
def rollout_history(request: HttpRequest, rollout_id: int) -> HttpResponse:
    return live_response(request, _history_region(request, rollout_or_404(rollout_id)))


CHART_ARM_FIELDS = ("rps", "ttft_p50_ms", "ttft_p99_ms", "tpot_gmean_ms", "error_rate", "goodput", "n")


def _look_payload(look: RolloutAnalysis) -> dict[str, Any]:
    arms: dict[str, dict[str, float | None]] = {}
    for arm in ("baseline", "candidate"):
        values = look.arms.get(arm) or {}
        arms[arm] = {}
        for key in CHART_ARM_FIELDS:
            value = finite(values.get(key))
            # Shares are charted in percent, like the tables show them.
            arms[arm][key] = value * 100 if value is not None and key in ("error_rate", "goodput") else value
    checks = {}
    for check in look.checks:
        numbers = check_numbers(check)
        checks[str(check.get("name"))] = {
            "centre": numbers["centre"], "low": numbers["low"], "high": numbers["high"],
            "threshold": numbers["threshold"], "decision": check.get("decision"), "unit": numbers["unit"],
            "type": check.get("type"),
        }  # fmt: skip
    return {
        "id": look.pk, "t": look.created_at.isoformat(), "step": look.step_index + 1, "decision": look.decision,
        "arms": arms, "checks": checks,
    }  # fmt: skip


def series_payload(looks: list[RolloutAnalysis]) -> dict[str, Any]:
    # Looks that measured no traffic (the eval gate's, a step's first seconds) have nothing to draw.
    return {"looks": [_look_payload(look) for look in looks if look.arms]}


def _chart_specs(rollout: Rollout) -> dict[str, Any]:
    """Which charts the page draws: the per-arm series, and one interval chart per check of the plan."""
    plan = plan_from_stored(rollout.plan)
    checks = [{"name": slo.label, "type": "slo", "metric": slo.metric} for slo in plan.slos]
    checks += [{"name": g.label, "type": "guardrail", "metric": g.metric} for g in plan.guardrails]
    if plan.shadow_quality is not None:
        checks.append({"name": plan.shadow_quality.label, "type": "quality", "metric": ""})
    if plan.strategy == "ab" and plan.primary_metric is not None:
        checks.append(
            {
                "name": f"primary: {plan.primary_metric.metric}",
                "type": "primary",
                "metric": plan.primary_metric.metric,
            }
        )
    arms = [
        {"key": "rps", "title": "Request rate", "unit": "requests / s"},
        {"key": "ttft_p50_ms,ttft_p99_ms", "title": "Time to first token (p50, p99; each within 1 %)", "unit": "ms"},
        {"key": "tpot_gmean_ms", "title": "Time per output token (geometric mean)", "unit": "ms"},
        {"key": "error_rate", "title": "Error rate", "unit": "%"},
        {"key": "goodput", "title": "Goodput (requests within every SLO)", "unit": "%"},
    ]
    return {"arms": arms, "checks": checks}


@viewer_required
@require_GET
def rollout_series_json(request: HttpRequest, rollout_id: int) -> JsonResponse:
    rollout = rollout_or_404(rollout_id)
    since_raw = request.GET.get("since")
    since = parse_datetime(since_raw) if since_raw else None
    if since_raw and (since is None or since.tzinfo is None):
        return JsonResponse(
            {"detail": "since must be an ISO 8601 time with a zone", "code": "invalid"}, status=400
        )
    return JsonResponse(series_payload(selectors.rollout_series(rollout=rollout, since=since)))
