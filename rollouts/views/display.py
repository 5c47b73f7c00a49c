"""How the rollout pages show numbers, checks, events and rollouts: pure shaping for the templates."""

from __future__ import annotations

import math
from typing import Any

import yaml
from django.contrib.auth.models import User
from django.http import Http404, HttpRequest

from config.errors import NotFound
from experiments.metrics import METRICS
from rollouts import selectors
from rollouts.actors import Actor
from rollouts.capacity import rollout_replicas
from rollouts.models import Rollout, RolloutAnalysis, RolloutEvent

State = Rollout.State
POLL_S = 2.0
TIMELINE_EVIDENCE_ARMS = (
    "n",
    "rps",
    "error_rate",
    "goodput",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_gmean_ms",
    "tpot_mean_ms",
    "e2e_p99_ms",
)
# Percentiles come from the looks' DDSketches (experiments.rollups): each within 1 % of the nearest-rank value.
ARM_FIELDS: dict[str, tuple[str, str]] = {
    "n": ("requests", "count"),
    "rps": ("requests / s", "rate"),
    "error_rate": ("error rate", "share"),
    "goodput": ("goodput", "share"),
    "ttft_p50_ms": ("TTFT p50 (±1 %)", "ms"),
    "ttft_p99_ms": ("TTFT p99 (±1 %)", "ms"),
    "ttft_mean_ms": ("TTFT mean", "ms"),
    "tpot_mean_ms": ("TPOT mean", "ms"),
    "tpot_gmean_ms": ("TPOT geometric mean", "ms"),
    "ttft_gmean_ms": ("TTFT geometric mean", "ms"),
    "e2e_gmean_ms": ("end-to-end geometric mean", "ms"),
    "sessions": ("sessions", "count"),
    "tpot_p99_ms": ("TPOT p99 (±1 %)", "ms"),
    "e2e_p50_ms": ("end-to-end p50 (±1 %)", "ms"),
    "e2e_p99_ms": ("end-to-end p99 (±1 %)", "ms"),
    "cost_per_request": ("cost / request", "number"),
    "completion_tokens_mean": ("completion tokens", "number"),
}


def finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


NBSP = "\u00a0"  # a number and its unit stay on one line
MISSING = "\u2013"  # an en dash where there is no number yet


def fmt(value: Any, kind: str, *, signed: bool = False) -> str:
    """A number in its unit: "123 ms", "0.42 %", "+3.1 %", "12.5/s", "1 234"."""
    number = finite(value)
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
        return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h" if seconds % 3600 == 0 else f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


# What a guardrail's regression adjustment used (experiments.stats.clustered), as the page says it. A look
# stored before the history covariate has no list: the prompt's length was all it had.
COVARIATE_WORDS = {"cov": "prompt length", "pre": "the sessions' requests before the rollout"}
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
        number = finite(value)
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
        meaning = (
            "how much worse the candidate's geometric mean is (positive = worse)"
            if check.get("scale") == "log"
            else "how much worse the candidate is (positive = worse)"
        )
    elif kind == "primary":
        threshold_text = "no difference at 0"
        meaning = "candidate minus baseline"
    elif kind == "slo":
        threshold_text = f"limit {_fmt_scaled(threshold, vk)}"
        meaning = (
            "share of requests over the latency limit"
            if numbers["unit"] == "% over limit"
            else "the candidate's value"
        )
    else:
        threshold_text = f"at least {_fmt_scaled(threshold, vk)}"
        meaning = "mean score of the candidate's shadow answers"
    explain = _explain_check(kind, decision, low, high, threshold, vk, check)
    n = check.get("n")
    sessions = check.get("sessions")
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
        "alpha": f"{check['alpha']:.3g}" if finite(check.get("alpha")) is not None else None,
        # A guardrail's breach side, where it differs (half its share beside its check on the bake alone).
        "breach_alpha": f"{check['breach_alpha']:.3g}"
        if finite(check.get("breach_alpha")) is not None and check.get("breach_alpha") != check.get("alpha") else None,
        "sessions": " / ".join(fmt(x, "count") for x in sessions) if isinstance(sessions, list) else fmt(sessions, "count") if sessions is not None else "",
        "more_n": check.get("more_n") if decision == "undecided" else None,
        "holds": bool(check.get("holds")),
        "more_unit": check.get("more_unit") or "candidate requests",
        "min_n": check.get("min_n"),
        "variance_reduction": round(100.0 * float(check["variance_reduction"]), 1) if finite(check.get("variance_reduction")) else None,
        "adjusted_on": " and ".join(COVARIATE_WORDS[c] for c in check.get("covariates") or ["cov"] if c in COVARIATE_WORDS),
        "steps": ", ".join(str(i + 1) for i in check.get("steps") or []),
    }  # fmt: skip


def _explain_check(
    kind: str,
    decision: str,
    low: float | None,
    high: float | None,
    threshold: float | None,
    vk: str,
    check: dict[str, Any],
) -> str:
    """One sentence on why the check reads as it does."""
    if low is None or high is None:
        return str(check.get("reason") or "not enough data yet")
    lo, hi, th = (
        _fmt_scaled(low, vk, signed=True),
        _fmt_scaled(high, vk, signed=True),
        _fmt_scaled(threshold, vk),
    )
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


def _interval_bar(
    low: float | None, high: float | None, centre: float | None, threshold: float | None
) -> dict[str, float] | None:
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
        rows.append(
            {"label": label, "baseline": fmt(base.get(key), kind), "candidate": fmt(cand.get(key), kind)}
        )
    return rows


def percent(weight: float) -> str:
    return f"{weight * 100:g} %"


def rollout_summary(rollout: Rollout, analysis: RolloutAnalysis | None = None) -> dict[str, Any]:
    """What the dashboard and the detail header show about one rollout."""
    steps = rollout.steps
    weights = selectors.rollout_weights(rollout=rollout)
    # A look that judged no traffic (the eval gate's) says nothing about the SLOs yet.
    health = selectors.rollout_health(analysis=analysis if analysis is None or analysis.checks else None)
    if rollout.state == State.ROLLED_BACK:
        health = {**health, "status": "red", "driver": health.get("driver") or "rolled back"}
    step = rollout.current_step
    progress = selectors.rollout_progress(rollout=rollout, analysis=analysis)
    if progress["bake"] is not None:
        progress["bake"]["ends_at_dt"] = rollout.bake_ends_at
        progress["bake"]["holdout_pct"] = percent(rollout.holdout)
        progress["bake"]["candidate_pct"] = percent(1.0 - rollout.holdout)
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
        "replicas": rollout_replicas(rollout=rollout),
        "progress": progress,
        "holding": selectors.rollout_holding_text(progress),
    }  # fmt: skip


EVENT_STATUS = {
    "rolled_back": "red", "eval_gate_failed": "red", "aborted": "red",
    "promoted": "green", "eval_gate_passed": "green", "approved": "green", "step_started": "green", "started": "green",
    "approval_added": "green", "awaiting_approval": "amber", "paused": "amber", "gating": "amber",
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


def estimate_view(estimates: dict[str, Any]) -> dict[str, Any]:
    basis = estimates.get("basis") or {}
    steps = []
    for entry in estimates.get("steps") or []:
        need = entry.get("candidate_n")
        minimum = entry.get("min_candidate_requests")
        steps.append({
            "number": entry["step"] + 1, "weight": percent(entry["weight"]), "shadow": percent(entry.get("shadow_rate") or 0.0),
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


def plan_yaml(plan: dict[str, Any]) -> str:
    return yaml.safe_dump(plan, sort_keys=False, default_flow_style=False, allow_unicode=True)


def rollout_or_404(rollout_id: int) -> Rollout:
    try:
        return selectors.rollout_get(rollout_id=rollout_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


def ui_actor(request: HttpRequest) -> Actor:
    assert isinstance(request.user, User)  # the views that act require a signed-in user
    return Actor.of(request.user, via="ui")
