"""Latency guardrails of a shadow step, compared request by request.

In a shadow step no user sees the candidate; its answers come from the mirror task, which asks the
baseline the same request at the same moment through the same code (serving.gateway.shadow). So each
shadow pair is a matched comparison, and a paired test removes what the two sides share (the prompt's
length, the machine's load at that moment), which two independent arms would leave in the noise.

- a geometric-mean metric (`tpot_gmean_ms`, the log scale) with a relative margin: the per-pair log ratio
  ln(candidate / baseline), whose mean is the log of the ratio of geometric means, at most ln(1 + m);
- an arithmetic-mean metric (`tpot_mean_ms`) with a relative margin: the per-pair c - (1 + m) b at most 0
  (mean c <= (1 + m) mean b, Fieller's way: no ratio's variance to estimate);
- a margin in ms: the per-pair difference c - b at most m.

Each with the one-sample always-valid bound of experiments.stats (the analysis looks every interval), at
the guardrail's share of the rollout's alpha, reported on the harm scale the other guardrails use.
"""

from __future__ import annotations

import math
from typing import Any

from experiments.analysis import PairedLatency
from experiments.metrics import Metric
from experiments.stats import ArmStats, Decision, mean_slo_check
from rollouts.analysis.look import num

MIN_PAIRS = 30  # below this the normal approximation of the bound is not trusted (experiments.stats)


def shadow_latency_guardrail(
    guardrail: Any, metric: Metric, paired: PairedLatency, *, alpha: float, tuning_n: float
) -> dict[str, Any]:
    """The check fields (decision, effect, low, high, p, n, test, baseline, candidate) of a latency
    guardrail on shadow pairs: positive effect is worse, a fraction when the margin is relative."""
    sums = paired.fields[metric.source]
    log_scale = metric.shape == "gmean" and guardrail.relative
    stats: ArmStats
    if log_scale:
        stats, threshold = sums.log_ratio(), math.log1p(guardrail.margin)
        test = "paired shadow requests: ratio of geometric means (mean per-pair log ratio)"
    elif guardrail.relative:
        stats, threshold = sums.scaled_difference(1.0 + guardrail.margin), 0.0
        test = "paired shadow requests: ratio of means (per-pair candidate - (1 + margin) baseline)"
    else:
        stats, threshold = sums.scaled_difference(1.0), float(guardrail.margin)
        test = "paired shadow requests: mean per-pair difference (ms)"
    out: dict[str, Any] = {"n": [sums.n, sums.n], "test": test, "more_n": None}
    if sums.n < MIN_PAIRS:
        return {**out, "decision": Decision.UNDECIDED.value,
                "reason": f"{sums.n} shadow pairs timed on both sides; a decision needs at least {MIN_PAIRS}"}  # fmt: skip
    result = mean_slo_check(stats, threshold=threshold, direction="lower_is_better", alpha=alpha, tuning_n=tuning_n,
                            min_n=MIN_PAIRS)  # fmt: skip
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
