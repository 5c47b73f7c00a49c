"""The checks of one look: per-arm statistics over sessions of the rollout's windows, tested against the
plan's SLOs, guardrails, shadow quality and primary metric (`experiments.stats`), each turned into the
JSON the rollout stores and the pages show. Nothing here decides what the rollout does next (`policy`).

Error control, one rule for the whole rollout (`rollouts.plans.alpha`): the plan's alpha is split once,
equally (Bonferroni), over every check that can stop or pass it: each SLO, each guardrail, the shadow
quality check, the eval gate and an A/B's primary metric. Each check decides on always-valid bounds at its
share, so the chance that any check of the rollout is ever wrong, at any look of any step, is at most alpha.
In a plan that bakes with a holdout each guardrail is checked again on the bake's evidence alone
(`bake_alone_checks`), which takes no share: the guardrail's breach side (the lower bound) is split in half
between its pooled check and its bake-alone check (`guardrail_breach_share`), its pass side keeps the share.

Evidence carried across steps (one confidence sequence per check for the whole rollout, so no split over
steps): every step with both arms live (0 < weight < 1) is a stratum; a guardrail compares the arms within
each stratum and averages the strata's differences with weights n_b n_c / (n_b + n_c) of their requests,
so the changing split between steps cannot bias it (Simpson's paradox: pooling arms across steps whose
weights differ would compare a candidate seen mostly late with a baseline seen mostly early). The two
versions are the same in every step of a rollout, which is what makes the steps comparable at all. A step
whose sessions did not split as configured (sample ratio mismatch) is left out of the pooling. SLOs judge
the candidate alone and sum its requests over its live steps. A tail guardrail or SLO counts one request
per session, its first, over the same steps (`_tail_guardrail_check`, `_tail_slo`): the stratified
comparison above needs per-step moments, and a quantile pools the arms' steps instead, which the docs
state as its limit (a latency drift between steps of unequal splits can bias it). A shadow step (weight 0) is judged on its own
window only; its latency guardrails compare each shadow pair's two sides, both asked and timed by the mirror
task side by side (`rollouts.analysis.shadow`).

The check dicts every look stores (what the policy, the pages and `rolloutctl` read): `type`, `name`,
`metric`, `decision` ("safe", "breach", "undecided"; "win"/"loss" for an A/B's primary metric), `alpha`
(the check's share; a guardrail's `breach_alpha` is its breach side's), `min_n` (the fewest candidate
requests at which it could be shown safe), `more_n` with `more_unit` (while undecided: about how many more
candidate requests it needs at the present estimate; None when the estimate sits on the margin), `steps`
(the step indexes its evidence pools), the estimate with its bounds, and `n` / `sessions`; a guardrail's
check on the bake alone has `scope` "bake alone" (the policy acts only on its breach: it never holds the
bake), and `alpha` and `breach_alpha` both its half of its guardrail's breach side.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from experiments.analysis import (
    ArmSums,
    PairedLatency,
    PrePeriod,
    arm_summary,
    arm_sums,
    first_request_bins,
    first_request_over,
)
from experiments.analysis.shadow import ShadowStepSums, shadow_step_sums
from experiments.analysis.tails import Rollups
from experiments.metrics import HIGHER, LOWER, METRICS, Metric
from experiments.stats import (
    DEFAULT_MIN_UNITS,
    Decision,
    RatioStats,
    always_valid_p_value,
    benjamini_hochberg,
    breach_level,
    breach_tuning_n,
    design_effect,
    guardrail_more_factor,
    half_width,
    limit_tuning_n,
    margin_tuning_n,
    min_trials,
    proportion_limit_check,
    ratio_comparison,
    ratio_estimate,
    ratio_guardrail_check,
    ratio_limit_check,
    smallest_enough,
    srm_sequential,
    step_tuning_n,
)
from experiments.stats.bounded import session_mean_n_needed
from experiments.stats.estimators import arm_difference
from experiments.stats.quantiles import (
    BinnedSample,
    quantile_guardrail_check,
    quantile_tuning_n,
    tail_min_n,
    tail_sample_size,
)
from rollouts import gates
from rollouts.analysis.look import ROUTE_SETTLE, D, Look, num
from rollouts.analysis.shadow import shadow_latency_guardrail
from rollouts.models import Rollout
from rollouts.plans import Plan
from rollouts.plans.alpha import (
    AlphaSplit,
    alpha_split,
    bake_alone_name,
    bakes_alone,
    check_alpha_share,
    guardrail_breach_share,
)
from rollouts.selectors import rollout_step_starts

logger = logging.getLogger(__name__)

# Re-exported: callers of the checks use them too.
__all__ = ["AlphaSplit", "alpha_split", "check_alpha_share", "guardrail_breach_share"]

MORE_UNIT = "candidate requests"


# -- error control: the plan's alpha split once (rollouts.plans.alpha) ------------------------------------


def plan_tuning_n(plan: Plan) -> float:
    """N*, where every check's confidence sequence is narrowest: the plan's, else the sample expected at the
    first comparing step's decision. One value for the whole rollout: the evidence is one sequence across
    steps, and its mixing must not change with the step (the steps end on the data)."""
    if plan.tuning_n:
        return float(plan.tuning_n)
    for step in plan.steps:
        share = step.weight or step.shadow_rate / (1.0 + step.shadow_rate)
        if 0.0 < share < 1.0:
            return step_tuning_n(candidate_share=share, min_candidate_requests=step.min_candidate_requests)
    return step_tuning_n(candidate_share=0.5, min_candidate_requests=0)


def tuning_n_for_step(plan: Plan, step: dict[str, Any]) -> float:
    """Kept for callers that ask per step: the rollout's one N* (`plan_tuning_n`)."""
    return plan_tuning_n(plan)


def _comparing_share(plan: Plan) -> float:
    for step in plan.steps:
        share = step.weight or step.shadow_rate / (1.0 + step.shadow_rate)
        if 0.0 < share < 1.0:
            return share
    return 0.5


def guardrail_tuning_n(plan: Plan, guardrail: Any, *, breach: bool = False, share: float | None = None) -> float:
    """N* of one guardrail's sequence: the plan's, else the sample a fixed test of the guardrail's margin
    needs at its alpha share (`experiments.stats.margin_tuning_n`) with the candidate at `share` of the
    sessions (by default the plan's first comparing step's), so the bound is narrowest where it decides; with
    `breach`, its breach side's, at the breach side's alpha (`guardrail_breach_share`: half the share when the
    plan bakes alone): a quarter of that sample, where a harm of three margins is caught; for a tail
    guardrail, in sessions, the same sample at that alpha."""
    if plan.tuning_n:
        return float(plan.tuning_n)
    metric = METRICS[guardrail.metric]
    alpha = guardrail_breach_share(plan) if breach else check_alpha_share(plan)
    if metric.shape == "percentile":
        # In sessions (one request each).
        return quantile_tuning_n(quantile=float(metric.quantile or 0.99), alpha=alpha, margin=guardrail.margin)
    found = margin_tuning_n(
        scale=_scale(metric), margin=guardrail.margin, relative=guardrail.relative, lower_is_better=metric.direction == LOWER,
        candidate_share=share if share is not None and 0.0 < share < 1.0 else _comparing_share(plan), alpha=alpha,
    )  # fmt: skip
    tuning = found if found is not None else plan_tuning_n(plan)
    return breach_tuning_n(tuning) if breach else tuning


def bake_alone_tuning_n(plan: Plan, guardrail: Any) -> float:
    """N* of a guardrail's check on the bake's evidence alone, which acts on a breach only: the breach side's
    N* at the bake's split (the candidate at 1 - holdout), so its bound is narrowest where the bake's own
    evidence, a small holdout against nearly every session, would catch a harm of three margins. A tail
    guardrail's is its pooled check's breach side's (sessions)."""
    return guardrail_tuning_n(plan, guardrail, breach=True, share=1.0 - plan.holdout)


def slo_tuning_n(plan: Plan, slo: Any) -> float:
    """N* of one SLO's sequence: the plan's, else for a share the sample at which a candidate halfway inside
    the limit shows it met (`experiments.stats.limit_tuning_n`); for a mean, the rollout's."""
    if plan.tuning_n:
        return float(plan.tuning_n)
    metric = METRICS[slo.metric]
    if metric.shape == "percentile":
        return limit_tuning_n(limit=1.0 - float(metric.quantile or 0.99), alpha=check_alpha_share(plan))
    if metric.shape == "proportion":
        return limit_tuning_n(limit=slo.threshold if slo.op == "<=" else 1.0 - slo.threshold, alpha=check_alpha_share(plan))
    return plan_tuning_n(plan)


# -- the smallest samples that can decide (the policy's step floors) -------------------------------------


def _scale(metric: Metric) -> str:
    if metric.shape == "gmean":
        return "log"
    return "proportion" if metric.shape == "proportion" else "mean"


@lru_cache(maxsize=256)
def _proportion_guardrail_min_n(margin: float, relative: bool, share: float, alpha: float, tuning_n: float) -> int:
    """The fewest candidate requests at which a share guardrail can be shown safe: both arms without a single
    event, one request per session, at the step's split."""
    if relative:
        return DEFAULT_MIN_UNITS  # needs events in the baseline first; no floor follows from alpha alone

    def safe(n_c: int) -> bool:
        n_b = max(DEFAULT_MIN_UNITS, round(n_c * (1.0 - share) / share))
        zero_b = RatioStats(n_b, 0.0, float(n_b), 0.0, float(n_b), 0.0)
        zero_c = RatioStats(n_c, 0.0, float(n_c), 0.0, float(n_c), 0.0)
        result = ratio_guardrail_check(zero_b, zero_c, scale="proportion", margin=margin, relative=False,
                                       alpha=alpha, tuning_n=tuning_n)  # fmt: skip
        return result.decision is Decision.SAFE

    found = smallest_enough(safe, start=DEFAULT_MIN_UNITS, limit=10**8)
    return found if found is not None else 10**8


def _units_floor(share: float) -> int:
    # Both arms need DEFAULT_MIN_UNITS sessions; past a 50 % split the baseline is the smaller arm.
    if share <= 0.5:
        return DEFAULT_MIN_UNITS
    return math.ceil(DEFAULT_MIN_UNITS * share / max(1.0 - share, 1e-9))


def _slo_min_n(slo: Any, alpha: float, tuning_n: float) -> int:
    metric = METRICS[slo.metric]
    if metric.shape == "percentile":
        return min_trials(limit=1.0 - float(metric.quantile or 0.99), alpha=alpha, tuning_n=tuning_n, all_successes=False)
    if metric.shape == "proportion":
        bad_limit = slo.threshold if slo.op == "<=" else 1.0 - slo.threshold
        return min_trials(limit=bad_limit, alpha=alpha, tuning_n=tuning_n, all_successes=False)
    return DEFAULT_MIN_UNITS


def _guardrail_min_n(guardrail: Any, share: float, alpha: float, tuning_n: float) -> int:
    metric = METRICS[guardrail.metric]
    if metric.shape == "percentile":
        # Sessions, one request each: a floor on candidate requests too (a session sends at least one).
        return tail_min_n(quantile=float(metric.quantile or 0.99), alpha=alpha, tuning_n=tuning_n)
    if metric.shape == "proportion" and not metric.outcome:
        return max(_units_floor(share), _proportion_guardrail_min_n(guardrail.margin, guardrail.relative, share, alpha, tuning_n))
    return _units_floor(share)


def step_min_sample(plan: Plan, step_index: int) -> int:
    """The fewest candidate requests at which every check of the step can be shown safe at the plan's alpha,
    however good the data: the floor under a step's `min_candidate_requests` (the policy's). It follows from
    alpha, the number of checks, the limits and margins and the step's split. It is stated per step as if
    the step stood alone: evidence carried from earlier steps can decide sooner, but each split is then
    still watched for at least this long."""
    step = plan.steps[step_index]
    share = step.weight or step.shadow_rate / (1.0 + step.shadow_rate)
    alpha = check_alpha_share(plan)
    needs = [_slo_min_n(slo, alpha, slo_tuning_n(plan, slo)) for slo in plan.slos]
    if 0.0 < share < 1.0:
        needs += [_guardrail_min_n(g, share, alpha, guardrail_tuning_n(plan, g)) for g in plan.guardrails]
    return max(needs, default=0)


ASSUMED_TAIL_LOG_SD = 0.5  # as rollouts.planning's ASSUMED_LOG_SD: a log latency's spread when none was measured


def tail_guardrail_need(guardrail: Any, *, share: float, alpha: float, tuning_n: float, history: ArmSums | None,
                        min_sessions: int = 30, power: float = 0.8) -> dict[str, Any]:  # fmt: skip
    """The planned sample of a tail guardrail (`rollouts.planning` asks here for percentile guardrails): the
    candidate sessions at which a candidate as good as the baseline is shown within the margin with
    `power` (`experiments.stats.quantiles.tail_sample_size`; `rollouts.planning` gives 1 - its miss per
    check), for lognormal latencies with the spread the baseline's history shows on the log scale (or an
    assumed one). Sessions, one request each: the
    candidate's requests are at least as many."""
    metric = METRICS[guardrail.metric]
    assumed: dict[str, Any] = {}
    log_sd = ASSUMED_TAIL_LOG_SD
    stats = history.ratio_for(f"{metric.source.removesuffix('_ms')}_gmean_ms") if history is not None else None
    if stats is not None and stats.units >= min_sessions and stats.den > 1:
        mean = stats.num / stats.den
        # Between requests, not sessions: the spread of one request's log latency around the arm's.
        variance = max(0.0, stats.num_sq / stats.den - mean * mean) if stats.units == stats.den else None
        if variance:
            log_sd = math.sqrt(variance)
    if log_sd == ASSUMED_TAIL_LOG_SD:
        assumed["log_sd"] = ASSUMED_TAIL_LOG_SD
    n = tail_sample_size(quantile=float(metric.quantile or 0.99), margin=guardrail.margin, alpha=alpha, tuning_n=tuning_n,
                         candidate_share=share, log_sd=log_sd, power=power)  # fmt: skip
    if n is None:
        return {"metric": guardrail.metric, "error": "no sample up to 10^9 sessions shows this margin"}
    return {"metric": guardrail.metric, "candidate_n": n, "unit": "candidate sessions", "assumed": assumed}


# -- windows ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    step_index: int
    weight: float
    since: datetime
    until: datetime
    current: bool


def bake_step(rollout: Rollout) -> dict[str, Any]:
    """The bake as a step: the candidate at 1 - holdout, no shadow (its index is len(steps) in the windows)."""
    return {"weight": round(1.0 - rollout.holdout, 6), "shadow_rate": 0.0, "min_duration_s": rollout.bake_s,
            "min_candidate_requests": 0, "requires_approval": False}  # fmt: skip


def evidence_windows(rollout: Rollout, window_start: datetime, now: datetime) -> list[Window]:
    """Every step the rollout has been in, as [start + settle, the next step's start), and the current one
    from `window_start` (never before the previous step's end) to now. While the promotion bakes, the bake
    is the current window (index len(steps), weight 1 - holdout) and the last step ends where it began."""
    steps = rollout.steps
    starts = [(i, at) for i, at in rollout_step_starts(rollout=rollout) if 0 <= i < len(steps)]
    current_index, current_weight = rollout.step_index, float(steps[rollout.step_index]["weight"])
    if rollout.state == Rollout.State.BAKING and rollout.bake_started_at is not None:
        current_index, current_weight = len(steps), float(bake_step(rollout)["weight"])
        starts.append((current_index, rollout.bake_started_at))
    windows = []
    previous_end: datetime | None = None
    for position, (index, at) in enumerate(starts):
        if index == current_index:
            continue
        until = starts[position + 1][1] if position + 1 < len(starts) else now
        since = at + ROUTE_SETTLE
        previous_end = until
        if since < until:
            windows.append(Window(index, float(steps[index]["weight"]), since, until, False))
    since = max(window_start, previous_end) if previous_end is not None else window_start
    windows.append(Window(current_index, current_weight, since, now, True))
    return windows


# -- the checks -------------------------------------------------------------------------------------------


def _more(growth: float | None, requests: float) -> int | None:
    if growth is None:
        return None
    return max(1, math.ceil(max(requests, 1.0) * (growth - 1.0))) if growth > 1.0 else 1


def _slo_check(slo: Any, cand: ArmSums, prices: tuple[float, float], alpha: float, tuning_n: float,
               steps: list[int], firsts: dict[tuple[str, float], tuple[int, int]] | None = None,
               shadow: bool = False) -> dict[str, Any]:  # fmt: skip
    """`firsts`: the tail SLOs' sample, one request per session (`experiments.analysis.first_request_over`,
    or in a shadow step one shadow pair per session, `experiments.analysis.shadow.ShadowStepSums.over`)."""
    metric = METRICS[slo.metric]
    out: dict[str, Any] = {
        "type": "slo", "name": slo.label, "metric": slo.metric, "limit": slo.threshold, "alpha": num(alpha),
        "steps": steps, "more_unit": MORE_UNIT, "min_n": _slo_min_n(slo, alpha, tuning_n),
    }  # fmt: skip
    if metric.shape == "percentile" and firsts is not None:
        return {**out, **_tail_slo(slo, metric, firsts, alpha, tuning_n, shadow=shadow)}
    stats = cand.ratio_for(metric, threshold=slo.threshold, prices=prices)
    if stats is None or stats.den <= 0:
        return {**out, "decision": Decision.UNDECIDED.value, "n": 0, "more_n": out["min_n"], "reason": "no requests yet"}
    if metric.shape in ("percentile", "proportion"):
        if metric.shape == "percentile":
            limit, direction, share_limit = 1.0 - float(metric.quantile or 0.99), LOWER, 1.0 - float(metric.quantile or 0.99)
        else:
            limit, direction, share_limit = slo.threshold, LOWER if slo.op == "<=" else HIGHER, None
        deff = design_effect(stats)
        result = proportion_limit_check(
            stats.num, stats.den, limit=limit, direction=direction, alpha=alpha, tuning_n=tuning_n, design_effect=deff
        )
        return {
            **out, "decision": result.decision.value, "estimate": num(result.estimate), "low": num(result.lower_bound),
            "high": num(result.upper_bound), "n": result.n, "sessions": stats.units, "design_effect": num(deff),
            "min_n_breach": result.min_n_breach, "more_n": result.more_n if result.decision is Decision.UNDECIDED else None,
            "test": "beta-binomial confidence sequence", "reason": result.reason,
            **({"share_limit": num(share_limit)} if share_limit is not None else {}),
        }  # fmt: skip
    direction = LOWER if slo.op == "<=" else HIGHER
    mean = ratio_limit_check(
        stats, threshold=slo.threshold, log=metric.shape == "gmean", direction=direction, alpha=alpha, tuning_n=tuning_n
    )
    return {
        **out, "decision": mean.decision.value, "estimate": num(mean.estimate), "low": num(mean.lower_bound),
        "high": num(mean.upper_bound), "n": mean.n, "sessions": stats.units,
        "more_n": _more(mean.growth, stats.den) if mean.decision is Decision.UNDECIDED else None, "reason": mean.reason,
    }  # fmt: skip


def _tail_slo(slo: Any, metric: Metric, firsts: dict[tuple[str, float], tuple[int, int]], alpha: float,
              tuning_n: float, shadow: bool = False) -> dict[str, Any]:  # fmt: skip
    """A tail SLO ("ttft_p99_ms <= 800": at most 1 % over 800 ms) on the candidate's sessions' first requests:
    independent 0/1 observations, so the beta-binomial sequence is exact with no design effect. (On every
    request, deflated by an estimated design effect, a share sitting at its limit with sticky users was
    called met 2.9 % of the time at alpha 0.0125 over 40 looks; on first requests 0.1 %.)"""
    share_limit = 1.0 - float(metric.quantile or 0.99)
    over, n = firsts.get((metric.source, float(slo.threshold)), (0, 0))
    out: dict[str, Any] = {"more_unit": SHADOW_MORE_UNIT if shadow else "candidate sessions",
                           "unit": SHADOW_UNIT if shadow else "first request of each session",
                           "share_limit": num(share_limit)}  # fmt: skip
    if n <= 0:
        return {**out, "decision": Decision.UNDECIDED.value, "n": 0, "sessions": 0, "more_n": None,
                "reason": "no candidate session with this latency yet"}  # fmt: skip
    result = proportion_limit_check(float(over), float(n), limit=share_limit, direction=LOWER, alpha=alpha, tuning_n=tuning_n)
    return {
        **out, "decision": result.decision.value, "estimate": num(result.estimate), "low": num(result.lower_bound),
        "high": num(result.upper_bound), "n": n, "sessions": n, "min_n": result.min_n,
        "min_n_breach": result.min_n_breach, "more_n": result.more_n if result.decision is Decision.UNDECIDED else None,
        "test": "beta-binomial confidence sequence, one request per session", "reason": result.reason,
    }  # fmt: skip


def _guardrail_check(
    guardrail: Any, strata: list[tuple[ArmSums, ArmSums]], prices: dict[str, tuple[float, float]], alpha: float,
    tuning_n: float, share: float, shadow_step: bool, steps: list[int], paired: PairedLatency | None = None,
    breach_n: float | None = None, breach_alpha: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`alpha` and `tuning_n`: the upper bound's (which shows the candidate safe, and sets `min_n`);
    `breach_alpha` and `breach_n`: the lower bound's, which calls a breach (by default the same)."""
    metric = METRICS[guardrail.metric]
    scale = _scale(metric)
    breach_alpha = breach_level(alpha, breach_alpha)
    out: dict[str, Any] = {
        "type": "guardrail", "name": guardrail.label, "metric": guardrail.metric, "margin": guardrail.margin,
        "relative": guardrail.relative, "scale": scale, "alpha": num(alpha), "breach_alpha": num(breach_alpha),
        "steps": steps, "more_unit": MORE_UNIT,
        "min_n": _guardrail_min_n(guardrail, share, alpha, tuning_n) if 0 < share < 1 else None,
    }  # fmt: skip
    if shadow_step and metric.outcome:
        return {**out, "decision": Decision.UNDECIDED.value, "more_n": None,
                "reason": "no user sees shadow replies, so no outcomes"}  # fmt: skip
    if shadow_step and paired is not None and metric.is_latency and metric.shape in ("gmean", "mean"):
        # Both sides of each shadow pair timed together by the mirror task: compared pair by pair.
        return {**out, **shadow_latency_guardrail(guardrail, metric, paired, alpha=alpha, tuning_n=tuning_n,
                                                  breach_alpha=breach_alpha)}  # fmt: skip
    bases, cands = [], []
    for base, cand in strata:
        b = base.ratio_for(metric, prices=prices["baseline"])
        c = cand.ratio_for(metric, prices=prices["candidate"])
        if b is not None and c is not None:
            bases.append(b)
            cands.append(c)
    if not bases:
        return {**out, "decision": Decision.UNDECIDED.value, "n": [0, 0], "more_n": out["min_n"],
                "reason": "no comparable data in an arm"}  # fmt: skip
    options: dict[str, Any] = {
        "scale": scale, "margin": guardrail.margin, "relative": guardrail.relative, "direction": metric.direction,
        "alpha": alpha, "tuning_n": tuning_n, "breach_tuning_n": breach_n, "breach_alpha": breach_alpha,
    }  # fmt: skip
    result = ratio_guardrail_check(bases, cands, **options)
    undecided = result.decision is Decision.UNDECIDED
    more = None
    if undecided:
        # More data comes to the current step only: its candidate requests grow by the factor.
        factor = guardrail_more_factor(bases, cands, **options)
        more = _more(factor, cands[-1].den)
    return {
        **out, "decision": result.decision.value, "effect": num(result.harm), "low": num(result.harm_low),
        "high": num(result.harm_high), "p": num(result.p_value),
        "n": [round(result.baseline_requests), round(result.candidate_requests)],
        "sessions": [result.baseline_units, result.candidate_units], "baseline": num(result.baseline),
        "candidate": num(result.candidate), "theta": num(result.theta),
        "variance_reduction": num(result.variance_reduction), "covariates": list(result.covariates),
        "more_n": more, "reason": result.reason,
        **({"test": "ratio of geometric means"} if scale == "log" else {}),
    }  # fmt: skip


TAIL_TEST = "quantile confidence sequences (Howard and Ramdas 2022), one request per session, each arm at alpha/2"
# A shadow step's tail checks read each session's first shadow pair (experiments.analysis.tails).
SHADOW_UNIT = "first shadow pair of each session"
SHADOW_MORE_UNIT = "shadow sessions"


def _tail_guardrail_check(
    guardrail: Any, bins: dict[str, dict[str, dict[int, int]]], alpha: float, tuning_n: float, share: float,
    steps: list[int], shadow_step: bool, breach_alpha: float | None = None, breach_n: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A tail guardrail ("e2e_p99_ms at most 10 % worse"): the candidate's quantile against (1 + margin)
    times the baseline's, from one request per session in each arm (`experiments.stats.quantiles`). Its
    `n` and `sessions` count sessions, and `more_n` candidate sessions. `breach_alpha` and `breach_n`: the
    breach side's alpha and N* (by default `alpha` and `tuning_n`)."""
    metric = METRICS[guardrail.metric]
    quantile = float(metric.quantile or 0.99)
    field = metric.source
    breach_alpha = breach_level(alpha, breach_alpha)
    out: dict[str, Any] = {
        "type": "guardrail", "name": guardrail.label, "metric": guardrail.metric, "margin": guardrail.margin,
        "relative": True, "scale": "quantile", "quantile": quantile, "alpha": num(alpha),
        "breach_alpha": num(breach_alpha), "steps": steps,
        "more_unit": "candidate sessions" if not shadow_step else SHADOW_MORE_UNIT, "test": TAIL_TEST,
        "unit": "first request of each session" if not shadow_step else SHADOW_UNIT,
        "min_n": tail_min_n(quantile=quantile, alpha=alpha, tuning_n=tuning_n) if 0 < share < 1 else None,
    }  # fmt: skip
    base = BinnedSample.of(bins.get("baseline", {}).get(field, {}))
    cand = BinnedSample.of(bins.get("candidate", {}).get(field, {}))
    if not base.n or not cand.n:
        return {**out, "decision": Decision.UNDECIDED.value, "n": [base.n, cand.n], "sessions": [base.n, cand.n],
                "more_n": out["min_n"], "reason": "no comparable data in an arm"}  # fmt: skip
    result = quantile_guardrail_check(base, cand, quantile=quantile, margin=guardrail.margin, alpha=alpha, tuning_n=tuning_n,
                                      breach_alpha=breach_alpha, breach_tuning_n=breach_n)  # fmt: skip
    undecided = result.decision is Decision.UNDECIDED
    more = None
    if undecided:
        more = result.more_n if result.more_n is not None else max(0, result.min_n - cand.n) or None
    return {
        **out, "decision": result.decision.value, "effect": num(result.harm), "low": num(result.harm_low),
        "high": num(result.harm_high) if math.isfinite(result.harm_high) else None,
        "n": [base.n, cand.n], "sessions": [base.n, cand.n],
        "baseline": num(result.baseline.estimate), "candidate": num(result.candidate.estimate),
        "baseline_bounds": [num(result.baseline.lower), num(result.baseline.upper) if math.isfinite(result.baseline.upper) else None],
        "candidate_bounds": [num(result.candidate.lower), num(result.candidate.upper) if math.isfinite(result.candidate.upper) else None],
        "more_n": more, "reason": result.reason,
    }  # fmt: skip


def _primary_check(plan: Plan, base: ArmSums, cand: ArmSums, prices: dict[str, tuple[float, float]], alpha: float,
                   tuning_n: float) -> dict[str, Any]:  # fmt: skip
    assert plan.primary_metric is not None
    metric = METRICS[plan.primary_metric.metric]
    difference = "relative" if metric.shape == "gmean" else plan.primary_metric.difference
    out: dict[str, Any] = {
        "type": "primary", "name": f"primary: {metric.name}", "metric": metric.name, "difference": difference,
        "alpha": num(alpha), "more_unit": MORE_UNIT,
    }  # fmt: skip
    b = base.ratio_for(metric, prices=prices["baseline"])
    c = cand.ratio_for(metric, prices=prices["candidate"])
    if b is None or c is None or min(b.units, c.units) < DEFAULT_MIN_UNITS or min(b.den, c.den) <= 0:
        return {**out, "decision": "undecided", "reason": "not enough sessions in an arm"}
    try:
        b_est, c_est = ratio_estimate(b, role="baseline"), ratio_estimate(c, role="candidate")
        log = metric.shape == "gmean"
        diff = arm_difference(b_est, c_est, relative=difference == "relative" and not log, t_reference=False)
    except ValueError as exc:
        return {**out, "decision": "undecided", "reason": str(exc)[:200]}
    n_total = b.den + c.den
    width = half_width(variance=diff.variance, n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    p_value = always_valid_p_value(effect=diff.effect, variance=diff.variance, n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    effect, low, high = diff.effect, diff.effect - width, diff.effect + width
    if log:
        effect, low, high = math.expm1(effect), math.expm1(low), math.expm1(high)
    better = effect > 0 if metric.direction == HIGHER else effect < 0
    decision = ("win" if better else "loss") if p_value <= alpha else "undecided"
    return {
        **out, "decision": decision, "effect": num(effect), "low": num(low), "high": num(high), "p": num(p_value),
        "n": [round(b.den), round(c.den)], "sessions": [b.units, c.units],
        "baseline": num(math.exp(b_est.mean) if log else b_est.mean), "candidate": num(math.exp(c_est.mean) if log else c_est.mean),
    }  # fmt: skip


def _quality_check(plan: Plan, rollout_id: int, alpha: float) -> dict[str, Any]:
    """Shadow quality at this check's share `alpha` of the rollout's alpha: the candidate's mean score
    against the baseline's answers, with always-valid one-sided bounds (each at alpha), against a floor:
    `min_mean`, or the baseline's own score on the scorer (1, or 0.5 for a pairwise judge) less `max_drop`.
    Breach when the upper bound is under the floor, safe when the lower bound is at or over it. The sessions
    are the units (a sticky user's pairs are not independent; evals.selectors.shadow_quality). The bounds
    never have zero width: under 30 units they are all of [0, 1], and past that the sessions' variance is
    shrunk towards the largest a score can have, so a handful of pairs is simply undecided, with an estimate
    of how many more a decision needs."""
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
        total = session_mean_n_needed(n=quality.n, units=quality.units or quality.n, sd=quality.sd or 0.0,
                                      gap=abs(quality.mean - floor), alpha=alpha)  # fmt: skip
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
    if check.get("scope") == "bake alone":
        base = breach_reason({**check, "scope": None}).removeprefix("guardrail breached: ")
        return f"guardrail breached on the bake's evidence alone ({check['name']}, the holdout since the bake began): {base}"
    if check["type"] == "guardrail" and check.get("scale") == "quantile":
        label = f"p{float(check.get('quantile') or 0.99) * 100:g}"
        return (
            f"guardrail breached: {check['metric']} is worse than the baseline's by {check['effect'] * 100:.3g}% "
            f"(at least {check['low'] * 100:.3g}% with confidence; margin {check['margin'] * 100:.3g}%); "
            f"{label} of sessions' first requests: baseline {check.get('baseline')} ms, candidate {check.get('candidate')} ms"
        )
    if check["type"] == "guardrail":
        unit = "%" if check["relative"] else ""
        scale = 100 if check["relative"] else 1
        what = "geometric mean " if check.get("scale") == "log" else ""
        return (
            f"guardrail breached: {check['metric']} {what}is worse than the baseline by {check['effect'] * scale:.3g}{unit} "
            f"(at least {check['low'] * scale:.3g}{unit} with confidence; margin {check['margin'] * scale:.3g}{unit}); "
            f"baseline {check.get('baseline')}, candidate {check.get('candidate')}"
        )
    if check["type"] == "slo":
        return (
            f"SLO breached: {check['name']} (estimate {check.get('estimate')}, "
            f"interval [{check.get('low')}, {check.get('high')}])"
        )
    return f"{check['name']} breached (estimate {check.get('estimate')}, interval [{check.get('low')}, {check.get('high')}])"


def _srm(base: ArmSums, cand: ArmSums, weight: float, tuning_n: float) -> dict[str, Any]:
    counts = [base.exposed, cand.exposed]
    srm = srm_sequential(counts, [1.0 - weight, weight], tuning_n=tuning_n)
    return {
        "p": num(srm.p_value), "mismatch": srm.mismatch, "counts": counts, "expected": [num(e) for e in srm.expected],
        "unit": "sessions at first exposure", "test": "sequential (Dirichlet-multinomial)",
    }  # fmt: skip


def measure(rollout: Rollout, plan: Plan, step: dict[str, Any], window_start: datetime, now: datetime) -> Look:
    thresholds = plan.latency_thresholds
    weight = float(step["weight"])
    shadow_step = weight == 0.0
    prices = arm_prices(rollout)
    split = alpha_split(plan)
    alpha, tuning_n = split.share, plan_tuning_n(plan)
    look = Look(decision=D.HOLD, reason="", window_start=window_start)

    windows = evidence_windows(rollout, window_start, now)
    current = windows[-1]
    # The current window is open (its rollup folds what arrives); an earlier step's has its end.
    # The sessions' requests before the rollout, all the baseline's: the latencies' second covariate.
    pre = None
    if rollout.started_at is not None:
        pre = PrePeriod(alias=rollout.alias_name, until=rollout.started_at, model_version_id=rollout.baseline_id)
    # The latency fields of the plan's tail checks: the windows' rollups keep each session's first request.
    firsts = tail_fields(plan)
    sums = {w.step_index: arm_sums(rollout_id=rollout.pk, since=w.since, until=None if w.current else w.until,
                                   thresholds=thresholds, percentiles=w.current, pre_period=pre, first_fields=firsts)
            for w in windows}  # fmt: skip
    base = sums[current.step_index]["baseline"]
    # A shadow step's candidate evidence: its shadow pairs, folded look by look into a window of their own
    # (the candidate's sums, the paired sums, the first pairs of the tail checks).
    shadowed = None
    if shadow_step:
        shadowed = shadow_step_sums(rollout_id=rollout.pk, since=current.since, thresholds=thresholds,
                                    bin_fields=tail_guardrail_fields(plan))  # fmt: skip
    cand = shadowed.candidate if shadowed is not None else sums[current.step_index]["candidate"]
    window_s = max((now - window_start).total_seconds(), 1e-3)
    look.arms = {
        "baseline": arm_summary(base, window_s=window_s, prices=prices["baseline"]),
        "candidate": {**arm_summary(cand, window_s=window_s, prices=prices["candidate"]), **({"source": "shadow"} if shadow_step else {})},
    }
    if 0.0 < weight < 1.0:
        look.srm = _srm(base, cand, weight, tuning_n)

    # Strata of the comparisons: every live split step whose sessions split as configured, or the shadow step.
    if shadow_step:
        strata, compared = [(base, cand)], [current.step_index]
    else:
        strata, compared = [], []
        for w in windows:
            if not 0.0 < w.weight < 1.0:
                continue
            b, c = sums[w.step_index]["baseline"], sums[w.step_index]["candidate"]
            if not w.current and _srm(b, c, w.weight, tuning_n)["mismatch"]:
                continue
            strata.append((b, c))
            compared.append(w.step_index)
    # SLOs: the candidate's own requests, summed over its live steps (the current one alone when shadowing).
    if shadow_step:
        slo_cand, slo_steps = cand, [current.step_index]
    else:
        slo_cand, slo_steps = ArmSums(), []
        for w in windows:
            if w.weight > 0.0:
                slo_cand = slo_cand.merge(sums[w.step_index]["candidate"])
                slo_steps.append(w.step_index)

    over = None
    rollups: Rollups = {}  # the windows' rollups as the tail checks' samples read them: once per look
    if shadowed is not None and any(METRICS[slo.metric].shape == "percentile" for slo in plan.slos):
        over = shadowed.over
    elif any(METRICS[slo.metric].shape == "percentile" for slo in plan.slos):
        spans = [(w.since, None if w.current else w.until) for w in windows if w.weight > 0.0]
        over = first_request_over(rollout_id=rollout.pk, windows=spans, thresholds=thresholds, pre_period=pre,
                                  first_fields=firsts, rollups=rollups)  # fmt: skip
    look.checks = [
        _slo_check(slo, slo_cand, prices["candidate"], alpha, slo_tuning_n(plan, slo), slo_steps, over, shadow_step)
        for slo in plan.slos
    ]
    share = weight or float(step["shadow_rate"]) / (1.0 + float(step["shadow_rate"]))
    paired = shadowed.paired if shadowed is not None else None
    tails = _tail_bins(rollout, plan, windows, compared, shadowed, pre, firsts, rollups)
    # A guardrail's breach side: half its share when the plan bakes alone (the other half is its bake-alone
    # check's, `rollouts.plans.alpha`), at every look of the rollout, so that the halves add up over its life.
    breach_alpha = split.breach_share
    look.checks += [
        _tail_guardrail_check(g, tails, alpha, guardrail_tuning_n(plan, g), share, compared, shadow_step,
                              breach_alpha, guardrail_tuning_n(plan, g, breach=True))
        if METRICS[g.metric].shape == "percentile"
        else _guardrail_check(g, strata, prices, alpha, guardrail_tuning_n(plan, g), share, shadow_step, compared,
                              paired, guardrail_tuning_n(plan, g, breach=True), breach_alpha)
        for g in plan.guardrails
    ]  # fmt: skip
    if current.step_index == len(rollout.steps) and 0.0 < weight < 1.0 and bakes_alone(plan):
        look.checks += bake_alone_checks(rollout, plan, windows, sums, prices, breach_alpha, pre, firsts, rollups)
    if plan.shadow_quality is not None:
        look.checks.append(_quality_check(plan, rollout.pk, alpha))
    if plan.strategy == "ab" and plan.primary_metric is not None:
        look.checks.append(_primary_check(plan, base, cand, prices, alpha, tuning_n))
    look.alpha = split.as_dict()
    if not shadow_step:
        look.comparisons = exploratory_comparisons(plan, strata, prices, rollout)
    return look


def bake_alone_checks(rollout: Rollout, plan: Plan, windows: list[Window], sums: dict[int, dict[str, ArmSums]],
                      prices: dict[str, tuple[float, float]], alpha: float, pre: PrePeriod | None,
                      firsts: tuple[str, ...], rollups: Rollups) -> list[dict[str, Any]]:  # fmt: skip
    """While the promotion bakes: each guardrail again on the bake's evidence alone (the bake's window, the
    candidate against the holdout since the bake began), as "<guardrail> (bake alone)", both bounds at
    `alpha`: half of its guardrail's breach side (`rollouts.plans.alpha`; the pooled check has the other
    half), with the breach side's N* at the bake's split (`bake_alone_tuning_n`). A regression that appears
    only in the bake (under the full load) weighs in the pooled check only by the bake's share of the steps'
    evidence; here it is the whole of it. The policy acts on its breach only (`scope`: "bake alone"), so its
    upper bound decides nothing and spends no alpha."""
    bake = windows[-1]
    share = bake.weight
    strata = [(sums[bake.step_index]["baseline"], sums[bake.step_index]["candidate"])]
    tails = _tail_bins(rollout, plan, windows, [bake.step_index], None, pre, firsts, rollups)
    out = []
    for g in plan.guardrails:
        breach_n = bake_alone_tuning_n(plan, g)
        if METRICS[g.metric].shape == "percentile":
            check = _tail_guardrail_check(g, tails, alpha, breach_n, share, [bake.step_index], False)
        else:
            check = _guardrail_check(g, strata, prices, alpha, guardrail_tuning_n(plan, g), share, False,
                                     [bake.step_index], None, breach_n)  # fmt: skip
        out.append({**check, "name": bake_alone_name(g.label), "scope": "bake alone"})
    return out


def _tail_bins(rollout: Rollout, plan: Plan, windows: list[Window], compared: list[int],
               shadowed: ShadowStepSums | None, pre: PrePeriod | None = None, firsts: tuple[str, ...] | None = None,
               rollups: Rollups | None = None) -> dict[str, dict[str, dict[int, int]]]:  # fmt: skip
    """The tail guardrails' samples (`experiments.analysis.tails`): the first request of each session over the
    same steps the other guardrails pool (a shadow step, `shadowed`: the first of each session's pairs in it).
    Empty when no guardrail is a tail. Read from the windows' rollups that `arm_sums` folded (the same
    thresholds and pre-period), or that the shadow step's fold kept."""
    fields = tail_guardrail_fields(plan)
    if not fields:
        return {}
    if shadowed is not None:
        return shadowed.bins
    spans = [(w.since, None if w.current else w.until) for w in windows if w.step_index in compared]
    return first_request_bins(rollout_id=rollout.pk, windows=spans, fields=fields, thresholds=plan.latency_thresholds,
                              pre_period=pre, first_fields=firsts, rollups=rollups)  # fmt: skip


def tail_guardrail_fields(plan: Plan) -> tuple[str, ...]:
    """The latency fields of the plan's tail guardrails."""
    return tuple(sorted({METRICS[g.metric].source for g in plan.guardrails if METRICS[g.metric].shape == "percentile"}))


def tail_fields(plan: Plan) -> tuple[str, ...]:
    """The latency fields of the plan's tail guardrails and tail SLOs (their samples: sessions' first requests)."""
    checks: list[Any] = [*plan.guardrails, *plan.slos]
    return tuple(sorted({METRICS[c.metric].source for c in checks if METRICS[c.metric].shape == "percentile"}))


# Reported beside the decisions on the experiments page: the gateway's own metrics and any outcome kinds.
EXPLORATORY = (
    "error_rate", "goodput", "ttft_gmean_ms", "tpot_gmean_ms", "e2e_gmean_ms", "completion_tokens_mean",
    "cost_per_request", "thumbs_up_rate", "success_rate", "outcome_value_mean",
)  # fmt: skip


def exploratory_comparisons(
    plan: Plan, strata: list[tuple[ArmSums, ArmSums]], prices: dict[str, tuple[float, float]], rollout: Rollout
) -> list[dict[str, Any]]:
    """Both-ways comparisons of the metrics no check decides on, over the same strata, at the plan's alpha
    with Benjamini-Hochberg across them: a report of what else moved, which controls the share of false
    discoveries among the rows it flags rather than the chance of any (that is the checks' job)."""
    decided = plan.metrics_used
    priced = any(prices["baseline"]) or any(prices["candidate"])
    rows: list[dict[str, Any]] = []
    for name in EXPLORATORY:
        metric = METRICS[name]
        if name in decided or (name == "cost_per_request" and not priced):
            continue
        bases, cands = [], []
        for base, cand in strata:
            b = base.ratio_for(metric, prices=prices["baseline"])
            c = cand.ratio_for(metric, prices=prices["candidate"])
            if b is not None and c is not None and b.units and c.units:
                bases.append(b)
                cands.append(c)
        if not bases:
            continue
        scale = _scale(metric)
        found = ratio_comparison(
            bases, cands, scale=scale, relative=scale != "proportion", direction=metric.direction, alpha=plan.alpha,
            tuning_n=plan_tuning_n(plan),
        )  # fmt: skip
        row: dict[str, Any] = {
            "metric": name, "scale": scale, "difference": "absolute" if scale == "proportion" else "relative",
            "direction": metric.direction, "n": [round(sum(b.den for b in bases)), round(sum(c.den for c in cands))],
        }  # fmt: skip
        if found is None:
            rows.append({**row, "reason": f"fewer than {DEFAULT_MIN_UNITS} sessions in an arm"})
            continue
        rows.append({
            **row, "effect": num(found.effect), "low": num(found.low), "high": num(found.high), "p": num(found.p_value),
            "chance_better": num(found.chance_better), "baseline": num(found.baseline), "candidate": num(found.candidate),
            "sessions": [found.baseline_units, found.candidate_units], "variance_reduction": num(found.variance_reduction),
        })  # fmt: skip
    tested = [r for r in rows if r.get("p") is not None]
    if tested:
        adjusted = benjamini_hochberg([float(r["p"]) for r in tested], alpha=plan.alpha)
        for r, q, flagged in zip(tested, adjusted.adjusted_p_values, adjusted.reject, strict=True):
            r["q"], r["discovery"] = num(q), bool(flagged)
    return rows
