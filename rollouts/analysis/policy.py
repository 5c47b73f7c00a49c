"""The policy of one look: from the checks, the engines' readiness and the rollout's state to a decision
(hold, advance, ask for approval, promote, pause, roll back, decide the eval gate). Nothing is applied here."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone

from experiments.stats import Decision
from rollouts import capacity, gates
from rollouts.analysis.checks import breach_reason, measure, step_label
from rollouts.analysis.look import ROUTE_SETTLE, D, Look, State
from rollouts.models import Rollout
from rollouts.plans import Plan, plan_from_stored
from rollouts.plans.alpha import check_alpha_share
from serving.selectors import model_version_is_ready


def _decide_traffic(rollout: Rollout, plan: Plan, now: datetime) -> Look:
    step = rollout.current_step
    if step is None:
        return Look(D.HOLD, "waiting for the approval of the first step")
    # Under a GPU budget the step's traffic moves once its replicas are ready: judged from then on.
    traffic_since, waiting = capacity.rollout_step_clock(rollout=rollout, now=now)
    if waiting is not None:
        return Look(D.HOLD, waiting)
    window_start = traffic_since + ROUTE_SETTLE
    if window_start > now:
        return Look(D.HOLD, "the step has just started", window_start=window_start)
    look = measure(rollout, plan, step, window_start, now)
    breaches = [c for c in look.checks if c["decision"] == Decision.BREACH.value]
    if breaches:
        look.decision, look.reason = D.ROLLBACK, breach_reason(breaches[0])
        return look
    elapsed = (now - traffic_since).total_seconds()
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
        look.reason = f"{step_label(rollout)}: {_progress(elapsed, need_s, cand_n, need_n)}"
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
            return D.AWAIT_APPROVAL, f"{step_label(rollout)} passed; step {nxt + 1} needs an approval"
        return D.ADVANCE, f"{step_label(rollout)} passed with no breach: on to {float(steps[nxt]['weight']):.0%}"
    if rollout.plan.get("promotion_requires_approval"):
        return D.AWAIT_APPROVAL, f"{step_label(rollout)} passed; promotion needs an approval"
    return D.PROMOTE, f"the last step passed with no breach: promoting {rollout.candidate.label}"


def _decide_gate(rollout: Rollout) -> Look:
    if rollout.state == State.PAUSED:
        return Look(D.HOLD, "paused during the eval gate")
    result = gates.eval_gate_result(rollout_id=rollout.pk)
    if result is None:
        # The start on commit may have been lost (a crash, the evals app down): ask again; it is idempotent.
        gates.eval_gate_start_safely(
            rollout_id=rollout.pk, baseline=rollout.baseline, candidate=rollout.candidate, spec=rollout.plan.get("eval_gate") or {},
            alpha=check_alpha_share(plan_from_stored(rollout.plan)),
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
    candidate_ready = model_version_is_ready(model_version=rollout.candidate) or capacity.rollout_candidate_coming(
        rollout=rollout)
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

