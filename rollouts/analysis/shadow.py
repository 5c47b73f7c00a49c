"""Latency guardrails of a shadow step, compared request by request, the sessions as units.

In a shadow step no user sees the candidate; its answers come from the mirror task, which asks the
baseline the same request at the same moment through the same code (serving.gateway.shadow). So each
shadow pair is a matched comparison, and a paired test removes what the two sides share (the prompt's
length, the machine's load at that moment), which two independent arms would leave in the noise.

The pairs of one session are not independent, though: a sticky user sends many requests (how many is
heavy-tailed) and their own kind of prompt, so their pairs share an effect. As for the live guardrails
(DESIGN.md, "Real traffic and production"), each per-pair statistic below is a ratio over sessions, the
sum of its sessions' totals over their count of pairs, with the delta-method variance
(experiments.analysis.paired); a pair with no session is its own unit:

- a geometric-mean metric (`tpot_gmean_ms`, the log scale) with a relative margin: the per-pair log ratio
  ln(candidate / baseline), whose mean is the log of the ratio of geometric means, at most ln(1 + m);
- an arithmetic-mean metric (`tpot_mean_ms`) with a relative margin: the per-pair c - (1 + m) b at most 0
  (mean c <= (1 + m) mean b, Fieller's way: no ratio's variance to estimate);
- a margin in ms: the per-pair difference c - b at most m.

Each with the one-sample always-valid bound of experiments.stats (the analysis looks every interval, its
"time" the number of pairs, as ratio_checks.ratio_limit_check), at the guardrail's share of the rollout's
alpha, reported on the harm scale the other guardrails use.
"""

from __future__ import annotations

import math
from typing import Any

from experiments.analysis import PairedLatency
from experiments.metrics import Metric
from experiments.stats import Decision, RatioStats, estimate_limit_check, ratio_estimate
from rollouts.analysis.look import num

# Below this many units (sessions, or pairs without one) the normal approximation of the bound is not
# trusted: a variance from a handful of sessions can be near zero (experiments.stats.ratio_checks).
MIN_PAIRS = 30


def shadow_latency_guardrail(
    guardrail: Any, metric: Metric, paired: PairedLatency, *, alpha: float, tuning_n: float,
    breach_alpha: float | None = None,
) -> dict[str, Any]:
    """The check fields (decision, effect, low, high, p, n, test, baseline, candidate) of a latency
    guardrail on shadow pairs: positive effect is worse, a fraction when the margin is relative. The lower
    bound, which calls a breach, at ``breach_alpha`` (by default ``alpha``; `rollouts.plans.alpha`)."""
    sums = paired.fields[metric.source]
    log_scale = metric.shape == "gmean" and guardrail.relative
    stats: RatioStats
    if log_scale:
        stats, threshold = sums.log_ratio(), math.log1p(guardrail.margin)
        test = "paired shadow requests: ratio of geometric means (mean per-pair log ratio, sessions as units)"
    elif guardrail.relative:
        stats, threshold = sums.scaled_difference(1.0 + guardrail.margin), 0.0
        test = "paired shadow requests: ratio of means (per-pair candidate - (1 + margin) baseline, sessions as units)"
    else:
        stats, threshold = sums.scaled_difference(1.0), float(guardrail.margin)
        test = "paired shadow requests: mean per-pair difference (ms, sessions as units)"
    out: dict[str, Any] = {"n": [sums.n, sums.n], "test": test, "more_n": None}
    if sums.units < MIN_PAIRS:
        return {**out, "decision": Decision.UNDECIDED.value,
                "reason": f"{sums.n} shadow pairs timed on both sides, from {sums.units} sessions (a pair without "
                          f"one its own); a decision needs at least {MIN_PAIRS}"}  # fmt: skip
    estimate = ratio_estimate(stats)
    result = estimate_limit_check(
        estimate.mean, estimate.standard_error_squared, threshold=threshold, direction="lower_is_better",
        alpha=alpha, tuning_n=tuning_n, n_total=stats.den, n=sums.n, breach_alpha=breach_alpha,
    )  # fmt: skip
    if log_scale:
        effect, low, high = (math.expm1(v) for v in (result.estimate, result.lower_bound, result.upper_bound))
    elif guardrail.relative:
        # Bounds of mean(c - (1 + m) b), read as bounds of the relative harm with the baseline mean as known.
        base = sums.baseline_mean
        effect = sums.candidate_mean / base - 1.0
        low = result.lower_bound / base + guardrail.margin
        high = result.upper_bound / base + guardrail.margin
    else:
        effect, low, high = result.estimate, result.lower_bound, result.upper_bound
    return {
        **out, "decision": result.decision.value, "effect": num(effect), "low": num(low), "high": num(high),
        "p": num(result.p_value), "reason": result.reason,
        # The replayed sides' arithmetic means (on the log scale the decision is on their geometric means).
        **({} if log_scale else {"baseline": num(sums.baseline_mean), "candidate": num(sums.candidate_mean)}),
    }  # fmt: skip
