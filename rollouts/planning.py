"""How many candidate requests each step of a plan needs, shown before a rollout starts.

Per step and per check, the candidate requests at which the rollout's own always-valid bound (at the
check's share of the alpha split, with the rollout's N*) shows the check met with 80 % power when the
candidate is as good as the baseline (`experiments.stats.sequential_sample_size`): the sample a step needs
to advance on evidence. Spreads and rates come from what the baseline served on the alias in the last hour,
over its sessions (so a session's correlated requests count as the information they carry), or from stated
assumptions when it served nothing. The step's figure is the largest of its checks', and never below the
smallest sample at which its checks can decide at all (`analysis.checks.step_min_sample`). With evidence
carried across steps, a later comparing step usually decides sooner than its figure says.

`step_planned_sample` gives one step's figure: what the policy compares the step's candidate requests with
before applying the plan's `on_inconclusive`."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.utils import timezone

from experiments.analysis import ArmSums, alias_history
from experiments.metrics import LOWER, METRICS
from experiments.stats import (
    RatioStats,
    design_effect,
    ratio_estimate,
    sequential_one_arm_size,
    sequential_sample_size,
)
from rollouts.analysis.checks import (
    check_alpha_share,
    guardrail_tuning_n,
    slo_tuning_n,
    step_min_sample,
    tail_guardrail_need,
)
from rollouts.plans import Plan
from serving.models import ModelVersion

HISTORY = timedelta(hours=1)
ASSUMED_LOG_SD = 0.5  # spread of a log latency when nothing was measured (a coefficient of variation near 0.5)
ASSUMED_CV = 0.5
ASSUMED_ERROR_RATE = 0.01
POWER = 0.8
MIN_HISTORY_SESSIONS = 30


def _measured(history: ArmSums | None, metric_name: str, threshold: float | None = None) -> RatioStats | None:
    if history is None:
        return None
    stats = history.ratio_for(metric_name, threshold=threshold)
    if stats is None or stats.units < MIN_HISTORY_SESSIONS or stats.den <= 0:
        return None
    return stats


def _per_request(stats: RatioStats) -> tuple[float, float]:
    """(mean, variance per request with the sessions' clustering in it)."""
    est = ratio_estimate(stats)
    return est.mean, est.standard_error_squared * stats.den


def _guardrail_need(guardrail: Any, share: float, alpha: float, tuning_n: float, history: ArmSums | None) -> dict[str, Any]:
    metric = METRICS[guardrail.metric]
    if metric.shape == "percentile":
        return tail_guardrail_need(guardrail, share=share, alpha=alpha, tuning_n=tuning_n, history=history)
    stats = _measured(history, guardrail.metric)
    assumed: dict[str, Any] = {}
    if metric.shape == "proportion":
        if stats is not None:
            rate, variance = _per_request(stats)
        else:
            rate = ASSUMED_ERROR_RATE if metric.direction == LOWER else 0.5
            variance = rate * (1.0 - rate)
            assumed["baseline_rate"] = rate
        gap = guardrail.margin * rate if guardrail.relative else guardrail.margin
        vb = vc = max(variance, rate * (1.0 - rate))
    elif metric.shape == "gmean":
        if stats is not None:
            _, variance = _per_request(stats)
        else:
            variance = ASSUMED_LOG_SD**2
            assumed["log_sd"] = ASSUMED_LOG_SD
        gap = math.log1p(guardrail.margin) if metric.direction == LOWER else -math.log1p(-guardrail.margin)
        vb = vc = variance
    else:
        if stats is not None:
            mean, variance = _per_request(stats)
        else:
            mean, variance = 1.0, ASSUMED_CV**2
            assumed["coefficient_of_variation"] = ASSUMED_CV
        if guardrail.relative:
            # The test is candidate - (1 + m) baseline <= 0 (rollouts.analysis.checks): the baseline's
            # variance scaled with it, the gap m times the mean.
            factor = 1.0 + guardrail.margin if metric.direction == LOWER else 1.0 - guardrail.margin
            gap, vb, vc = guardrail.margin * abs(mean), factor * factor * variance, variance
        else:
            gap, vb, vc = guardrail.margin, variance, variance
    if gap <= 0:
        return {"metric": guardrail.metric, "error": "a margin of 0 cannot be shown"}
    n = sequential_sample_size(
        variance_baseline=vb, variance_candidate=vc, gap=gap, candidate_share=share, alpha=alpha, tuning_n=tuning_n,
        power=POWER,
    )  # fmt: skip
    return {"metric": guardrail.metric, "candidate_n": n, "assumed": assumed}


def _slo_need(slo: Any, alpha: float, tuning_n: float, history: ArmSums | None) -> dict[str, Any]:
    metric = METRICS[slo.metric]
    assumed: dict[str, Any] = {}
    if metric.shape in ("percentile", "proportion"):
        if metric.shape == "percentile":
            limit = 1.0 - float(metric.quantile or 0.99)
            stats = _measured(history, slo.metric, threshold=slo.threshold)
        else:
            limit = slo.threshold if slo.op == "<=" else 1.0 - slo.threshold
            stats = _measured(history, slo.metric)
        deff = 1.0
        if stats is not None:
            share, _ = _per_request(stats)
            share = share if slo.op == "<=" or metric.shape == "percentile" else 1.0 - share
            deff = design_effect(stats)
        else:
            share = limit / 2.0
            assumed["share"] = share
        if share >= limit:
            return {"metric": slo.metric, "error": f"the baseline's share ({share:.3g}) is not within the limit"}
        n = sequential_one_arm_size(variance=share * (1.0 - share) * deff, gap=limit - share, alpha=alpha, tuning_n=tuning_n, power=POWER)
        return {"metric": slo.metric, "candidate_n": n, "assumed": assumed}
    stats = _measured(history, slo.metric)
    log = metric.shape == "gmean"
    if stats is not None:
        mean, variance = _per_request(stats)
    else:
        return {"metric": slo.metric, "error": "no history on the alias to plan a limit on a mean from"}
    limit = math.log(slo.threshold) if log else slo.threshold
    gap = (limit - mean) if slo.op == "<=" else (mean - limit)
    if gap <= 0:
        return {"metric": slo.metric, "error": "the baseline itself is not within the limit"}
    n = sequential_one_arm_size(variance=variance, gap=gap, alpha=alpha, tuning_n=tuning_n, power=POWER)
    return {"metric": slo.metric, "candidate_n": n, "assumed": assumed}


def _history(plan: Plan, baseline: ModelVersion | None) -> tuple[ArmSums | None, float]:
    if baseline is None:
        return None, 0.0
    sums, rate = alias_history(
        alias=plan.alias, model_version_id=baseline.pk, since=timezone.now() - HISTORY, thresholds=plan.latency_thresholds
    )
    return (sums if sums.requests else None), rate


def _step_entry(plan: Plan, index: int, history: ArmSums | None, rate: float) -> dict[str, Any]:
    step = plan.steps[index]
    alpha = check_alpha_share(plan)
    share = step.weight if step.weight > 0 else step.shadow_rate / (1.0 + step.shadow_rate)
    entry: dict[str, Any] = {"step": index, "weight": step.weight, "shadow_rate": step.shadow_rate, "checks": []}
    for slo in plan.slos:
        entry["checks"].append({"check": slo.label, **_slo_need(slo, alpha, slo_tuning_n(plan, slo), history)})
    if 0 < share < 1:
        for guardrail in plan.guardrails:
            need = _guardrail_need(guardrail, share, alpha, guardrail_tuning_n(plan, guardrail), history)
            entry["checks"].append({"check": guardrail.label, **need})
    else:
        entry["note"] = "no comparison with the baseline at this split: only the candidate's SLOs are judged here"
    floor = step_min_sample(plan, index)
    needs = [c["candidate_n"] for c in entry["checks"] if "candidate_n" in c]
    entry["min_n"] = floor
    entry["candidate_n"] = max([*needs, floor]) if needs else (floor or None)
    entry["min_candidate_requests"] = step.min_candidate_requests
    if entry["candidate_n"] and rate > 0 and share > 0:
        entry["expected_duration_s"] = round(entry["candidate_n"] / (rate * share))
    return entry


def plan_sample_sizes(*, plan: Plan, baseline: ModelVersion | None) -> dict[str, Any]:
    """{"basis": what the estimate rests on, "steps": [{step, weight, checks, candidate_n, min_n, ...}]}."""
    history, rate = _history(plan, baseline)
    steps = [_step_entry(plan, index, history, rate) for index in range(len(plan.steps))]
    basis = {
        "window_s": int(HISTORY.total_seconds()),
        "baseline_requests": history.requests if history is not None else 0,
        "baseline_sessions": history.sessions if history is not None else 0,
        "alias_requests_per_s": round(rate, 3),
        "power": POWER,
        "alpha_share": check_alpha_share(plan),
        "note": "requests at which the rollout's always-valid bounds show each check met when the candidate is as "
                "good as the baseline",
    }  # fmt: skip
    return {"basis": basis, "steps": steps}


def step_planned_sample(*, plan: Plan, baseline: ModelVersion | None, step_index: int) -> int | None:
    """The candidate requests step `step_index` is planned to need (`plan_sample_sizes`' figure for it)."""
    history, rate = _history(plan, baseline)
    value = _step_entry(plan, step_index, history, rate).get("candidate_n")
    return int(value) if value is not None else None
