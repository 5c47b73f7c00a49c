"""Pages of rollouts: the dashboard, a rollout with its live evidence and its actions, creating a rollout
(a form or a pasted plan) with the sample-size estimate, and the audit log.

Pages read through `rollouts.selectors` (and the evals and serving selectors) and act through
`rollouts.services`, which check roles and states again; the buttons shown are `rollout_actions`.
Live parts are partials (`config.live`): the page embeds them and htmx polls the same partial."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import yaml
from django.contrib import messages
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.decorators import manager_required, viewer_required
from config.errors import DomainError, NotFound
from config.live import LiveRegion, live_region, live_response
from evals.selectors import eval_gate_get, eval_gate_result, eval_suite_list
from experiments.metrics import METRICS
from rollouts import selectors
from rollouts.actors import Actor
from rollouts.forms import PastePlanForm, RolloutForm
from rollouts.models import Rollout, RolloutAnalysis, RolloutEvent
from rollouts.planning import plan_sample_sizes
from rollouts.plans import PLAN_EXAMPLE, PlanInvalid, plan_from_stored
from rollouts.services import (
    ACTIONS,
    action_allowed,
    plan_validate,
    rollout_abort,
    rollout_advance,
    rollout_approve,
    rollout_create,
    rollout_pause,
    rollout_promote,
    rollout_reject,
    rollout_resume,
    rollout_rollback,
    rollout_start,
)
from serving.redaction import redact
from serving.selectors import model_version_list, shadow_pairs

State = Rollout.State
POLL_S = 2.0
TIMELINE_EVIDENCE_ARMS = ("n", "rps", "error_rate", "goodput", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "e2e_p99_ms")

# --- numbers as people read them ------------------------------------------------------------------

ARM_FIELDS: dict[str, tuple[str, str]] = {
    "n": ("requests", "count"),
    "rps": ("requests / s", "rate"),
    "error_rate": ("error rate", "share"),
    "goodput": ("goodput", "share"),
    "ttft_p50_ms": ("TTFT p50", "ms"),
    "ttft_p99_ms": ("TTFT p99", "ms"),
    "ttft_mean_ms": ("TTFT mean", "ms"),
    "tpot_mean_ms": ("TPOT mean", "ms"),
    "tpot_p99_ms": ("TPOT p99", "ms"),
    "e2e_p50_ms": ("end-to-end p50", "ms"),
    "e2e_p99_ms": ("end-to-end p99", "ms"),
    "cost_per_request": ("cost / request", "number"),
    "completion_tokens_mean": ("completion tokens", "number"),
}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


NBSP = "\u00a0"  # a number and its unit stay on one line
MISSING = "\u2013"  # an en dash where there is no number yet


def fmt(value: Any, kind: str, *, signed: bool = False) -> str:
    """A number in its unit: "123 ms", "0.42 %", "+3.1 %", "12.5/s", "1 234"."""
    number = _finite(value)
    if number is None:
        return MISSING
    sign = "+" if signed and number > 0 else ""
    if kind == "ms":
        if abs(number) >= 1000:
            return f"{sign}{number / 1000:.2f}{NBSP}s"
        return f"{sign}{number:.3g}{NBSP}ms" if abs(number) < 10 else f"{sign}{number:.0f}{NBSP}ms"
    if kind == "share":
        return f"{sign}{number * 100:.2f}{NBSP}%"
    if kind == "percent":  # already times 100
        return f"{sign}{number:.1f}{NBSP}%"
    if kind == "points":
        return f"{sign}{number * 100:.2f}{NBSP}pts"
    if kind == "rate":
        return f"{sign}{number:.3g}/s"
    if kind == "count":
        return f"{int(number):,}".replace(",", " ")
    return f"{sign}{number:.4g}"


def metric_kind(metric_name: str) -> str:
    metric = METRICS.get(metric_name)
    if metric is None:
        return ARM_FIELDS.get(metric_name, ("", "number"))[1]
    return {"ms": "ms", "share": "share"}.get(metric.unit, "number")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


DECISION_STATUS = {"safe": "green", "win": "green", "undecided": "amber", "breach": "red", "loss": "red"}


def check_numbers(check: dict[str, Any]) -> dict[str, Any]:
    """A check's point, interval and threshold on one display scale, with the unit of that scale.

    Guardrails are on the harm scale (positive = the candidate is worse) and their threshold is the
    margin; tail SLOs are the share of requests over the latency limit against the allowed share."""
    kind = check.get("type")
    metric = str(check.get("metric") or "")
    mkind = metric_kind(metric)
    scale, unit, value_kind = 1.0, "", "number"
    if kind in ("guardrail", "primary"):
        relative = bool(check.get("relative")) or check.get("difference") == "relative"
        if relative:
            scale, unit, value_kind = 100.0, "%", "percent"
        elif mkind == "share":
            scale, unit, value_kind = 100.0, "pts", "percent_points"
        elif mkind == "ms":
            unit, value_kind = "ms", "ms"
        centre = check.get("effect")
        threshold = check.get("margin") if kind == "guardrail" else 0.0
    elif kind == "slo":
        metric_def = METRICS.get(metric)
        centre = check.get("estimate")
        if metric_def is not None and metric_def.shape == "percentile":
            scale, unit, value_kind = 100.0, "% over limit", "percent"
            threshold = check.get("share_limit")
        elif mkind == "share":
            scale, unit, value_kind = 100.0, "%", "percent"
            threshold = check.get("limit")
        else:
            unit, value_kind = ("ms", "ms") if mkind == "ms" else ("", "number")
            threshold = check.get("limit")
    else:  # quality: a mean score from 0 to 1
        centre, threshold = check.get("estimate"), check.get("limit")

    def scaled(value: Any) -> float | None:
        number = _finite(value)
        return None if number is None else number * scale

    return {
        "centre": scaled(centre), "low": scaled(check.get("low")), "high": scaled(check.get("high")),
        "threshold": scaled(threshold), "unit": unit, "value_kind": value_kind,
    }  # fmt: skip


def _fmt_scaled(value: float | None, value_kind: str, *, signed: bool = False) -> str:
    if value is None:
        return MISSING
    if value_kind == "percent":
        return fmt(value, "percent", signed=signed)
    if value_kind == "percent_points":
        sign = "+" if signed and value > 0 else ""
        return f"{sign}{value:.2f}{NBSP}pts"
    return fmt(value, value_kind if value_kind in ("ms",) else "number", signed=signed)


def check_view(check: dict[str, Any]) -> dict[str, Any]:
    """One SLO / guardrail / quality / primary check, ready for a table row with an interval bar."""
    numbers = check_numbers(check)
    decision = str(check.get("decision") or "undecided")
    kind = check.get("type", "")
    vk = numbers["value_kind"]
    signed = kind in ("guardrail", "primary")
    low, high, centre, threshold = numbers["low"], numbers["high"], numbers["centre"], numbers["threshold"]
    if kind == "guardrail":
        threshold_text = f"margin {_fmt_scaled(threshold, vk)}"
        meaning = "how much worse the candidate is (positive = worse)"
    elif kind == "primary":
        threshold_text = "no difference at 0"
        meaning = "candidate minus baseline"
    elif kind == "slo":
        threshold_text = f"limit {_fmt_scaled(threshold, vk)}"
        meaning = "share of requests over the latency limit" if numbers["unit"] == "% over limit" else "the candidate's value"
    else:
        threshold_text = f"at least {_fmt_scaled(threshold, vk)}"
        meaning = "mean score of the candidate's shadow answers"
    explain = _explain_check(kind, decision, low, high, threshold, vk, check)
    n = check.get("n")
    if isinstance(n, list):
        n_text = " / ".join(fmt(x, "count") for x in n)
    else:
        n_text = fmt(n, "count") if n is not None else MISSING
    return {
        "name": check.get("name") or check.get("metric") or "check",
        "type": kind,
        "metric": check.get("metric", ""),
        "decision": decision,
        "status": DECISION_STATUS.get(decision, "amber"),
        "estimate": _fmt_scaled(centre, vk, signed=signed),
        "interval": f"{_fmt_scaled(low, vk, signed=signed)} to\u00a0{_fmt_scaled(high, vk, signed=signed)}" if low is not None and high is not None else MISSING,
        "threshold": threshold_text,
        "meaning": meaning,
        "n": n_text,
        "reason": check.get("reason", ""),
        "explain": explain,
        "bar": _interval_bar(low, high, centre, threshold),
        "baseline": check.get("baseline"),
        "candidate": check.get("candidate"),
    }  # fmt: skip


def _explain_check(
    kind: str, decision: str, low: float | None, high: float | None, threshold: float | None, vk: str, check: dict[str, Any]
) -> str:
    """One sentence on why the check reads as it does."""
    if low is None or high is None:
        return str(check.get("reason") or "not enough data yet")
    lo, hi, th = _fmt_scaled(low, vk, signed=True), _fmt_scaled(high, vk, signed=True), _fmt_scaled(threshold, vk)
    if kind == "guardrail":
        if decision == "breach":
            return f"The candidate is worse than the baseline by at least {lo}: beyond the margin of {th}."
        if decision == "safe":
            return f"The candidate is at most {hi} worse than the baseline: within the margin of {th}."
        return f"Between {lo} and {hi} worse: the interval still straddles the margin of {th}; more requests will decide."
    if kind == "slo":
        if decision == "breach":
            return f"At least {_fmt_scaled(low, vk)} against a limit of {th}: breached."
        if decision == "safe":
            return f"At most {_fmt_scaled(high, vk)} against a limit of {th}: met."
        return f"Between {_fmt_scaled(low, vk)} and {_fmt_scaled(high, vk)}: the limit of {th} is inside; more requests will decide."
    if kind == "primary":
        if decision == "win":
            return f"The candidate is better: the difference is between {lo} and {hi}."
        if decision == "loss":
            return f"The candidate is worse: the difference is between {lo} and {hi}."
        return f"The difference is between {lo} and {hi}: no decision yet."
    if decision == "breach":
        return f"At most {_fmt_scaled(high, vk)}: below the floor of {th}."
    if decision == "safe":
        return f"At least {_fmt_scaled(low, vk)}: above the floor of {th}."
    return f"Between {_fmt_scaled(low, vk)} and {_fmt_scaled(high, vk)}: the floor of {th} is inside."


def _interval_bar(low: float | None, high: float | None, centre: float | None, threshold: float | None) -> dict[str, float] | None:
    """Positions (percent of the width) of the interval, its point and the threshold, on a shared scale."""
    if low is None or high is None or threshold is None:
        return None
    points = [low, high, threshold] + ([centre] if centre is not None else [])
    lo, hi = min(points), max(points)
    pad = (hi - lo) * 0.15 or max(abs(hi), 1.0) * 0.15
    lo, hi = lo - pad, hi + pad

    def at(value: float) -> float:
        return round(100.0 * (value - lo) / (hi - lo), 2)

    return {
        "low": at(low), "width": max(0.8, at(high) - at(low)), "mark": at(threshold),
        "centre": at(centre) if centre is not None else -1.0,
    }  # fmt: skip


def arm_rows(arms: dict[str, Any], fields: tuple[str, ...] = TIMELINE_EVIDENCE_ARMS) -> list[dict[str, str]]:
    base, cand = arms.get("baseline") or {}, arms.get("candidate") or {}
    rows = []
    for key in fields:
        if key not in base and key not in cand:
            continue
        label, kind = ARM_FIELDS.get(key, (key, "number"))
        rows.append({"label": label, "baseline": fmt(base.get(key), kind), "candidate": fmt(cand.get(key), kind)})
    return rows


# --- what each action does, said before it is done ------------------------------------------------

ACTION_LABELS = {
    "start": "Start", "pause": "Pause", "resume": "Resume", "approve": "Approve", "reject": "Reject",
    "advance": "Advance now", "promote": "Promote now", "rollback": "Roll back", "abort": "Abort",
}  # fmt: skip
DANGER_ACTIONS = {"rollback", "abort", "reject"}
ACTION_SERVICES: dict[str, Any] = {
    "start": rollout_start, "pause": rollout_pause, "resume": rollout_resume, "approve": rollout_approve,
    "reject": rollout_reject, "advance": rollout_advance, "promote": rollout_promote, "rollback": rollout_rollback,
    "abort": rollout_abort,
}  # fmt: skip
assert set(ACTION_SERVICES) == set(ACTIONS)


def _pct(weight: float) -> str:
    return f"{weight * 100:g} %"


def _step_text(rollout: Rollout, index: int) -> str:
    steps = rollout.steps
    step = steps[index]
    where = f"step {index + 1} of {len(steps)}"
    weight = float(step["weight"])
    if weight == 0:
        return f"{where}: no users on {rollout.candidate.label}; {_pct(float(step['shadow_rate']))} of requests are mirrored to it"
    return f"{where}: {_pct(weight)} of the users of {rollout.alias_name} go to {rollout.candidate.label}"


def action_explanation(rollout: Rollout, action: str) -> str:
    alias, base, cand = rollout.alias_name, rollout.baseline.label, rollout.candidate.label
    steps = rollout.steps
    watch = "The analysis keeps checking every guardrail and rolls back by itself on a breach."
    if action == "start":
        gate = rollout.plan.get("eval_gate")
        if gate:
            return (
                f"The eval gate runs first: {base} and {cand} answer the suite {gate.get('suite')}, and no traffic "
                f"moves until {cand} passes it. Then {_step_text(rollout, 0)}."
            )
        if steps and steps[0].get("requires_approval"):
            return f"The rollout starts and waits for an approval of step 1 ({_step_text(rollout, 0)})."
        return f"The rollout starts now: {_step_text(rollout, 0)}. {watch}"
    if action == "approve":
        pending = rollout.step_index + 1
        if pending >= len(steps):
            return f"You approve the promotion: {cand} becomes what {alias} serves to every user, and the rollout ends."
        return f"You approve {_step_text(rollout, pending)}. It starts at once. {watch}"
    if action == "reject":
        return f"You refuse the approval: the rollout rolls back and every user of {alias} goes back to {base}."
    if action == "advance":
        nxt = rollout.step_index + 1
        if nxt < len(steps):
            if steps[nxt].get("requires_approval"):
                return f"Step {nxt} ends now, without waiting for its minimums; step {nxt + 1} needs an approval, so the rollout then waits for one."
            return f"Step {nxt} ends now, without waiting for its minimums, and {_step_text(rollout, nxt)}."
        if rollout.plan.get("promotion_requires_approval"):
            return "The last step ends now; the promotion needs an approval, so the rollout then waits for one."
        return f"The last step ends now and {cand} is promoted: it serves every user of {alias}."
    if action == "promote":
        return f"{cand} becomes what {alias} serves to every user now, skipping any remaining steps. The rollout ends as promoted."
    if action == "pause":
        weights = selectors.rollout_weights(rollout=rollout)
        return (
            f"The split stays where it is ({_pct(weights['candidate'])} of users on {cand}) and nothing advances until "
            "someone resumes. The analysis still rolls back by itself on a breach."
        )
    if action == "resume":
        return f"The rollout carries on from where it was paused ({(rollout.paused_from or 'running').replace('_', ' ')})."
    if action == "rollback":
        return (
            f"Every user of {alias} goes back to {base} within a second and the rollout ends as rolled back. "
            f"Trying {cand} again needs a new rollout."
        )
    if action == "abort":
        return f"The rollout stops without a verdict: {base} keeps (or gets back) all of {alias}'s traffic."
    return ""


def _actions(rollout: Rollout, user: Any) -> list[dict[str, Any]]:
    out = []
    for action in selectors.rollout_actions(rollout=rollout, user=user):
        label = ACTION_LABELS[action]
        if action == "approve":
            pending = rollout.step_index + 1
            label = "Approve promotion" if pending >= len(rollout.steps) else f"Approve step {pending + 1}"
        out.append({
            "action": action, "label": label, "danger": action in DANGER_ACTIONS,
            "explanation": action_explanation(rollout, action),
            "url": reverse("rollout-action", args=[rollout.pk, action]),
            "step_index": rollout.step_index + 1 if action == "approve" else None,
        })  # fmt: skip
    return out


# --- shaping rollouts for the pages ---------------------------------------------------------------


def rollout_summary(rollout: Rollout, analysis: RolloutAnalysis | None = None) -> dict[str, Any]:
    """What the dashboard and the detail header show about one rollout."""
    steps = rollout.steps
    weights = selectors.rollout_weights(rollout=rollout)
    health = selectors.rollout_health(analysis=analysis)
    if rollout.state == State.ROLLED_BACK:
        health = {**health, "status": "red", "driver": health.get("driver") or "rolled back"}
    step = rollout.current_step
    return {
        "rollout": rollout,
        "title": rollout.name or f"{rollout.alias_name}: {rollout.baseline.label} → {rollout.candidate.label}",
        "step_number": rollout.step_index + 1 if step is not None else None,
        "step_count": len(steps),
        "weights": weights,
        "candidate_pct": f"{weights['candidate'] * 100:.4g}",
        "shadow_pct": f"{weights['shadow'] * 100:.4g}" if weights["shadow"] else "",
        "health": health,
        "health_label": {"green": "healthy", "amber": "undecided", "red": "breach", "unknown": "no data yet"}.get(health["status"], health["status"]),
        "step_started_at": rollout.step_started_at if not rollout.is_terminal else None,
        "time_in_step": duration(selectors.rollout_time_in_step_s(rollout=rollout)),
        "analysis": analysis,
        "pending_step": selectors.rollout_pending_step(rollout=rollout),
    }  # fmt: skip


def _steps_view(rollout: Rollout) -> list[dict[str, Any]]:
    approvals = {a.step_index: a for a in selectors.rollout_approvals(rollout=rollout)}
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
            "number": index + 1, "weight": _pct(float(step["weight"])), "shadow": _pct(float(step["shadow_rate"])),
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


EVENT_STATUS = {
    "rolled_back": "red", "eval_gate_failed": "red", "aborted": "red",
    "promoted": "green", "eval_gate_passed": "green", "approved": "green", "step_started": "green", "started": "green",
    "awaiting_approval": "amber", "paused": "amber", "gating": "amber",
}  # fmt: skip


def event_view(event: RolloutEvent) -> dict[str, Any]:
    evidence = event.evidence or {}
    checks = evidence.get("checks") or (evidence.get("latest_analysis") or {}).get("checks") or []
    return {
        "event": event,
        "label": event.get_kind_display().replace("_", " ").capitalize() if hasattr(event, "get_kind_display") else event.kind,
        "status": EVENT_STATUS.get(event.kind, "grey"),
        "who": event.actor if event.via in ("system", "") else f"{event.actor} via {event.via}",
        "detail": event.actor_detail,
        "step": event.step_index + 1 if event.step_index >= 0 else None,
        "arms": arm_rows(evidence.get("arms") or {}),
        "checks": [check_view(c) for c in checks],
        "srm": evidence.get("srm") or (evidence.get("latest_analysis") or {}).get("srm"),
        "gate": evidence.get("eval_gate"),
        "has_evidence": bool(evidence.get("arms") or checks),
    }  # fmt: skip


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
        "badge": {"passed": "green", "failed": "red", "error": "red", "pending": "amber"}.get(status, "grey"),
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
            "pair": pair, "prompt": redact(pair.prompt_text), "baseline": redact(pair.baseline_output),
            "candidate": redact(pair.candidate_output), "scores": pair.scores,
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
        "actions": _actions(rollout, request.user),
        "latest_look_id": analysis.pk if analysis is not None else 0,
        "look_step": analysis.step_index + 1 if analysis is not None else None,
        "look_is_older_step": analysis is not None and analysis.step_index != rollout.step_index,
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


def _actor(request: HttpRequest) -> Actor:
    assert isinstance(request.user, User)  # the views that act require a signed-in user
    return Actor.of(request.user, via="ui")


def _get_rollout(rollout_id: int) -> Rollout:
    try:
        return selectors.rollout_get(rollout_id=rollout_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


# --- the dashboard --------------------------------------------------------------------------------


def _dashboard_context() -> dict[str, Any]:
    everything = list(selectors.rollout_list(live=True))
    # Pending approvals first, the longest waiting at the top; then the rest, newest first.
    pending = sorted((r for r in everything if r.state == State.AWAITING_APPROVAL), key=lambda r: r.updated_at)
    live = pending + [r for r in everything if r.state != State.AWAITING_APPROVAL]
    rows = [rollout_summary(r, selectors.rollout_latest_analysis(rollout=r)) for r in live]
    recent = [rollout_summary(r) for r in selectors.rollout_list(state=f"{State.PROMOTED},{State.ROLLED_BACK}")[:10]]
    return {
        "rows": rows,
        "pending": [row for row in rows if row["rollout"].state == State.AWAITING_APPROVAL],
        "recent": recent,
    }


def _dashboard_region(request: HttpRequest) -> LiveRegion:
    return live_region(
        request, template="rollouts/_dashboard.html", context=_dashboard_context(), region_id="dashboard-live",
        url=reverse("dashboard-live"), every_s=POLL_S, label="Live rollouts",
    )  # fmt: skip


@viewer_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "rollouts/dashboard.html", {"live": _dashboard_region(request)})


@viewer_required
@require_GET
def dashboard_live(request: HttpRequest) -> HttpResponse:
    return live_response(request, _dashboard_region(request))


# --- one rollout ----------------------------------------------------------------------------------


def _plan_yaml(plan: dict[str, Any]) -> str:
    return yaml.safe_dump(plan, sort_keys=False, default_flow_style=False, allow_unicode=True)


@viewer_required
@require_GET
def rollout_detail(request: HttpRequest, rollout_id: int) -> HttpResponse:
    rollout = _get_rollout(rollout_id)
    estimate = None
    if rollout.state == State.DRAFT:
        estimate = _estimate_view(plan_sample_sizes(plan=plan_from_stored(rollout.plan), baseline=rollout.baseline))
    return render(request, "rollouts/detail.html", {
        "rollout": rollout,
        "summary": rollout_summary(rollout),
        "status": _status_region(request, rollout),
        "history": _history_region(request, rollout),
        "series": series_payload(selectors.rollout_series(rollout=rollout)),
        "charts": _chart_specs(rollout),
        "plan_yaml": _plan_yaml(rollout.plan),
        "estimate": estimate,
        "interval_s": int(POLL_S),
    })  # fmt: skip


@viewer_required
@require_GET
def rollout_status(request: HttpRequest, rollout_id: int) -> HttpResponse:
    return live_response(request, _status_region(request, _get_rollout(rollout_id)))


@viewer_required
@require_GET
def rollout_history(request: HttpRequest, rollout_id: int) -> HttpResponse:
    return live_response(request, _history_region(request, _get_rollout(rollout_id)))


CHART_ARM_FIELDS = ("rps", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "error_rate", "goodput", "n")


def _look_payload(look: RolloutAnalysis) -> dict[str, Any]:
    arms: dict[str, dict[str, float | None]] = {}
    for arm in ("baseline", "candidate"):
        values = look.arms.get(arm) or {}
        arms[arm] = {}
        for key in CHART_ARM_FIELDS:
            value = _finite(values.get(key))
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
    return {"looks": [_look_payload(look) for look in looks]}


def _chart_specs(rollout: Rollout) -> dict[str, Any]:
    """Which charts the page draws: the per-arm series, and one interval chart per check of the plan."""
    plan = plan_from_stored(rollout.plan)
    checks = [{"name": slo.label, "type": "slo", "metric": slo.metric} for slo in plan.slos]
    checks += [{"name": g.label, "type": "guardrail", "metric": g.metric} for g in plan.guardrails]
    if plan.shadow_quality is not None:
        checks.append({"name": f"shadow quality >= {plan.shadow_quality.min_mean:g}", "type": "quality", "metric": ""})
    if plan.strategy == "ab" and plan.primary_metric is not None:
        checks.append({"name": f"primary: {plan.primary_metric.metric}", "type": "primary", "metric": plan.primary_metric.metric})
    arms = [
        {"key": "rps", "title": "Request rate", "unit": "requests / s"},
        {"key": "ttft_p50_ms,ttft_p99_ms", "title": "Time to first token (p50, p99)", "unit": "ms"},
        {"key": "tpot_mean_ms", "title": "Time per output token (mean)", "unit": "ms"},
        {"key": "error_rate", "title": "Error rate", "unit": "%"},
        {"key": "goodput", "title": "Goodput (requests within every SLO)", "unit": "%"},
    ]
    return {"arms": arms, "checks": checks}


@viewer_required
@require_GET
def rollout_series_json(request: HttpRequest, rollout_id: int) -> JsonResponse:
    rollout = _get_rollout(rollout_id)
    since_raw = request.GET.get("since")
    since = parse_datetime(since_raw) if since_raw else None
    if since_raw and (since is None or since.tzinfo is None):
        return JsonResponse({"detail": "since must be an ISO 8601 time with a zone", "code": "invalid"}, status=400)
    return JsonResponse(series_payload(selectors.rollout_series(rollout=rollout, since=since)))


@require_POST
def rollout_action(request: HttpRequest, rollout_id: int, action: str) -> HttpResponse:
    if not request.user.is_authenticated:
        raise PermissionDenied("log in first")
    if action not in ACTION_SERVICES:
        raise Http404(f"no action {action!r}")
    if not action_allowed(user=request.user, action=action):
        raise PermissionDenied(f"{action} is not open to your role")
    rollout = _get_rollout(rollout_id)
    kwargs: dict[str, Any] = {"rollout": rollout, "actor": _actor(request), "reason": request.POST.get("reason", "")[:2000]}
    if action == "approve" and (request.POST.get("step_index") or "").isdigit():
        kwargs["step_index"] = int(request.POST["step_index"])
    try:
        after = ACTION_SERVICES[action](**kwargs)
    except DomainError as exc:
        messages.error(request, f"Could not {ACTION_LABELS[action].lower()}: {exc.message}")
    else:
        messages.success(request, f"{ACTION_LABELS[action]}: done. The rollout is now {after.state.replace('_', ' ')}.")
    return redirect("rollout-detail", rollout_id=rollout.pk)


# --- creating a rollout ---------------------------------------------------------------------------


def _estimate_view(estimates: dict[str, Any]) -> dict[str, Any]:
    basis = estimates.get("basis") or {}
    steps = []
    for entry in estimates.get("steps") or []:
        need = entry.get("candidate_n")
        minimum = entry.get("min_candidate_requests")
        steps.append({
            "number": entry["step"] + 1, "weight": _pct(entry["weight"]), "shadow": _pct(entry.get("shadow_rate") or 0.0),
            "checks": [
                {**c, "assumed_text": ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in (c.get("assumed") or {}).items())}
                for c in entry.get("checks") or []
            ],
            "need": need, "minimum": minimum,
            "short": need is not None and minimum is not None and minimum < need,
            "duration": duration(entry.get("expected_duration_s")) if entry.get("expected_duration_s") is not None else None,
            "note": entry.get("note", ""),
        })  # fmt: skip
    return {"basis": basis, "steps": steps}


def _create_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {"mode": extra.pop("mode", "form"), "example": _plan_yaml(PLAN_EXAMPLE), **extra}


def _form(data: Any = None) -> RolloutForm:
    versions = [v.label for v in model_version_list()]
    suites = [s.name for s in eval_suite_list(latest_only=True)]
    return RolloutForm(data, versions=versions, suites=suites)


@manager_required
@require_http_methods(["GET", "POST"])
def rollout_new(request: HttpRequest) -> HttpResponse:
    mode = request.POST.get("mode") or request.GET.get("mode") or "form"
    mode = "paste" if mode == "paste" else "form"
    if request.method == "GET":
        return render(request, "rollouts/new.html", _create_context(request, mode=mode, form=_form(), paste=PastePlanForm()))
    intent = request.POST.get("intent", "check")
    form, paste = _form(), PastePlanForm()
    plan: dict[str, Any] | str
    if mode == "paste":
        paste = PastePlanForm(request.POST)
        paste.is_valid()
        plan = paste.cleaned_data.get("plan") or ""
        target: RolloutForm | PastePlanForm = paste
    else:
        form = _form(request.POST)
        form.is_valid()
        plan = form.to_plan()
        target = form
    context = _create_context(request, mode=mode, form=form, paste=paste)
    try:
        validated = plan_validate(data=plan)
        if intent == "create":
            created = rollout_create(plan=plan, actor=_actor(request))
            messages.success(
                request, "Created as a draft. Check the estimate below, then start it when both versions have a ready engine."
            )
            return redirect("rollout-detail", rollout_id=created.rollout.pk)
        context["estimate"] = _estimate_view(plan_sample_sizes(plan=validated.plan, baseline=validated.baseline))
        context["normalised"] = _plan_yaml(validated.plan.to_dict())
    except PlanInvalid as exc:
        target.place_errors(exc.errors)
        context["error_count"] = sum(len(v) for v in exc.errors.values())
        return render(request, "rollouts/new.html", context, status=400)
    except DomainError as exc:
        target.place_errors({exc.field or "plan": [exc.message]})
        context["error_count"] = 1
        return render(request, "rollouts/new.html", context, status=exc.status_code)
    return render(request, "rollouts/new.html", context)


# --- the audit log --------------------------------------------------------------------------------

AUDIT_PAGE = 50


def _audit_events(params: Any) -> tuple[QuerySet[RolloutEvent], dict[str, str]]:
    filters = {key: (params.get(key) or "").strip() for key in ("rollout", "actor", "kind")}
    events = RolloutEvent.objects.select_related("rollout").order_by("-created_at", "-id")
    if filters["rollout"].isdigit():
        events = events.filter(rollout_id=int(filters["rollout"]))
    elif filters["rollout"]:
        events = events.filter(rollout__alias_name=filters["rollout"])
    if filters["actor"]:
        events = events.filter(actor=filters["actor"])
    if filters["kind"]:
        events = events.filter(kind=filters["kind"])
    return events, filters


@viewer_required
@require_GET
def audit_log(request: HttpRequest) -> HttpResponse:
    events, filters = _audit_events(request.GET)
    page = Paginator(events, AUDIT_PAGE).get_page(request.GET.get("page"))
    actors = RolloutEvent.objects.order_by().values_list("actor", flat=True).distinct()
    query = urlencode({key: value for key, value in filters.items() if value})
    return render(request, "rollouts/audit.html", {
        "page": page, "rows": [event_view(e) for e in page.object_list], "filters": filters,
        "kinds": RolloutEvent.Kind.choices, "actors": sorted(set(actors)), "query": query,
    })  # fmt: skip


class _Echo:
    def write(self, value: str) -> str:
        return value


def _csv_rows(events: QuerySet[RolloutEvent]) -> Iterator[list[str]]:
    yield ["time", "rollout", "alias", "seq", "kind", "from_state", "to_state", "step", "actor", "via", "actor_detail", "reason", "evidence"]
    for event in events.iterator(chunk_size=500):
        yield [
            event.created_at.isoformat(), str(event.rollout_id), event.rollout.alias_name, str(event.seq), event.kind,
            event.from_state, event.to_state, str(event.step_index + 1 if event.step_index >= 0 else ""), event.actor,
            event.via, event.actor_detail, _csv_safe(event.reason), json.dumps(event.evidence, sort_keys=True),
        ]  # fmt: skip


def _csv_safe(text: str) -> str:
    # A cell starting with = + - @ is a formula to a spreadsheet: reasons are typed by people.
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


@viewer_required
@require_GET
def audit_log_csv(request: HttpRequest) -> StreamingHttpResponse:
    events, _ = _audit_events(request.GET)
    writer = csv.writer(_Echo())
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response = StreamingHttpResponse((writer.writerow(row) for row in _csv_rows(events)), content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="ramp-audit-{stamp}.csv"'
    return response

