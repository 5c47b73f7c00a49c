"""How many candidate requests each step of a plan needs, shown before a rollout starts.

A step's planned sample is where a step whose candidate is as good as the baseline has ended, with every
check shown safe, in all but a small share of rollouts. It is computed from the deciding tests themselves:
for each check, the candidate requests n at which the rollout's own check (`ratio_guardrail_check`,
`proportion_limit_check`, `ratio_limit_check`, with the plan's alpha share and the N* the analysis gives the
check) decides "safe" on data whose estimate is `z` standard errors on the harmful side of the truth; the
truth is "as good as the baseline", the arms' spreads, rates and sessions (their design effect) are those
the baseline served on the alias in the last hour (or stated assumptions when it served nothing). So a
check's figure is where its own bound, with its own variance (a share's score-test variance taken at the
margin, the sessions' clustering, N*'s shape), is shown inside its margin with probability 1 - miss at
that look. (Before, a normal approximation of each test at 80 % power: it put the demo's error-rate
guardrail, a rare event, below the median sample at which its score-test bound is shown safe.)

How sure, and why Bonferroni: the plan's `on_inconclusive` target is that at most PAUSE_TARGET (5 %) of
rollouts of a candidate as good as the baseline reach a planned sample undecided. A rollout passes every
step whose checks can hold it, and a step ends when all its checks are safe at the same look, so each
check of each such step gets miss = PAUSE_TARGET / (steps x checks in the step) (z = the normal quantile at
1 - miss: 2.5-2.9 for the plans here): by the union bound, all of a step's checks are safe together at its
planned sample with probability at least 1 - PAUSE_TARGET / steps, and every step ends by its planned
sample in at least 1 - PAUSE_TARGET of rollouts. A union bound over the steps rather than a simulation
of the whole rollout: it needs no random numbers and no time at plan time, it holds for any plan, and it
errs on the safe side in three ways that make the planned sample later, never earlier, than needed: the
step ends at the first look at which all are safe, not only at the planned one (a first passage comes
before the fixed-n figure); the checks are treated as if their misses never coincided; and evidence carried
from earlier steps is ignored (each step as if it stood alone). It rests on one approximation: that a
check's estimate at the planned sample is normal; sessions of very uneven size skew it.
`tests/rollouts/test_inconclusive_margin.py` measures both on simulated traffic with the real checks:
where a step's minimums bind, its planned sample is 2-3 times the 99th percentile of the step's end on
evidence; where a 10 % TPOT guardrail at 25 % of heavy-tailed sessions decides, 1.3-1.5 times it (1 of 160
A/A rollouts of that plan reached a planned sample undecided).

The step's figure is the largest of its checks', and never below the smallest sample at which its checks
can decide at all (`analysis.checks.step_min_sample`). `step_planned_sample` gives one step's figure: what
the policy compares the step's candidate requests with before applying the plan's `on_inconclusive`
(fixed once the step's minimums are met, `rollouts.analysis.policy`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from django.utils import timezone
from scipy.stats import norm

from experiments.analysis import ArmSums, alias_history
from experiments.metrics import HIGHER, LOWER, METRICS
from experiments.stats import (
    Decision,
    RatioStats,
    design_effect,
    proportion_limit_check,
    ratio_estimate,
    ratio_guardrail_check,
    ratio_limit_check,
    smallest_enough,
)
from rollouts.analysis.checks import (
    check_alpha_share,
    guardrail_breach_share,
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
PAUSE_TARGET = 0.05  # the share of rollouts of a candidate as good as the baseline that may reach a planned sample undecided
MIN_HISTORY_SESSIONS = 30
MAX_N = 10**8
_UNITS = 1000  # sessions of one request each, for the assumed spreads


def _measured(history: ArmSums | None, metric_name: str, threshold: float | None = None,
              prices: tuple[float, float] = (0.0, 0.0)) -> RatioStats | None:  # fmt: skip
    if history is None:
        return None
    stats = history.ratio_for(metric_name, threshold=threshold, prices=prices)
    if stats is None or stats.units < MIN_HISTORY_SESSIONS or stats.den <= 0:
        return None
    return stats


def _per_request(stats: RatioStats) -> tuple[float, float]:
    """(mean, variance per request with the sessions' clustering in it)."""
    est = ratio_estimate(stats)
    return est.mean, est.standard_error_squared * stats.den


def _assumed(mean: float, variance: float) -> RatioStats:
    """_UNITS sessions of one request each with this mean and spread (no clustering)."""
    n = float(_UNITS)
    return RatioStats(_UNITS, num=n * mean, den=n, num_sq=n * (variance + mean * mean), den_sq=n, num_den=n * mean)


def _shifted(stats: RatioStats, delta: float) -> RatioStats:
    """The same sessions with every request's value moved by `delta` (a_i + delta b_i): the same spread and
    clustering, the mean `delta` further on."""
    return replace(
        stats, num=stats.num + delta * stats.den,
        num_sq=max(stats.num_sq + 2.0 * delta * stats.num_den + delta * delta * stats.den_sq, 0.0),
        num_den=stats.num_den + delta * stats.den_sq, num_cov_num=stats.num_cov_num + delta * stats.den_cov_num,
        num_cov_den=stats.num_cov_den + delta * stats.den_cov_den,
    )  # fmt: skip


def _at(stats: RatioStats, n: float) -> RatioStats | None:
    """`stats` grown (or shrunk) to n requests: the same sessions' shape, more of them (None: under two
    sessions)."""
    if round(stats.units * n / stats.den) < 2:
        return None
    return stats.replicated(n / stats.den)


def _planned(metric: str, enough: Callable[[int], bool], assumed: dict[str, Any], unshown: str) -> dict[str, Any]:
    """{"metric", "candidate_n" (or "error"), "assumed"}: the smallest n at which `enough(n)` (the check's own
    test shown safe on data `z` standard errors on the harmful side) holds, up to MAX_N."""
    n = smallest_enough(enough, start=2, limit=MAX_N)
    if n is None:
        return {"metric": metric, "error": f"no sample up to 10^8 shows it{unshown}"}
    return {"metric": metric, "candidate_n": n, "assumed": assumed}


def guardrail_planned_sample(
    *, guardrail: Any, history: RatioStats | None, candidate_share: float, alpha: float, tuning_n: float,
    breach_tuning_n: float, miss: float, breach_alpha: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """{"metric", "candidate_n" (or "error"), "assumed"}: the candidate requests at which the guardrail's own
    check (`ratio_guardrail_check`, one stratum at `candidate_share`) is shown safe with probability
    1 - `miss` at that look when the candidate is as good as the baseline, whose sessions are like
    `history`'s (the baseline's metric over its sessions on the alias; None: assumed spreads). `breach_alpha`:
    the check's breach side's alpha (`rollouts.plans.alpha.guardrail_breach_share`; by default `alpha`)."""
    metric = METRICS[guardrail.metric]
    stats, share, z = history, candidate_share, float(norm.isf(miss))
    assumed: dict[str, Any] = {}
    if stats is None:
        if metric.shape == "proportion":
            rate = ASSUMED_ERROR_RATE if metric.direction == LOWER else 0.5
            stats, assumed["baseline_rate"] = _assumed(rate, rate * (1.0 - rate)), rate
        elif metric.shape == "gmean":
            stats, assumed["log_sd"] = _assumed(0.0, ASSUMED_LOG_SD**2), ASSUMED_LOG_SD
        else:
            stats, assumed["coefficient_of_variation"] = _assumed(1.0, ASSUMED_CV**2), ASSUMED_CV
    mean, variance = _per_request(stats)
    scale = "log" if metric.shape == "gmean" else ("proportion" if metric.shape == "proportion" else "mean")
    if guardrail.margin <= 0 or (guardrail.relative and scale != "log" and mean == 0):
        return {"metric": guardrail.metric, "error": "a margin of 0 cannot be shown"}
    options: dict[str, Any] = {
        "scale": scale, "margin": guardrail.margin, "relative": guardrail.relative, "direction": metric.direction,
        "alpha": alpha, "tuning_n": tuning_n, "breach_tuning_n": breach_tuning_n, "breach_alpha": breach_alpha,
    }  # fmt: skip
    harmful = 1.0 if metric.direction == LOWER else -1.0

    def enough(n_c: int) -> bool:
        n_b = max(n_c * (1.0 - share) / share, 1.0)
        base, cand = _at(stats, n_b), _at(stats, float(n_c))
        if base is None or cand is None:
            return False
        se = math.sqrt(variance / n_b + variance / n_c)
        cand = _shifted(cand, harmful * z * se)
        if scale == "proportion" and not 0.0 <= cand.num <= cand.den:
            return False
        return ratio_guardrail_check(base, cand, **options).decision is Decision.SAFE

    return _planned(guardrail.metric, enough, assumed, ": the margin is too small for the spread")


def slo_planned_sample(*, slo: Any, history: RatioStats | None, alpha: float, tuning_n: float, miss: float) -> dict[str, Any]:
    """{"metric", "candidate_n" (or "error"), "assumed"}: the candidate requests at which the SLO's own check
    (`proportion_limit_check` for a share or a tail, `ratio_limit_check` for a mean) is shown within its limit
    with probability 1 - `miss` at that look when the candidate serves like the baseline did (`history`: the
    baseline's metric over its sessions, the 0/1 share over the limit for a tail; None: assumed)."""
    metric = METRICS[slo.metric]
    stats, z = history, float(norm.isf(miss))
    assumed: dict[str, Any] = {}
    if metric.shape in ("percentile", "proportion"):
        if metric.shape == "percentile":
            limit = 1.0 - float(metric.quantile or 0.99)
        else:
            limit = slo.threshold if slo.op == "<=" else 1.0 - slo.threshold
        deff = per_session = 1.0
        if stats is not None:
            share, _ = _per_request(stats)
            share = share if slo.op == "<=" or metric.shape == "percentile" else 1.0 - share
            if metric.shape == "percentile":
                # A tail SLO counts one request per session (`analysis.checks._tail_slo`): independent, so no
                # design effect; its sessions come at the baseline's requests per session.
                per_session = stats.den / stats.units
            else:
                deff = design_effect(stats)
        else:
            share = limit / 2.0
            assumed["share"] = share
        if share >= limit:
            return {"metric": slo.metric, "error": f"the baseline's share ({share:.3g}) is not within the limit"}

        def enough_share(n: int) -> bool:
            bad = min(n * share + z * math.sqrt(max(share * (1.0 - share), 0.0) * deff * n), float(n))
            found = proportion_limit_check(bad, float(n), limit=limit, alpha=alpha, tuning_n=tuning_n,
                                           design_effect=deff, project=False)  # fmt: skip
            return found.decision is Decision.SAFE

        found = _planned(slo.metric, enough_share, assumed, " within the limit")
        if metric.shape == "percentile" and "candidate_n" in found:
            sessions = found["candidate_n"]
            found.update(candidate_n=math.ceil(sessions * per_session), sessions=sessions)
        return found
    if stats is None:
        return {"metric": slo.metric, "error": "no history on the alias to plan a limit on a mean from"}
    log = metric.shape == "gmean"
    mean, variance = _per_request(stats)
    limit = math.log(slo.threshold) if log else slo.threshold
    if (limit - mean if slo.op == "<=" else mean - limit) <= 0:
        return {"metric": slo.metric, "error": "the baseline itself is not within the limit"}
    direction = LOWER if slo.op == "<=" else HIGHER
    harmful = 1.0 if direction == LOWER else -1.0

    def enough_mean(n: int) -> bool:
        grown = _at(stats, float(n))
        if grown is None:
            return False
        grown = _shifted(grown, harmful * z * math.sqrt(variance / n))
        found = ratio_limit_check(grown, threshold=slo.threshold, log=log, direction=direction, alpha=alpha,
                                  tuning_n=tuning_n)  # fmt: skip
        return found.decision is Decision.SAFE

    return _planned(slo.metric, enough_mean, assumed, " within the limit")


def _history(plan: Plan, baseline: ModelVersion | None) -> tuple[ArmSums | None, float]:
    if baseline is None:
        return None, 0.0
    sums, rate = alias_history(
        alias=plan.alias, model_version_id=baseline.pk, since=timezone.now() - HISTORY, thresholds=plan.latency_thresholds
    )
    return (sums if sums.requests else None), rate


def _share(plan: Plan, index: int) -> float:
    step = plan.steps[index]
    return step.weight if step.weight > 0 else step.shadow_rate / (1.0 + step.shadow_rate)


def _checks_in_step(plan: Plan, index: int) -> int:
    share = _share(plan, index)
    return len(plan.slos) + (len(plan.guardrails) if 0 < share < 1 else 0)


def step_miss(plan: Plan, index: int) -> float:
    """Each check's allowed chance of not being shown safe at step `index`'s planned sample when the candidate
    is as good as the baseline: PAUSE_TARGET over the steps with checks and over the step's checks (the
    module docstring: a union bound, so that at most PAUSE_TARGET of such rollouts ever pause undecided)."""
    steps = sum(1 for i in range(len(plan.steps)) if _checks_in_step(plan, i))
    return PAUSE_TARGET / max(steps, 1) / max(_checks_in_step(plan, index), 1)


def _step_entry(plan: Plan, index: int, history: ArmSums | None, rate: float,
                prices: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:  # fmt: skip
    step = plan.steps[index]
    alpha = check_alpha_share(plan)
    share = _share(plan, index)
    miss = step_miss(plan, index)
    entry: dict[str, Any] = {"step": index, "weight": step.weight, "shadow_rate": step.shadow_rate, "checks": [],
                             "miss_per_check": round(miss, 6)}  # fmt: skip
    for slo in plan.slos:
        measured = _measured(history, slo.metric, threshold=slo.threshold if METRICS[slo.metric].shape == "percentile" else None)
        need = slo_planned_sample(slo=slo, history=measured, alpha=alpha, tuning_n=slo_tuning_n(plan, slo), miss=miss)
        entry["checks"].append({"check": slo.label, **need})
    if 0 < share < 1:
        for guardrail in plan.guardrails:
            if METRICS[guardrail.metric].shape == "percentile":
                # A tail guardrail's own planning (`analysis.checks`, in sessions; the lognormal approximation of
                # its rank bounds, at the same miss).
                tail = tail_guardrail_need(guardrail, share=share, alpha=alpha, tuning_n=guardrail_tuning_n(plan, guardrail),
                                           history=history, power=1.0 - miss)  # fmt: skip
                entry["checks"].append({"check": guardrail.label, **tail})
                continue
            need = guardrail_planned_sample(
                guardrail=guardrail, history=_measured(history, guardrail.metric, prices=prices), candidate_share=share,
                alpha=alpha, tuning_n=guardrail_tuning_n(plan, guardrail),
                breach_tuning_n=guardrail_tuning_n(plan, guardrail, breach=True), miss=miss,
                breach_alpha=guardrail_breach_share(plan),
            )  # fmt: skip
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


def _prices(baseline: ModelVersion | None) -> tuple[float, float]:
    if baseline is None:
        return 0.0, 0.0
    return float(baseline.price_input_per_million), float(baseline.price_output_per_million)


def plan_sample_sizes(*, plan: Plan, baseline: ModelVersion | None) -> dict[str, Any]:
    """{"basis": what the estimate rests on, "steps": [{step, weight, checks, candidate_n, min_n, ...}]}."""
    history, rate = _history(plan, baseline)
    steps = [_step_entry(plan, index, history, rate, _prices(baseline)) for index in range(len(plan.steps))]
    judged = sum(1 for index in range(len(plan.steps)) if _checks_in_step(plan, index))
    basis = {
        "window_s": int(HISTORY.total_seconds()),
        "baseline_requests": history.requests if history is not None else 0,
        "baseline_sessions": history.sessions if history is not None else 0,
        "alias_requests_per_s": round(rate, 3),
        # The chance that a step whose candidate is as good as the baseline has ended by its planned sample.
        "power": round(1.0 - PAUSE_TARGET / max(judged, 1), 4),
        "pause_target": PAUSE_TARGET,
        "alpha_share": check_alpha_share(plan),
        "note": "requests at which the rollout's own always-valid checks show all of a step's checks safe when the "
                f"candidate is as good as the baseline (each check at 1 - {PAUSE_TARGET:.0%} / (steps x checks), so "
                f"that at most {PAUSE_TARGET:.0%} of such rollouts reach a planned sample undecided)",
    }  # fmt: skip
    return {"basis": basis, "steps": steps}


def step_planned_sample(*, plan: Plan, baseline: ModelVersion | None, step_index: int) -> int | None:
    """The candidate requests step `step_index` is planned to need (`plan_sample_sizes`' figure for it)."""
    history, rate = _history(plan, baseline)
    value = _step_entry(plan, step_index, history, rate, _prices(baseline)).get("candidate_n")
    return int(value) if value is not None else None
