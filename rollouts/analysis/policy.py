"""The policy of one look: from the checks, the engines' readiness and the rollout's state to a decision
(hold, advance, ask for approval, promote, pause, roll back, decide the eval gate). Nothing is applied here.

A step ends on evidence, never on silence: once its minimums are met (at least MIN_STEP_DURATION_S and its
`min_candidate_requests`, which the validator keeps at or above the fewest requests at which its checks can
decide), it ends (advance, ask for the next approval, or promote) only when every check that can gather
evidence at its split is shown safe. A check not yet shown safe holds the step (`holding_checks`; the look's
reason, the page and `rolloutctl status` name each with about how many more candidate requests it needs).
When the step's candidate requests reach its planned sample (`rollouts.planning.step_planned_sample`: the
figure the plan shows, where a candidate as good as the baseline has been shown safe on every check in all
but 5 % of rollouts; fixed once the step's minimums are met) and a check still holds it, the plan's
`on_inconclusive` applies: `pause` (the default: a person decides; the pause is notified like an approval
request, and after a resume the step collects another planned sample before pausing again), `advance`,
or `rollback`. A breach rolls back at any time.

Promotion bakes (`_decide_bake`): the candidate serves all but the plan's `holdout` of sessions for
`bake_s`, compared with the holdout on the same checks, and each guardrail also on the bake's evidence alone
("<guardrail> (bake alone)"); a breach of either then rolls back, the end of the bake promotes for good."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from experiments.metrics import METRICS
from experiments.stats import Decision
from rollouts import capacity, gates
from rollouts.analysis.checks import (
    bake_step,
    breach_reason,
    measure,
    step_label,
    step_min_sample,
)
from rollouts.analysis.look import ROUTE_SETTLE, D, Look, State
from rollouts.holding import holding_lines
from rollouts.models import Rollout, RolloutEvent
from rollouts.plans import Plan, plan_from_stored
from rollouts.plans.alpha import check_alpha_share
from rollouts.plans.model import MIN_STEP_DURATION_S
from serving.selectors import model_version_is_ready


def _decide_traffic(rollout: Rollout, plan: Plan, now: datetime) -> Look:
    if rollout.state == State.BAKING:
        return _decide_bake(rollout, plan, now)
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
    # The floors hold for plans stored before they did too: no step ends on less than a minute.
    need_s = max(int(step["min_duration_s"]), MIN_STEP_DURATION_S)
    need_n = int(step["min_candidate_requests"])
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
    holding = holding_checks(look.checks, weight=float(step["weight"]))
    if rollout.state != State.RUNNING:
        look.reason = "paused" if rollout.state == State.PAUSED else "waiting for an approval"
        return look
    if srm_bad:
        look.reason = (
            f"sample ratio mismatch (p {look.srm['p']}): arms got {look.srm['counts']} sessions, "  # type: ignore[index]
            f"expected about {look.srm['expected']}; not advancing on a broken split"  # type: ignore[index]
        )
        return look
    if not minimums_met:
        look.reason = f"{step_label(rollout)}: {_progress(elapsed, need_s, cand_n, need_n)}"
        if holding:
            look.reason += f"; not yet shown safe: {_holding_text(holding)}"
        return look
    if not holding:
        look.decision, look.reason = _advance_label(rollout)
        return look
    # Fixed once the minimums are met, so that the alias's history includes at least this step's minute of
    # baseline traffic (at the very start of a rollout it may have none, and the estimate would rest on
    # assumed spreads alone).
    planned = _planned_sample(rollout, plan, look)
    rule = plan.on_inconclusive
    # After a person resumed an inconclusive pause, the step collects another planned sample before the
    # rule applies again (it would otherwise pause at the very next look).
    due = planned * (1 + _inconclusive_pauses(rollout)) if rule == "pause" else planned
    if cand_n < due:
        look.reason = (
            f"{step_label(rollout)}: held until shown safe by {_holding_text(holding)}; "
            f"{cand_n}/{due} candidate requests of the planned sample (then: {rule})"
        )
        return look
    names = ", ".join(c["name"] for c in holding)
    look.inconclusive = {"rule": rule, "planned_n": planned, "due_n": due, "candidate_n": cand_n,
                         "holding": [c["name"] for c in holding]}  # fmt: skip
    reached = f"{step_label(rollout)}: the planned sample ({due} candidate requests) was reached with {names} undecided"
    if rule == "rollback":
        look.decision, look.reason = D.ROLLBACK, f"{reached}; the plan says roll back (on_inconclusive: rollback)"
    elif rule == "advance":
        look.decision, label = _advance_label(rollout)
        look.reason = f"{reached}; the plan says go on (on_inconclusive: advance): {label}"
    else:
        look.decision = D.PAUSE
        look.reason = f"{reached}; paused for a person to decide: resume, advance, promote or roll back (on_inconclusive: pause)"
    return look


def holding_checks(checks: list[dict[str, Any]], *, weight: float) -> list[dict[str, Any]]:
    """The checks that keep a step from ending: every SLO, guardrail and quality check that can still
    gather evidence at this split and is not yet shown safe. Each check gets `holds` (true or false) for the
    pages. At 100 % a guardrail has no baseline to compare with (its evidence is the earlier steps'; the
    bake compares it again against the holdout); in a shadow step nobody sees the candidate's answers, so
    outcome guardrails cannot gather anything there."""
    holding = []
    for check in checks:
        holds = check["type"] != "primary" and check.get("decision") != Decision.SAFE.value
        if holds and check["type"] == "guardrail":
            metric = METRICS.get(check.get("metric", ""))
            if weight >= 1.0 or (weight == 0.0 and metric is not None and metric.outcome):
                holds = False
        check["holds"] = holds
        if holds:
            holding.append(check)
    return holding


def _holding_text(holding: list[dict[str, Any]]) -> str:
    return "; ".join(holding_lines(holding))


def _planned_sample(rollout: Rollout, plan: Plan, look: Look) -> int:
    """The step's planned sample (`rollouts.planning.step_planned_sample`), fixed at the first look after its
    minimums are met and kept on the rollout (`look.keep`), never below the step's minimum."""
    key = str(rollout.step_index)
    stored = (rollout.planned_samples or {}).get(key)
    step = plan.steps[rollout.step_index]
    if stored is None:
        from rollouts.planning import step_planned_sample

        figure = step_planned_sample(plan=plan, baseline=rollout.baseline, step_index=rollout.step_index)
        stored = max(int(figure or 0), step.min_candidate_requests, step_min_sample(plan, rollout.step_index))
        look.keep["planned_samples"] = {**(rollout.planned_samples or {}), key: stored}
    return max(int(stored), step.min_candidate_requests)


def _inconclusive_pauses(rollout: Rollout) -> int:
    """How often this step was paused on reaching its planned sample undecided (and resumed since)."""
    events = RolloutEvent.objects.filter(
        rollout_id=rollout.pk, kind=RolloutEvent.Kind.PAUSED, step_index=rollout.step_index, evidence__has_key="inconclusive"
    )
    if rollout.step_started_at is not None:
        events = events.filter(created_at__gte=rollout.step_started_at)
    return events.count()


def _decide_bake(rollout: Rollout, plan: Plan, now: datetime) -> Look:
    """The promotion's bake: the candidate at 1 - holdout, compared with the holdout on the same checks (its
    evidence pooled with the steps', one sequence per check) and, so that a regression that appears only in
    the bake is not diluted by the steps' evidence, each guardrail on the bake's evidence alone (its own
    half of its guardrail's breach side, `rollouts.plans.alpha`; `checks.bake_alone_checks`). A breach of either rolls
    back; the end of the bake with none promotes for good."""
    started = rollout.bake_started_at or now
    ends = started + timedelta(seconds=plan.bake_s)
    window_start = started + ROUTE_SETTLE
    if window_start > now:
        return Look(D.HOLD, "the bake has just started", window_start=window_start)
    look = measure(rollout, plan, bake_step(rollout), window_start, now)
    for check in look.checks:
        check["holds"] = False
    breaches = [c for c in look.checks if c["decision"] == Decision.BREACH.value]
    if breaches:
        look.decision, look.reason = D.ROLLBACK, f"during the bake: {breach_reason(breaches[0])}"
        return look
    held = (f"{plan.holdout:.0%} of sessions held out on {rollout.baseline.label}" if plan.holdout
            else "no holdout (only the SLOs compare)")  # fmt: skip
    elapsed = int((now - started).total_seconds())
    if now >= ends:
        look.decision = D.PROMOTE
        look.reason = f"the bake passed: {plan.bake_s} s with {held} and no breach; {rollout.candidate.label} takes every session"
    else:
        look.reason = f"baking: {min(elapsed, plan.bake_s)}/{plan.bake_s} s with {held}; no breach"
    return look


def _progress(elapsed: float, need_s: int, n: int, need_n: int) -> str:
    return f"{min(n, need_n)}/{need_n} candidate requests, {min(int(elapsed), need_s)}/{need_s} s"


def _advance_label(rollout: Rollout) -> tuple[str, str]:
    steps = rollout.steps
    nxt = rollout.step_index + 1
    if nxt < len(steps):
        if steps[nxt]["requires_approval"]:
            return D.AWAIT_APPROVAL, f"{step_label(rollout)} passed; step {nxt + 1} needs an approval"
        return D.ADVANCE, f"{step_label(rollout)} passed, every check shown safe: on to {float(steps[nxt]['weight']):.0%}"
    if rollout.plan.get("promotion_requires_approval"):
        return D.AWAIT_APPROVAL, f"{step_label(rollout)} passed; promotion needs an approval"
    return D.PROMOTE, f"the last step passed, every check shown safe: promoting {rollout.candidate.label}"


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
    # While baking the holdout's users have the baseline's engines or failover; the bake goes on.
    if base_since is not None and now - base_since >= grace and rollout.state not in (State.PAUSED, State.BAKING):
        return Look(
            D.PAUSE,
            f"every engine of the baseline {rollout.baseline.label} has been down for {int((now - base_since).total_seconds())} s",
        ), since
    return None, since


def rollout_look(*, rollout: Rollout, now: datetime | None = None) -> tuple[Look, dict[str, Any]]:
    """Measure and decide, without applying anything. Returns the look and the bookkeeping the rollout keeps
    whatever is decided (engine readiness clocks, the step's planned sample)."""
    now = now or timezone.now()
    plan = plan_from_stored(rollout.plan)
    engine_look, readiness = _decide_engines(rollout, plan, now)
    keep: dict[str, Any] = dict(readiness)
    if engine_look is not None:
        return engine_look, keep
    if rollout.state == State.GATING or (rollout.state == State.PAUSED and rollout.paused_from == State.GATING):
        return _decide_gate(rollout), keep
    look = _decide_traffic(rollout, plan, now)
    keep.update(look.keep)
    return look, keep

