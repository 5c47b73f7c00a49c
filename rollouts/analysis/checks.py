"""The checks of one look: per-arm sufficient statistics of the step's window, tested against the plan's
SLOs, guardrails, shadow quality and primary metric (`experiments.stats`), each turned into the JSON the
rollout stores and the pages show. Nothing here decides what the rollout does next (that is `policy`)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from experiments.analysis import ArmSums, arm_summary, arm_sums, shadow_candidate_sums
from experiments.metrics import HIGHER, LOWER, METRICS
from experiments.stats import (
    ArmStats,
    Decision,
    compare,
    guardrail_check,
    mean_slo_check,
    srm_check,
    step_tuning_n,
    tail_slo_check,
)
from experiments.stats.bounded import bounded_mean_n_needed
from rollouts import gates
from rollouts.analysis.look import MIN_SRM_N, MIN_TAIL_N, D, Look, num
from rollouts.models import Rollout
from rollouts.plans import Plan

logger = logging.getLogger(__name__)


def tuning_n_for_step(plan: Plan, step: dict[str, Any]) -> float:
    """N*, where the confidence sequence is narrowest: the plan's, else the step's expected sample at its
    decision."""
    if plan.tuning_n:
        return float(plan.tuning_n)
    share = float(step["weight"]) or float(step["shadow_rate"]) / (1.0 + float(step["shadow_rate"]))
    return step_tuning_n(candidate_share=min(share, 1.0), min_candidate_requests=int(step["min_candidate_requests"]))


def check_alpha_share(plan: Plan) -> float:
    checks = len(plan.slos) + len(plan.guardrails) + (1 if plan.shadow_quality else 0)
    return plan.alpha / max(1, checks * max(1, len(plan.steps)))


def _slo_check(plan: Plan, slo: Any, cand: ArmSums, prices: tuple[float, float], alpha: float, tuning_n: float) -> dict[str, Any]:
    metric = METRICS[slo.metric]
    out: dict[str, Any] = {"type": "slo", "name": slo.label, "metric": slo.metric, "limit": slo.threshold}
    stats = cand.stats_for(metric, threshold=slo.threshold, prices=prices)
    if metric.shape in ("percentile", "proportion"):
        if metric.shape == "percentile":
            share_limit = 1.0 - float(metric.quantile or 0.99)
            bad = stats
        elif slo.op == "<=":
            share_limit, bad = slo.threshold, stats
        else:  # "goodput >= 0.95": the share of requests that are not good stays under 5 %
            share_limit = 1.0 - slo.threshold
            bad = None if stats is None else type(stats).from_counts(stats.n - round(stats.sum), stats.n)
        if bad is None or bad.n < MIN_TAIL_N:
            return {**out, "decision": Decision.UNDECIDED.value, "n": bad.n if bad else 0, "reason": "not enough requests yet"}
        result = tail_slo_check(bad, max_share=share_limit, alpha=alpha, tuning_n=tuning_n)
        estimate, low, high = result.estimate, result.lower_bound, result.upper_bound
        if metric.shape == "proportion" and slo.op == ">=":
            estimate, low, high = 1 - estimate, 1 - high, 1 - low
        return {
            **out, "decision": result.decision.value, "estimate": num(estimate), "low": num(low), "high": num(high),
            "share_limit": num(share_limit), "p": num(result.p_value), "n": result.n,
        }  # fmt: skip
    if stats is None or stats.n < 2:
        return {**out, "decision": Decision.UNDECIDED.value, "n": stats.n if stats else 0, "reason": "not enough requests yet"}
    direction = LOWER if slo.op == "<=" else HIGHER
    mean_result = mean_slo_check(stats, threshold=slo.threshold, direction=direction, alpha=alpha, tuning_n=tuning_n)
    return {
        **out, "decision": mean_result.decision.value, "estimate": num(mean_result.estimate),
        "low": num(mean_result.lower_bound), "high": num(mean_result.upper_bound), "p": num(mean_result.p_value),
        "n": mean_result.n,
    }  # fmt: skip


def _guardrail_check(
    guardrail: Any, base: ArmSums, cand: ArmSums, prices: dict[str, tuple[float, float]], alpha: float, tuning_n: float,
    shadow_step: bool,
) -> dict[str, Any]:  # fmt: skip
    metric = METRICS[guardrail.metric]
    out: dict[str, Any] = {
        "type": "guardrail", "name": guardrail.label, "metric": guardrail.metric, "margin": guardrail.margin,
        "relative": guardrail.relative,
    }  # fmt: skip
    if shadow_step and metric.outcome:
        return {**out, "decision": Decision.UNDECIDED.value, "reason": "no user sees shadow replies, so no outcomes"}
    b = base.stats_for(metric, prices=prices["baseline"])
    c = cand.stats_for(metric, prices=prices["candidate"])
    if b is None or c is None or b.n < 2 or c.n < 2:
        return {
            **out, "decision": Decision.UNDECIDED.value, "n": [b.n if b else 0, c.n if c else 0],
            "reason": "not enough data in an arm",
        }  # fmt: skip
    if guardrail.relative and metric.shape == "mean" and b.mean > 0:
        return {**out, **_relative_mean_guardrail(b, c, guardrail.margin, metric.direction, alpha, tuning_n)}
    result = guardrail_check(
        b, c, kind="proportion" if metric.shape == "proportion" else "mean", margin=guardrail.margin,
        relative=guardrail.relative, direction=metric.direction, alpha=alpha, tuning_n=tuning_n,
    )  # fmt: skip
    return {
        **out, "decision": result.decision.value, "effect": num(result.effect), "low": num(result.lower_bound),
        "high": num(result.bound), "p": num(result.p_value), "n": [result.baseline_n, result.candidate_n],
        "baseline": num(b.mean), "candidate": num(c.mean),
    }  # fmt: skip


def _relative_mean_guardrail(
    b: ArmStats, c: ArmStats, margin: float, direction: str, alpha: float, tuning_n: float
) -> dict[str, Any]:
    """"Candidate at most `margin` worse than the baseline" on a mean, tested as a difference (Fieller's way).

    mean_c <= (1 + m) mean_b is the same hypothesis as mean_c - (1 + m) mean_b <= 0, whose always-valid
    interval is the absolute difference against the baseline's values scaled by (1 + m) ((1 - m) when
    higher is better). The delta method on the ratio instead multiplies the baseline's variance by the
    squared ratio: with a candidate ten times slower and latencies as heavy-tailed as a shared CPU makes
    them, its interval stays wide for a thousand requests, while this one decides in about a hundred.
    The bounds are reported back on the relative scale (the baseline mean taken as known)."""
    scale = 1.0 + margin if direction == LOWER else 1.0 - margin
    scaled = ArmStats(b.n, scale * b.sum, scale * scale * b.sum_squares)
    result = guardrail_check(
        scaled, c, kind="mean", margin=0.0, relative=False, direction=direction, alpha=alpha, tuning_n=tuning_n
    )
    to_relative = 1.0 / b.mean
    ratio = c.mean / b.mean - 1.0
    return {
        "decision": result.decision.value, "effect": num(ratio if direction == LOWER else -ratio),
        "low": num(result.lower_bound * to_relative + margin), "high": num(result.bound * to_relative + margin),
        "p": num(result.p_value), "n": [result.baseline_n, result.candidate_n], "baseline": num(b.mean),
        "candidate": num(c.mean), "test": "difference against the scaled baseline",
    }  # fmt: skip


def _primary_check(plan: Plan, base: ArmSums, cand: ArmSums, prices: dict[str, tuple[float, float]], tuning_n: float) -> dict[str, Any]:
    assert plan.primary_metric is not None
    metric = METRICS[plan.primary_metric.metric]
    out: dict[str, Any] = {
        "type": "primary", "name": f"primary: {metric.name}", "metric": metric.name,
        "difference": plan.primary_metric.difference,
    }  # fmt: skip
    b = base.stats_for(metric, prices=prices["baseline"])
    c = cand.stats_for(metric, prices=prices["candidate"])
    if b is None or c is None or b.n < 2 or c.n < 2:
        return {**out, "decision": "undecided", "reason": "not enough data in an arm"}
    try:
        result = compare(
            b, c, kind="proportion" if metric.shape == "proportion" else "mean",
            difference=plan.primary_metric.difference, method="sequential", alpha=plan.alpha, tuning_n=tuning_n,
        )  # fmt: skip
    except ValueError as exc:
        return {**out, "decision": "undecided", "reason": str(exc)[:200]}
    better = result.effect > 0 if metric.direction == HIGHER else result.effect < 0
    decision = "undecided"
    if result.p_value <= plan.alpha:
        decision = "win" if better else "loss"
    return {
        **out, "decision": decision, "effect": num(result.effect), "low": num(result.ci_low), "high": num(result.ci_high),
        "p": num(result.p_value), "n": [result.baseline_n, result.candidate_n], "baseline": num(result.baseline_estimate),
        "candidate": num(result.candidate_estimate),
    }  # fmt: skip


def _quality_check(plan: Plan, rollout_id: int, alpha: float) -> dict[str, Any]:
    """Shadow quality at this check's share `alpha` of the rollout's alpha: the candidate's mean score
    against the baseline's answers, with always-valid one-sided bounds (each at alpha), against a floor:
    `min_mean`, or the baseline's own score on the scorer (1, or 0.5 for a pairwise judge) less `max_drop`.
    Breach when the upper bound is under the floor, safe when the lower bound is at or over it. The bounds
    never have zero width, so there is no minimum count: a handful of pairs is simply undecided, with an
    estimate of how many more a decision needs."""
    config = plan.shadow_quality
    assert config is not None
    out: dict[str, Any] = {"type": "quality", "name": config.label, "alpha": alpha, "margin": config.max_drop}
    try:
        quality = gates.shadow_quality(rollout_id=rollout_id, alpha=alpha)
    except Exception:
        logger.exception("rollout %s: shadow quality unavailable", rollout_id)
        quality = None
    if quality is None:
        return {**out, "decision": Decision.UNDECIDED.value, "n": 0, "reason": "shadow quality is not available"}
    floor = config.min_mean if config.max_drop is None else quality.reference - config.max_drop
    out.update(limit=num(floor), reference=num(quality.reference), scorer=quality.scorer, n=quality.n,
               method=quality.method, judge_flip_rate=num(quality.judge_flip_rate))
    if not quality.n:
        return {**out, "decision": Decision.UNDECIDED.value, "reason": "no scored shadow pair yet"}
    decision = Decision.UNDECIDED
    if quality.ci_high < floor:
        decision = Decision.BREACH
    elif quality.ci_low >= floor:
        decision = Decision.SAFE
    out.update(decision=decision.value, estimate=num(quality.mean), low=num(quality.ci_low), high=num(quality.ci_high))
    if decision is Decision.UNDECIDED:
        # The side to clear is the one nearer the floor; the sequence must narrow to the gap between the
        # mean and the floor.
        total = bounded_mean_n_needed(mean=quality.mean, sd=quality.sd or 0.0, gap=abs(quality.mean - floor),
                                      alpha=alpha)  # fmt: skip
        out["pairs_needed"] = None if total is None else max(0, total - quality.n)
        out["reason"] = (
            f"{quality.n} scored pairs cannot tell yet"
            + (f"; about {out['pairs_needed']} more would, if the scores keep their mean and spread"
               if total is not None else "; the mean sits on the floor")
        )  # fmt: skip
    return out


def arm_prices(rollout: Rollout) -> dict[str, tuple[float, float]]:
    return {
        "baseline": (float(rollout.baseline.price_input_per_million), float(rollout.baseline.price_output_per_million)),
        "candidate": (float(rollout.candidate.price_input_per_million), float(rollout.candidate.price_output_per_million)),
    }


def step_label(rollout: Rollout) -> str:
    return f"step {rollout.step_index + 1} of {len(rollout.steps)}"


def breach_reason(check: dict[str, Any]) -> str:
    if check["type"] == "guardrail":
        unit = "%" if check["relative"] else ""
        scale = 100 if check["relative"] else 1
        return (
            f"guardrail breached: {check['metric']} is worse than the baseline by {check['effect'] * scale:.3g}{unit} "
            f"(at least {check['low'] * scale:.3g}{unit} with confidence; margin {check['margin'] * scale:.3g}{unit}); "
            f"baseline {check.get('baseline')}, candidate {check.get('candidate')}"
        )
    if check["type"] == "slo":
        return (
            f"SLO breached: {check['name']} (estimate {check.get('estimate')}, "
            f"interval [{check.get('low')}, {check.get('high')}])"
        )
    return f"{check['name']} breached (estimate {check.get('estimate')}, interval [{check.get('low')}, {check.get('high')}])"


def measure(rollout: Rollout, plan: Plan, step: dict[str, Any], window_start: datetime, now: datetime) -> Look:
    thresholds = plan.latency_thresholds
    shadow_step = float(step["weight"]) == 0.0
    sums = arm_sums(rollout_id=rollout.pk, since=window_start, thresholds=thresholds)
    base = sums["baseline"]
    cand = (
        shadow_candidate_sums(rollout_id=rollout.pk, since=window_start, thresholds=thresholds) if shadow_step else sums["candidate"]
    )
    prices = arm_prices(rollout)
    window_s = max((now - window_start).total_seconds(), 1e-3)
    look = Look(decision=D.HOLD, reason="", window_start=window_start)
    look.arms = {
        "baseline": arm_summary(base, window_s=window_s, prices=prices["baseline"]),
        "candidate": {**arm_summary(cand, window_s=window_s, prices=prices["candidate"]), **({"source": "shadow"} if shadow_step else {})},
    }
    alpha = check_alpha_share(plan)
    tuning_n = tuning_n_for_step(plan, step)
    look.checks = [_slo_check(plan, slo, cand, prices["candidate"], alpha, tuning_n) for slo in plan.slos]
    look.checks += [_guardrail_check(g, base, cand, prices, alpha, tuning_n, shadow_step) for g in plan.guardrails]
    if plan.shadow_quality is not None:
        look.checks.append(_quality_check(plan, rollout.pk, alpha))
    if plan.strategy == "ab" and plan.primary_metric is not None:
        look.checks.append(_primary_check(plan, base, cand, prices, tuning_n))
    weight = float(step["weight"])
    if 0.0 < weight < 1.0 and base.requests + cand.requests >= MIN_SRM_N:
        srm = srm_check([base.requests, cand.requests], [1.0 - weight, weight])
        look.srm = {
            "p": num(srm.p_value), "mismatch": srm.mismatch, "counts": [base.requests, cand.requests],
            "expected": [num(e) for e in srm.expected],
        }  # fmt: skip
    return look

