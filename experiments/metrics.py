"""The metrics a rollout can watch, measured per arm at the gateway (DESIGN.md, "Metric definitions").

A plan names metrics by these names in its SLOs, guardrails and primary metric. Each has a shape that
says how the analysis gets sufficient statistics for it from SQL aggregates:

- ``gmean``: a latency compared on the log scale, as the ratio of geometric means over successful
  requests: the default for latency guardrails (a heavy right tail weighs far less than on the mean);
- ``mean``: a per-request number averaged over successful requests (the arithmetic mean, by name);
- ``percentile``: a tail, on one request per session (`experiments.analysis.tails`). As an SLO
  ("ttft_p99_ms <= 800"), the share of sessions whose first request was over the threshold; as a
  guardrail, the arms' quantiles of those first requests, compared with a relative margin
  (`experiments.stats.quantiles`);
- ``proportion``: a 0/1 per request (an error) or per outcome event (thumbs up).

Sessions, not requests, are the units of every comparison (`experiments.analysis`): each of these is a
ratio over sessions of the session's sum and its count of requests measured.
"""

from __future__ import annotations

from dataclasses import dataclass

LOWER = "lower_is_better"
HIGHER = "higher_is_better"


@dataclass(frozen=True)
class Metric:
    name: str
    shape: str  # mean | percentile | proportion
    direction: str
    unit: str
    description: str
    # The request-record field for latency metrics; the outcome kind for outcome metrics.
    source: str = ""
    quantile: float | None = None
    outcome: bool = False

    @property
    def is_latency(self) -> bool:
        return self.source in LATENCY_FIELDS.values()


LATENCY_FIELDS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2e": "e2e_ms"}
_LATENCY_WORDS = {"ttft": "time to first token", "tpot": "time per output token", "e2e": "end-to-end latency"}
QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


def _catalogue() -> dict[str, Metric]:
    metrics: dict[str, Metric] = {}
    for short, field in LATENCY_FIELDS.items():
        words = _LATENCY_WORDS[short]
        metrics[f"{short}_gmean_ms"] = Metric(
            f"{short}_gmean_ms", "gmean", LOWER, "ms",
            f"geometric mean {words} of successful requests (compared as a ratio, on the log scale)", source=field,
        )  # fmt: skip
        metrics[f"{short}_mean_ms"] = Metric(
            f"{short}_mean_ms", "mean", LOWER, "ms", f"arithmetic mean {words} of successful requests", source=field
        )
        for label, quantile in QUANTILES.items():
            metrics[f"{short}_{label}_ms"] = Metric(
                f"{short}_{label}_ms", "percentile", LOWER, "ms",
                f"{label} {words}: as an SLO, the share of sessions whose first request is over the limit stays under "
                f"{1 - quantile:.0%}",
                source=field, quantile=quantile,
            )  # fmt: skip
    metrics["error_rate"] = Metric(
        "error_rate", "proportion", LOWER, "share",
        "share of requests that failed at the engine (5xx, connection failure, in-stream error, cut stream, "
        "no engine); client 4xx and cancelled requests are not counted",
    )
    metrics["goodput"] = Metric(
        "goodput", "proportion", HIGHER, "share",
        "share of requests that succeeded and met every latency threshold of the rollout's percentile SLOs",
    )
    metrics["cost_per_request"] = Metric(
        "cost_per_request", "mean", LOWER, "price units",
        "prompt and completion tokens times the version's price per million tokens, per successful request",
    )
    metrics["completion_tokens_mean"] = Metric(
        "completion_tokens_mean", "mean", LOWER, "tokens", "mean completion tokens of successful requests"
    )
    metrics["thumbs_up_rate"] = Metric(
        "thumbs_up_rate", "proportion", HIGHER, "share", "share of thumbs-up among thumbs outcome events",
        source="thumbs", outcome=True,
    )
    metrics["success_rate"] = Metric(
        "success_rate", "proportion", HIGHER, "share", "share of successes among success outcome events",
        source="success", outcome=True,
    )
    metrics["outcome_value_mean"] = Metric(
        "outcome_value_mean", "mean", HIGHER, "value", "mean of value outcome events",
        source="value", outcome=True,
    )
    return metrics


METRICS: dict[str, Metric] = _catalogue()


def metric_get(name: str) -> Metric | None:
    return METRICS.get(name)
