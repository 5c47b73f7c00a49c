"""Whole rollouts of the step policy on simulated traffic, without the database: the statistical core of
`benchmarks/decision_policy.py`, fast enough for the suite. Used by the margin tests of the bake
(`test_bake_margin.py`) and of `on_inconclusive` (`test_inconclusive_margin.py`).

What is real: the traffic (`experiments.stats.simulation`: users arriving and leaving, sticky to an arm as
the gateway's hash makes them, so a user on the candidate at 25 % stays there at 50 % and through the bake;
lognormal requests per user; a per-user latency factor and error rate; a heavy tail); the checks
(`ratio_guardrail_check` for the TPOT and error-rate guardrails, over one stratum per step as
`rollouts.analysis.checks.measure` pools them, and `proportion_limit_check` for an error-rate SLO over the
candidate's requests of every live step, with the plan's alpha share, each guardrail's breach side at
`guardrail_breach_share` (half the share beside its check on the bake alone), and each check's N*); the
plan's steps as normalised (minimums with their floors, the policy's 60 s floor on durations); each step's planned sample
from `rollouts.planning` (the same functions the policy calls, on the history of the baseline serving the
alias alone for 20 minutes first, or as many looks as `planned_samples` is given: the planner reads the
last hour, `rollouts.planning.HISTORY`); and the rules of `rollouts.analysis.policy`: a breach rolls back at any
look, a step ends when its minimums are met and no check holds it (`holding_checks`), its planned sample
reached with a check holding applies `on_inconclusive`, and the last step's end bakes: the candidate at
1 - holdout of the sessions (the sessions the gateway's hash put furthest from the candidate stay on the
baseline), compared with the holdout on the same checks pooled with the steps' strata, and each guardrail on
the bake's stratum alone (`rollouts.analysis.checks.bake_alone_checks`, at the other half of the guardrail's
breach side and with its N*), for `bake_s`; a
breach of either then rolls back, the end of the bake promotes.

Left out: checks the simulator has no data for (cost per request, TTFT tails) and the SRM check; a paused
rollout is left paused (a person would decide).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from experiments.metrics import METRICS
from experiments.stats import (
    Decision,
    RatioStats,
    design_effect,
    proportion_limit_check,
    ratio_guardrail_check,
)
from experiments.stats.simulation import (
    METRIC_TOTALS,
    Effect,
    Traffic,
    Users,
    arm_look,
    draw_interval,
    draw_users,
    interval_totals,
)
from rollouts import planning
from rollouts.analysis.checks import bake_alone_tuning_n, guardrail_tuning_n, slo_tuning_n
from rollouts.analysis.policy import holding_checks
from rollouts.plans import Plan
from rollouts.plans.alpha import bake_alone_name, bakes_alone, check_alpha_share, guardrail_breach_share
from rollouts.plans.model import MIN_STEP_DURATION_S

RATE = 20.0  # requests per second on the alias
SPAN_S = 900.0  # how long a user stays
HISTORY_LOOKS = 120  # the baseline alone before the rollout: what the planned samples are estimated from
# The simulator's metric for each check's metric (TOTALS of `experiments.stats.simulation`).
SOURCES = {"tpot_gmean_ms": "tpot_log", "error_rate": "errors"}


@dataclass
class Ended:
    """Per simulated rollout (arrays of length sims)."""

    promoted: np.ndarray
    rolled_back: np.ndarray
    paused: np.ndarray
    rolled_back_in_bake: np.ndarray
    rolled_back_before_half: np.ndarray
    inconclusive: np.ndarray  # reached a planned sample with a check still holding (whatever the rule did then)
    # Rolled back in the bake by a guardrail's check on the bake alone, the pooled checks not breached then.
    rolled_back_by_bake_alone: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    planned: list[int | None] = field(default_factory=list)  # each step's planned sample
    # Per rollout that reached a planned sample undecided: (the step, the checks holding it there).
    undecided: dict[int, tuple[int, list[str]]] = field(default_factory=dict)
    step_ends: dict[int, list[float]] = field(default_factory=dict)  # per step: candidate requests when it ended on evidence


def _traffic(looks: int, look_s: float) -> Traffic:
    base = Traffic()
    mean_requests = base.requests_median * math.exp(base.requests_sigma**2 / 2.0)
    return base.with_(users=round(RATE * look_s * (looks + SPAN_S / look_s) / mean_requests))


def _stats(sums: dict[str, dict[str, np.ndarray]], units: np.ndarray, name: str, sim: int) -> RatioStats:
    return RatioStats(int(units[sim]), **{k: float(v[sim]) for k, v in sums[name].items()})


def _totals_of(metric: str) -> tuple[str, ...]:
    num, den, covariate = METRIC_TOTALS[metric]
    return (num, den, *(covariate or ()))


def _rows(users: Users, rows: np.ndarray) -> Users:
    return Users(**{f.name: (value[rows] if isinstance(value := getattr(users, f.name), np.ndarray) else value)
                    for f in fields(Users)})  # fmt: skip


class SimulatedHistory:
    """What `rollouts.planning` reads of the alias's history (`ArmSums.ratio_for`), from simulated RatioStats
    per metric name (None for a metric the simulator has no data for)."""

    def __init__(self, stats: dict[str, RatioStats]) -> None:
        self.stats = stats

    def ratio_for(self, metric: Any, threshold: float | None = None, prices: tuple[float, float] = (0.0, 0.0)) -> Any:
        return self.stats.get(metric if isinstance(metric, str) else metric.name)


def baseline_history(seed: int, look_s: float, looks: int = HISTORY_LOOKS) -> SimulatedHistory:
    """`looks` of the baseline serving the alias alone, before the rollout (`SOURCES`' metrics)."""
    rng = np.random.default_rng([seed, 7])
    traffic = _traffic(looks, look_s)
    users = draw_users(rng, traffic, Effect(), sims=1, looks=looks, span=SPAN_S / look_s, lead=SPAN_S / look_s)
    totals: dict[str, np.ndarray] = {}
    nobody = np.zeros(users.shape, dtype=bool)
    for look in range(1, looks + 1):
        for name, values in interval_totals(draw_interval(rng, traffic, Effect(), users, look, nobody), users.shape).items():
            totals[name] = totals.get(name, 0.0) + values
    arm = arm_look(totals, np.ones(users.shape, dtype=bool), tuple(SOURCES.values()))
    return SimulatedHistory({metric: arm.ratio(source, 0) for metric, source in SOURCES.items()})


def planned_from(step_entry: Callable[..., dict[str, Any]], plan: Plan, history: SimulatedHistory) -> list[int | None]:
    """Each step's planned sample from a planning module's `_step_entry` (this one's or, in
    `benchmarks/planned_sample.py`, an older one's) on `history`: the largest of its checks on `SOURCES`'
    metrics, never below the step's minimum (as the policy stores it); None where none of them has a figure."""
    out: list[int | None] = []
    for index, step in enumerate(plan.steps):
        entry = step_entry(plan, index, history, 0.0)
        needs = [int(c["candidate_n"]) for c in entry["checks"] if "candidate_n" in c and c.get("metric") in SOURCES]
        out.append(max([*needs, step.min_candidate_requests]) if needs else None)
    return out


def planned_samples(plan: Plan, seed: int, look_s: float, looks: int = HISTORY_LOOKS) -> list[int | None]:
    """Each step's planned sample as `rollouts.planning` computes it (over the plan's checks the simulator can
    measure, whichever of them `simulate` computes), from `baseline_history` (`looks` of it)."""
    return planned_from(planning._step_entry, plan, baseline_history(seed, look_s, looks))


def simulate(
    plan: Plan, *, effect: Effect, seed: int, sims: int, looks: int, look_s: float = 10.0,
    bake_effect: Effect | None = None, metrics: tuple[str, ...] = ("tpot_gmean_ms", "error_rate"),
    planned: list[int | None] | None = None,
) -> Ended:  # fmt: skip
    """`sims` rollouts of `plan` for at most `looks` looks, the candidate's `effect` in its steps and
    `bake_effect` (default the same) once it bakes; only the checks on `metrics` are computed. `planned`:
    each step's planned sample (default `planned_samples`, as `rollouts.planning` computes it)."""
    alpha, breach_alpha = check_alpha_share(plan), guardrail_breach_share(plan)
    guardrails = [g for g in plan.guardrails if g.metric in metrics]
    slos = [s for s in plan.slos if s.metric in metrics]
    options: dict[str, dict[str, Any]] = {
        g.label: {
            "scale": "log" if METRICS[g.metric].shape == "gmean" else "proportion", "margin": g.margin,
            "relative": g.relative, "direction": METRICS[g.metric].direction, "alpha": alpha,
            "tuning_n": guardrail_tuning_n(plan, g), "breach_tuning_n": guardrail_tuning_n(plan, g, breach=True),
            "breach_alpha": breach_alpha,
        }
        for g in guardrails
    }  # fmt: skip
    # The guardrails on the bake's stratum alone: only their breach acts, at the other half of the breach side
    # (`rollouts.analysis.checks.bake_alone_checks`: both bounds at it).
    alone = {g.label: {**options[g.label], "alpha": breach_alpha, "breach_tuning_n": bake_alone_tuning_n(plan, g)}
             for g in guardrails if bakes_alone(plan)}  # fmt: skip
    planned = planned if planned is not None else planned_samples(plan, seed, look_s)
    weights = [s.weight for s in plan.steps] + [1.0 - plan.holdout]  # the bake is one more stratum
    bake = len(plan.steps)
    min_looks = [math.ceil(max(s.min_duration_s, MIN_STEP_DURATION_S) / look_s) for s in plan.steps]
    min_looks.append(math.ceil(plan.bake_s / look_s))
    min_requests = [s.min_candidate_requests for s in plan.steps] + [0]
    traffic = _traffic(looks, look_s)
    rng = np.random.default_rng(seed)
    shape = (sims, traffic.users)
    span = SPAN_S / look_s
    users = draw_users(rng, traffic, effect, sims=sims, looks=looks, span=span, lead=span)
    sticky = rng.random(shape)  # the gateway's hash of each session: on the candidate while below the weight
    wanted = tuple(dict.fromkeys(SOURCES[m] for m in [*(g.metric for g in guardrails), *(x.metric for x in slos)]))
    # The per-user totals those metrics need (and `requests`); strata only where a check reads them.
    kept = tuple(dict.fromkeys([*(name for w in wanted for name in _totals_of(w)), "requests"]))
    strata = {i: {name: np.zeros(shape) for name in kept} for i, w in enumerate(weights) if (slos and w > 0.0) or 0.0 < w < 1.0}
    step = np.zeros(sims, dtype=int)
    step_looks = np.zeros(sims, dtype=int)
    step_requests = np.zeros(sims)
    max_weight = np.full(sims, weights[0])
    state = np.zeros(sims, dtype=int)  # 0 live, 1 promoted, 2 rolled back, 3 paused
    rolled_back_in_bake = np.zeros(sims, dtype=bool)
    by_bake_alone = np.zeros(sims, dtype=bool)
    inconclusive = np.zeros(sims, dtype=bool)
    step_ends: dict[int, list[float]] = {i: [] for i in range(len(plan.steps))}
    undecided: dict[int, tuple[int, list[str]]] = {}
    weight_of = np.array(weights)
    for look in range(1, looks + 1):
        live = state == 0
        if not live.any():
            break
        # Only the live rollouts' users send requests (the others ended): draws over their rows alone.
        rows = np.flatnonzero(live)
        sub = _rows(users, rows)
        on_candidate = sticky[rows] < weight_of[step[rows]][:, None]
        baking = step[rows] == bake
        sub_shape = (rows.size, traffic.users)
        if bake_effect is not None and baking.any():
            # Two draws, one per effect, each kept for its own rollouts (the users are the same).
            batch = draw_interval(rng, traffic, effect, sub, look, on_candidate & ~baking[:, None])
            extra = draw_interval(rng, traffic, bake_effect, sub, look, on_candidate & baking[:, None])
            added, bake_added = interval_totals(batch, sub_shape), interval_totals(extra, sub_shape)
            added = {k: np.where(baking[:, None], bake_added[k], added[k]) for k in added}
            owner = np.concatenate([batch.owner, extra.owner]) // traffic.users
            on_cand = np.concatenate([batch.candidate & ~baking[batch.owner // traffic.users],
                                      extra.candidate & baking[extra.owner // traffic.users]])  # fmt: skip
        else:
            batch = draw_interval(rng, traffic, effect, sub, look, on_candidate)
            added = interval_totals(batch, sub_shape)
            owner, on_cand = batch.owner // traffic.users, batch.candidate
        step_requests[rows] += np.bincount(owner, weights=on_cand.astype(float), minlength=rows.size)
        step_looks[rows] += 1
        for i in strata:
            here = step[rows] == i
            if here.any():
                for name in kept:
                    strata[i][name][rows[here]] += added[name][here]
        reached = int(step[live].max())
        position = np.full(sims, -1)
        position[rows] = np.arange(rows.size)
        arms = {}
        for i in strata:
            # Guardrails compare the split steps; SLOs sum the candidate over every live step.
            if i <= reached:
                part = {name: strata[i][name][rows] for name in kept}
                arms[i] = (arm_look(part, sticky[rows] >= weights[i], wanted), arm_look(part, sticky[rows] < weights[i], wanted))
        for s in rows:
            at = int(position[s])
            current = int(step[s])
            compared = [i for i in arms if i <= current and 0.0 < weights[i] < 1.0]
            checks: list[dict[str, Any]] = []
            for g in guardrails:
                source = SOURCES[g.metric]
                bases = [arms[i][0].ratio(source, at) for i in compared]
                cands = [arms[i][1].ratio(source, at) for i in compared]
                decision = Decision.UNDECIDED.value
                if bases:
                    decision = ratio_guardrail_check(bases, cands, **options[g.label]).decision.value
                checks.append({"type": "guardrail", "name": g.label, "metric": g.metric, "decision": decision})
                if current == bake and g.label in alone and bake in arms:
                    found = ratio_guardrail_check(arms[bake][0].ratio(source, at), arms[bake][1].ratio(source, at),
                                                  **alone[g.label]).decision.value  # fmt: skip
                    checks.append({"type": "guardrail", "name": bake_alone_name(g.label), "metric": g.metric,
                                   "decision": found, "scope": "bake alone"})  # fmt: skip
            for slo in slos:
                total = None
                for i in arms:
                    if i <= current:
                        stats = arms[i][1].ratio(SOURCES[slo.metric], at)
                        total = stats if total is None else total.merge(stats)
                decision = Decision.UNDECIDED.value
                if total is not None and total.den > 0:
                    decision = proportion_limit_check(
                        total.num, total.den, limit=slo.threshold, alpha=alpha, tuning_n=slo_tuning_n(plan, slo),
                        design_effect=design_effect(total), project=False,
                    ).decision.value  # fmt: skip
                checks.append({"type": "slo", "name": slo.label, "metric": slo.metric, "decision": decision})
            breached = [c for c in checks if c["decision"] == Decision.BREACH.value]
            if breached:
                state[s] = 2
                rolled_back_in_bake[s] = current == bake
                by_bake_alone[s] = all(c.get("scope") == "bake alone" for c in breached)
                continue
            minimums = step_looks[s] >= min_looks[current] and step_requests[s] >= min_requests[current]
            if current == bake:
                if minimums:
                    state[s] = 1  # the bake passed
                continue
            if not minimums:
                continue
            holding = holding_checks(checks, weight=float(weights[current]))
            due = planned[current]
            go_on = not holding
            if go_on:
                step_ends[current].append(float(step_requests[s]))
            elif due is not None and step_requests[s] >= due:
                inconclusive[s] = True
                undecided.setdefault(int(s), (current, [c["name"] for c in holding]))
                if plan.on_inconclusive == "pause":
                    state[s] = 3
                elif plan.on_inconclusive == "rollback":
                    state[s] = 2
                else:
                    go_on = True
            if go_on:
                nxt = current + 1
                if nxt == bake and plan.bake_s <= 0:
                    state[s] = 1
                else:
                    step[s], step_looks[s], step_requests[s] = nxt, 0, 0.0
                    max_weight[s] = max(max_weight[s], weights[nxt])
    rolled_back = state == 2
    return Ended(
        promoted=state == 1, rolled_back=rolled_back, paused=state == 3, rolled_back_in_bake=rolled_back_in_bake,
        rolled_back_before_half=rolled_back & (max_weight < 0.5), inconclusive=inconclusive, planned=planned,
        step_ends=step_ends, undecided=undecided, rolled_back_by_bake_alone=by_bake_alone,
    )  # fmt: skip
