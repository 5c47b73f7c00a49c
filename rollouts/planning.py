"""How many requests each step of a plan needs, shown before a rollout starts.

Per step and per check (each guardrail, and an A/B's primary metric with a min_effect), the samples per
arm a fixed-horizon test needs to detect a harm the size of the margin with 80 % power
(`experiments.stats.sample_size_per_arm`, statsmodels' power solvers), from what the baseline has
served on the alias in the last hour (mean, spread, error rate), or stated assumptions when it served
nothing. The always-valid test the analysis runs needs more than this at the same power (roughly 1.5x
to 2x); the figure is a floor for `min_candidate_requests` and, with the alias's request rate, a rough
duration."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.utils import timezone

from experiments.analysis import alias_history
from experiments.metrics import METRICS
from experiments.stats import sample_size_per_arm
from rollouts.plans import Plan
from serving.models import ModelVersion

HISTORY = timedelta(hours=1)
ASSUMED_CV = 0.5  # spread of a latency when nothing was measured: sd = half the mean
ASSUMED_ERROR_RATE = 0.01
POWER = 0.8


def _check_need(
    *, metric_name: str, margin: float, relative: bool, ratio: float, alpha: float, history: Any
) -> dict[str, Any]:
    metric = METRICS[metric_name]
    stats = history.stats_for(metric) if history is not None else None
    assumed: dict[str, Any] = {}
    try:
        if metric.shape == "proportion":
            rate = stats.mean if stats is not None and stats.n >= 30 else None
            if rate is None or not 0 < rate < 1:
                rate = ASSUMED_ERROR_RATE if metric.direction == "lower_is_better" else 0.5
                assumed["baseline_rate"] = rate
            effect = margin if metric.direction == "lower_is_better" else -margin
            if relative:
                effect = effect * rate
            plan = sample_size_per_arm(
                kind="proportion", baseline_mean=rate, min_effect=effect, relative=False, alpha=alpha, power=POWER,
                ratio=ratio, alternative="larger" if effect > 0 else "smaller",
            )  # fmt: skip
        else:
            if stats is not None and stats.n >= 30 and stats.mean > 0 and stats.variance > 0:
                mean, sd = stats.mean, math.sqrt(stats.variance)
            else:
                mean, sd = 1.0, ASSUMED_CV
                assumed["coefficient_of_variation"] = ASSUMED_CV
            plan = sample_size_per_arm(
                kind="mean", baseline_mean=mean, min_effect=margin, relative=relative, baseline_sd=sd,
                alpha=alpha, power=POWER, ratio=ratio, alternative="larger",
            )  # fmt: skip
    except ValueError as exc:
        return {"metric": metric_name, "error": str(exc)}
    return {"metric": metric_name, "baseline_n": plan.baseline_n, "candidate_n": plan.candidate_n, "assumed": assumed}


def plan_sample_sizes(*, plan: Plan, baseline: ModelVersion | None) -> dict[str, Any]:
    """{"history": what the estimate rests on, "steps": [{step, weight, checks, candidate_n, ...}]}."""
    history, rate = (None, 0.0)
    if baseline is not None:
        sums, rate = alias_history(alias=plan.alias, model_version_id=baseline.pk, since=timezone.now() - HISTORY)
        history = sums if sums.requests else None
    checks_n = max(1, len(plan.guardrails) + len(plan.slos))
    alpha = plan.alpha / (checks_n * max(1, len(plan.steps)))
    steps = []
    for index, step in enumerate(plan.steps):
        share = step.weight if step.weight > 0 else step.shadow_rate / (1.0 + step.shadow_rate)
        entry: dict[str, Any] = {"step": index, "weight": step.weight, "shadow_rate": step.shadow_rate, "checks": []}
        if not 0 < share < 1:
            entry["note"] = "all traffic on the candidate: only its SLOs are judged, no comparison with the baseline"
            steps.append(entry)
            continue
        ratio = share / (1.0 - share)
        for guardrail in plan.guardrails:
            if guardrail.margin <= 0:
                continue
            need = _check_need(
                metric_name=guardrail.metric, margin=guardrail.margin, relative=guardrail.relative, ratio=ratio,
                alpha=alpha, history=history,
            )
            entry["checks"].append({"check": guardrail.label, **need})
        primary = plan.primary_metric
        if primary is not None and primary.min_effect:
            need = _check_need(
                metric_name=primary.metric, margin=abs(primary.min_effect), relative=primary.difference == "relative",
                ratio=ratio, alpha=plan.alpha, history=history,
            )
            entry["checks"].append({"check": f"primary: {primary.metric}", **need})
        needs = [c["candidate_n"] for c in entry["checks"] if "candidate_n" in c]
        entry["candidate_n"] = max(needs) if needs else None
        entry["min_candidate_requests"] = step.min_candidate_requests
        if needs and rate > 0:
            entry["expected_duration_s"] = round(max(needs) / (rate * share))
        steps.append(entry)
    basis = {
        "window_s": int(HISTORY.total_seconds()),
        "baseline_requests": history.requests if history is not None else 0,
        "alias_requests_per_s": round(rate, 3),
        "power": POWER,
        "note": "fixed-horizon power at the margin; the always-valid test needs roughly 1.5x to 2x more",
    }
    return {"basis": basis, "steps": steps}
