"""The analysis loop: one look at a live rollout, a decision, and its application.

Each look (Celery beat, every ROLLOUT_ANALYSIS_INTERVAL_S) takes a lease on the rollout (compare-and-set,
so two workers do not analyse one rollout at once), reads per-arm sufficient statistics of the current
step's window from SQL aggregates (`experiments.analysis`), tests them with `experiments.stats`, and
decides:

- roll back at once on a breach decided with confidence (an SLO of the candidate, a guardrail against
  the baseline, the shadow quality floor, an A/B loss), or when the candidate has had no ready engine
  for the plan's grace period;
- pause when every baseline engine has been down for the grace period;
- advance when the step's minimum duration and candidate requests are met with no breach and no sample
  ratio mismatch (the next step, an approval, or promotion after the last step);
- promote an A/B test whose primary metric wins, roll back one that loses or reaches its horizon;
- otherwise hold.

The decision is applied through the rollout's services with the version the look read
(`expected_version`): if anything changed the rollout meanwhile (a person, another look), the service
refuses with a Conflict and the look is recorded as not applied. So a look that dies half-way, or two at
once, never apply a decision twice. The look is stored as a compact `RolloutAnalysis` row.

Error control: SLO, guardrail and quality checks share the plan's alpha by Bonferroni over checks and
steps (each step's window starts a new confidence sequence), so the chance that a candidate within every
margin is rolled back at any look of any step is at most alpha.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from config.errors import Conflict, DomainError
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
from rollouts import gates
from rollouts.actors import ANALYSIS
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.plans import Plan, plan_from_stored
from rollouts.services import (
    rollout_advance,
    rollout_analysis_claim,
    rollout_analysis_release,
    rollout_eval_gate_decided,
    rollout_pause,
    rollout_promote,
    rollout_rollback,
)
from serving.selectors import model_version_is_ready

logger = logging.getLogger(__name__)

State = Rollout.State
D = RolloutAnalysis.Decision

# Gateways see a route change within a second; requests in the first seconds of a step may still have
# been split by the previous weights, which would read as a sample ratio mismatch.
ROUTE_SETTLE = timedelta(seconds=2)
# Longer than a look can take; a worker that dies holding it delays the next look by at most this.
LEASE_S = 60.0
MIN_TAIL_N = 10
MIN_SRM_N = 100


@dataclass
class Look:
    decision: str
    reason: str
    window_start: datetime | None = None
    arms: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    srm: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arms": self.arms, "checks": self.checks}
        if self.srm is not None:
            out["srm"] = self.srm
        if self.window_start is not None:
            out["window_start"] = self.window_start.isoformat()
        if self.gate is not None:
            out["eval_gate"] = self.gate
        return out


def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


def _tuning_n(plan: Plan, step: dict[str, Any]) -> float:
    """N*, where the confidence sequence is narrowest: the plan's, else the step's expected sample at its
    decision."""
    if plan.tuning_n:
        return float(plan.tuning_n)
    share = float(step["weight"]) or float(step["shadow_rate"]) / (1.0 + float(step["shadow_rate"]))
    return step_tuning_n(candidate_share=min(share, 1.0), min_candidate_requests=int(step["min_candidate_requests"]))


def _check_alpha(plan: Plan) -> float:
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
            **out, "decision": result.decision.value, "estimate": _num(estimate), "low": _num(low), "high": _num(high),
            "share_limit": _num(share_limit), "p": _num(result.p_value), "n": result.n,
        }  # fmt: skip
    if stats is None or stats.n < 2:
        return {**out, "decision": Decision.UNDECIDED.value, "n": stats.n if stats else 0, "reason": "not enough requests yet"}
    direction = LOWER if slo.op == "<=" else HIGHER
    mean_result = mean_slo_check(stats, threshold=slo.threshold, direction=direction, alpha=alpha, tuning_n=tuning_n)
    return {
        **out, "decision": mean_result.decision.value, "estimate": _num(mean_result.estimate),
        "low": _num(mean_result.lower_bound), "high": _num(mean_result.upper_bound), "p": _num(mean_result.p_value),
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
        **out, "decision": result.decision.value, "effect": _num(result.effect), "low": _num(result.lower_bound),
        "high": _num(result.bound), "p": _num(result.p_value), "n": [result.baseline_n, result.candidate_n],
        "baseline": _num(b.mean), "candidate": _num(c.mean),
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
        "decision": result.decision.value, "effect": _num(ratio if direction == LOWER else -ratio),
        "low": _num(result.lower_bound * to_relative + margin), "high": _num(result.bound * to_relative + margin),
        "p": _num(result.p_value), "n": [result.baseline_n, result.candidate_n], "baseline": _num(b.mean),
        "candidate": _num(c.mean), "test": "difference against the scaled baseline",
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
        **out, "decision": decision, "effect": _num(result.effect), "low": _num(result.ci_low), "high": _num(result.ci_high),
        "p": _num(result.p_value), "n": [result.baseline_n, result.candidate_n], "baseline": _num(result.baseline_estimate),
        "candidate": _num(result.candidate_estimate),
    }  # fmt: skip


def _quality_check(plan: Plan, rollout_id: int) -> dict[str, Any]:
    assert plan.shadow_quality is not None
    floor = plan.shadow_quality.min_mean
    out: dict[str, Any] = {"type": "quality", "name": f"shadow quality >= {floor:g}", "limit": floor}
    try:
        quality = gates.shadow_quality(rollout_id=rollout_id)
    except Exception:
        logger.exception("rollout %s: shadow quality unavailable", rollout_id)
        quality = None
    if quality is None or getattr(quality, "n", 0) < MIN_TAIL_N:
        return {**out, "decision": Decision.UNDECIDED.value, "reason": "not enough scored shadow pairs yet"}
    decision = Decision.UNDECIDED
    if quality.ci_high < floor:
        decision = Decision.BREACH
    elif quality.ci_low >= floor:
        decision = Decision.SAFE
    return {
        **out, "decision": decision.value, "estimate": _num(quality.mean), "low": _num(quality.ci_low),
        "high": _num(quality.ci_high), "n": quality.n, "scorer": getattr(quality, "scorer", ""),
    }  # fmt: skip


def _prices(rollout: Rollout) -> dict[str, tuple[float, float]]:
    return {
        "baseline": (float(rollout.baseline.price_input_per_million), float(rollout.baseline.price_output_per_million)),
        "candidate": (float(rollout.candidate.price_input_per_million), float(rollout.candidate.price_output_per_million)),
    }


def _step_label(rollout: Rollout) -> str:
    return f"step {rollout.step_index + 1} of {len(rollout.steps)}"


def _breach_reason(check: dict[str, Any]) -> str:
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


def _measure(rollout: Rollout, plan: Plan, step: dict[str, Any], window_start: datetime, now: datetime) -> Look:
    thresholds = plan.latency_thresholds
    shadow_step = float(step["weight"]) == 0.0
    sums = arm_sums(rollout_id=rollout.pk, since=window_start, thresholds=thresholds)
    base = sums["baseline"]
    cand = (
        shadow_candidate_sums(rollout_id=rollout.pk, since=window_start, thresholds=thresholds) if shadow_step else sums["candidate"]
    )
    prices = _prices(rollout)
    window_s = max((now - window_start).total_seconds(), 1e-3)
    look = Look(decision=D.HOLD, reason="", window_start=window_start)
    look.arms = {
        "baseline": arm_summary(base, window_s=window_s, prices=prices["baseline"]),
        "candidate": {**arm_summary(cand, window_s=window_s, prices=prices["candidate"]), **({"source": "shadow"} if shadow_step else {})},
    }
    alpha = _check_alpha(plan)
    tuning_n = _tuning_n(plan, step)
    look.checks = [_slo_check(plan, slo, cand, prices["candidate"], alpha, tuning_n) for slo in plan.slos]
    look.checks += [_guardrail_check(g, base, cand, prices, alpha, tuning_n, shadow_step) for g in plan.guardrails]
    if plan.shadow_quality is not None:
        look.checks.append(_quality_check(plan, rollout.pk))
    if plan.strategy == "ab" and plan.primary_metric is not None:
        look.checks.append(_primary_check(plan, base, cand, prices, tuning_n))
    weight = float(step["weight"])
    if 0.0 < weight < 1.0 and base.requests + cand.requests >= MIN_SRM_N:
        srm = srm_check([base.requests, cand.requests], [1.0 - weight, weight])
        look.srm = {
            "p": _num(srm.p_value), "mismatch": srm.mismatch, "counts": [base.requests, cand.requests],
            "expected": [_num(e) for e in srm.expected],
        }  # fmt: skip
    return look


def _decide_traffic(rollout: Rollout, plan: Plan, now: datetime) -> Look:
    step = rollout.current_step
    if step is None:
        return Look(D.HOLD, "waiting for the approval of the first step")
    window_start = (rollout.step_started_at or now) + ROUTE_SETTLE
    if window_start > now:
        return Look(D.HOLD, "the step has just started", window_start=window_start)
    look = _measure(rollout, plan, step, window_start, now)
    breaches = [c for c in look.checks if c["decision"] == Decision.BREACH.value]
    if breaches:
        look.decision, look.reason = D.ROLLBACK, _breach_reason(breaches[0])
        return look
    elapsed = (now - (rollout.step_started_at or now)).total_seconds()
    cand_n = int(look.arms["candidate"]["n"])
    need_s, need_n = int(step["min_duration_s"]), int(step["min_candidate_requests"])
    minimums_met = elapsed >= need_s and cand_n >= need_n
    srm_bad = bool(look.srm and look.srm["mismatch"])
    if plan.strategy == "ab":
        primary = next((c for c in look.checks if c["type"] == "primary"), None)
        horizon = plan.ab_horizon_s or 0
        # A paused test still rolls back on a loss (stopping harm), but is not promoted behind people's backs.
        if primary and minimums_met and not srm_bad and primary["decision"] == "win" and rollout.state == State.RUNNING:
            look.decision, look.reason = D.PROMOTE, f"the candidate wins on {primary['metric']} (effect {primary['effect']}, p {primary['p']})"
        elif primary and minimums_met and primary["decision"] == "loss":
            look.decision, look.reason = D.ROLLBACK, f"the candidate loses on {primary['metric']} (effect {primary['effect']}, p {primary['p']})"
        elif horizon and elapsed >= horizon:
            look.decision, look.reason = D.ROLLBACK, f"the horizon ({horizon} s) passed without a decision: the baseline stays"
        else:
            look.decision, look.reason = D.HOLD, "the primary metric is undecided" if minimums_met else _progress(elapsed, need_s, cand_n, need_n)
        if srm_bad and look.decision == D.HOLD:
            look.reason = f"sample ratio mismatch (p {look.srm['p']}): the split is not what was configured"  # type: ignore[index]
        return look
    if rollout.state != State.RUNNING:
        look.reason = "paused" if rollout.state == State.PAUSED else "waiting for an approval"
        return look
    if not minimums_met:
        look.reason = f"{_step_label(rollout)}: {_progress(elapsed, need_s, cand_n, need_n)}"
        return look
    if srm_bad:
        look.reason = (
            f"sample ratio mismatch (p {look.srm['p']}): arms got {look.srm['counts']} requests, "  # type: ignore[index]
            f"expected about {look.srm['expected']}; not advancing on a broken split"  # type: ignore[index]
        )
        return look
    look.decision, look.reason = _advance_label(rollout)
    return look


def _progress(elapsed: float, need_s: int, n: int, need_n: int) -> str:
    return f"{min(n, need_n)}/{need_n} candidate requests, {min(int(elapsed), need_s)}/{need_s} s"


def _advance_label(rollout: Rollout) -> tuple[str, str]:
    steps = rollout.steps
    nxt = rollout.step_index + 1
    if nxt < len(steps):
        if steps[nxt]["requires_approval"]:
            return D.AWAIT_APPROVAL, f"{_step_label(rollout)} passed; step {nxt + 1} needs an approval"
        return D.ADVANCE, f"{_step_label(rollout)} passed with no breach: on to {float(steps[nxt]['weight']):.0%}"
    if rollout.plan.get("promotion_requires_approval"):
        return D.AWAIT_APPROVAL, f"{_step_label(rollout)} passed; promotion needs an approval"
    return D.PROMOTE, f"the last step passed with no breach: promoting {rollout.candidate.label}"


def _decide_gate(rollout: Rollout) -> Look:
    if rollout.state == State.PAUSED:
        return Look(D.HOLD, "paused during the eval gate")
    result = gates.eval_gate_result(rollout_id=rollout.pk)
    if result is None:
        # The start on commit may have been lost (a crash, the evals app down): ask again; it is idempotent.
        gates.eval_gate_start_safely(
            rollout_id=rollout.pk, baseline=rollout.baseline, candidate=rollout.candidate, spec=rollout.plan.get("eval_gate") or {}
        )
        return Look(D.HOLD, "waiting for the eval gate to start")
    gate = {"status": result.status, "reason": result.reason, "evidence": result.evidence}
    if result.status == "passed":
        return Look(D.GATE_PASSED, f"eval gate passed: {result.reason}", gate=gate)
    if result.status == "failed":
        return Look(D.GATE_FAILED, f"eval gate failed: {result.reason}", gate=gate)
    if result.status == "error":
        return Look(D.PAUSE, f"eval gate error: {result.reason}", gate=gate)
    return Look(D.HOLD, f"eval gate {result.status}: {result.reason}" if result.reason else "eval gate running", gate=gate)


def _decide_engines(rollout: Rollout, plan: Plan, now: datetime) -> tuple[Look | None, dict[str, datetime | None]]:
    """Engine readiness, with the plan's grace period: a candidate without engines rolls back, a baseline
    without engines pauses (its users have nowhere to go but the candidate, which is not a verdict)."""
    grace = timedelta(seconds=plan.engine_grace_s)
    candidate_ready = model_version_is_ready(model_version=rollout.candidate)
    baseline_ready = model_version_is_ready(model_version=rollout.baseline)
    since = {
        "candidate_unready_since": None if candidate_ready else (rollout.candidate_unready_since or now),
        "baseline_unready_since": None if baseline_ready else (rollout.baseline_unready_since or now),
    }
    cand_since, base_since = since["candidate_unready_since"], since["baseline_unready_since"]
    if cand_since is not None and now - cand_since >= grace:
        return Look(
            D.ROLLBACK,
            f"the candidate {rollout.candidate.label} has had no ready engine for {int((now - cand_since).total_seconds())} s",
        ), since
    if base_since is not None and now - base_since >= grace and rollout.state != State.PAUSED:
        return Look(
            D.PAUSE,
            f"every engine of the baseline {rollout.baseline.label} has been down for {int((now - base_since).total_seconds())} s",
        ), since
    return None, since


def rollout_look(*, rollout: Rollout, now: datetime | None = None) -> tuple[Look, dict[str, datetime | None]]:
    """Measure and decide, without applying anything."""
    now = now or timezone.now()
    plan = plan_from_stored(rollout.plan)
    engine_look, readiness = _decide_engines(rollout, plan, now)
    if engine_look is not None:
        return engine_look, readiness
    if rollout.state == State.GATING or (rollout.state == State.PAUSED and rollout.paused_from == State.GATING):
        return _decide_gate(rollout), readiness
    return _decide_traffic(rollout, plan, now), readiness


def _apply(rollout: Rollout, look: Look) -> bool:
    """Apply the look's decision if the rollout is still at the version it read. True when applied."""
    version = rollout.version
    evidence = look.evidence()
    common: dict[str, Any] = {"rollout": rollout.pk, "actor": ANALYSIS, "reason": look.reason, "expected_version": version}
    if look.decision == D.HOLD:
        return False
    if look.decision == D.ROLLBACK:
        rollout_rollback(**common, evidence=evidence)
    elif look.decision in (D.ADVANCE, D.AWAIT_APPROVAL) or (look.decision == D.PROMOTE and rollout.strategy != "ab"):
        rollout_advance(**common, evidence=evidence)
    elif look.decision == D.PROMOTE:
        rollout_promote(**common, evidence=evidence)
    elif look.decision == D.PAUSE:
        rollout_pause(**common, evidence=evidence)
    elif look.decision in (D.GATE_PASSED, D.GATE_FAILED):
        rollout_eval_gate_decided(
            rollout=rollout.pk, passed=look.decision == D.GATE_PASSED, reason=look.reason, evidence=evidence,
            expected_version=version,
        )  # fmt: skip
    return True


def rollout_analyse(*, rollout_id: int, now: datetime | None = None) -> RolloutAnalysis | None:
    """One look at one rollout: measure, decide, apply (at most once), record. None when skipped
    (another worker holds the lease, the rollout is gone or not live)."""
    if not rollout_analysis_claim(rollout_id=rollout_id, lease_s=LEASE_S):
        return None
    readiness: dict[str, datetime | None] | None = None
    try:
        rollout = Rollout.objects.select_related("baseline", "candidate").filter(pk=rollout_id).first()
        if rollout is None or rollout.state not in Rollout.ANALYSED_STATES:
            return None
        look, readiness = rollout_look(rollout=rollout, now=now)
        with transaction.atomic():
            try:
                applied = _apply(rollout, look)
            except Conflict as exc:
                # Another look or a person got there first: this decision was made on stale data.
                applied = False
                look.reason = f"{look.reason} (not applied: {exc.message})"[:500]
            except DomainError as exc:
                applied = False
                look.reason = f"{look.reason} (not applied: {exc.message})"[:500]
            return RolloutAnalysis.objects.create(
                rollout_id=rollout.pk,
                rollout_version=rollout.version,
                state=rollout.state,
                step_index=rollout.step_index,
                window_start=look.window_start,
                decision=look.decision,
                reason=look.reason[:500],
                applied=applied,
                arms=look.arms,
                checks=look.checks,
                srm=look.srm,
            )
    finally:
        rollout_analysis_release(rollout_id=rollout_id, readiness=readiness)


def rollout_evidence(*, rollout_id: int) -> dict[str, Any]:
    """Per-arm statistics of the current step's window now, and the latest look's checks: what a person's
    transition records as its evidence."""
    rollout = Rollout.objects.select_related("baseline", "candidate").filter(pk=rollout_id).first()
    if rollout is None or rollout.started_at is None:
        return {}
    now = timezone.now()
    since = rollout.step_started_at or rollout.started_at
    sums = arm_sums(rollout_id=rollout.pk, since=since, percentiles=False)
    prices = _prices(rollout)
    window_s = max((now - since).total_seconds(), 1e-3)
    evidence: dict[str, Any] = {
        "window_start": since.isoformat(),
        "arms": {arm: arm_summary(s, window_s=window_s, prices=prices[arm]) for arm, s in sums.items()},
    }
    latest = RolloutAnalysis.objects.filter(rollout_id=rollout.pk).order_by("-created_at", "-id").first()
    if latest is not None:
        evidence["latest_analysis"] = {
            "at": latest.created_at.isoformat(), "decision": latest.decision, "reason": latest.reason,
            "checks": latest.checks, "srm": latest.srm,
        }  # fmt: skip
    return evidence


def analysis_interval_s() -> float:
    return float(settings.ROLLOUT_ANALYSIS_INTERVAL_S)
