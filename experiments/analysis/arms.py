"""One arm's statistics of a window, by metric: ``ArmSums`` (per-unit moments from SQL, outcome events,
display percentiles) and ``arm_summary``, the compact JSON a look stores and the pages chart."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from experiments.analysis.sessions import RatioSpec, UnitMoments
from experiments.metrics import METRICS, Metric
from experiments.stats import RatioStats


@dataclass(frozen=True)
class ArmSums:
    """An arm's window: ``moments`` over its units (sessions), the metric ``specs`` they were computed for,
    the latency ``thresholds`` of tail SLOs (each has an over-threshold count), outcome events as ratios over
    units by kind, and nearest-rank percentiles for display."""

    moments: UnitMoments = field(default_factory=UnitMoments)
    specs: Mapping[str, RatioSpec] = field(default_factory=dict)
    thresholds: Mapping[str, Sequence[float]] = field(default_factory=dict)
    outcomes: Mapping[str, RatioStats] = field(default_factory=dict)
    percentiles: Mapping[str, float | None] = field(default_factory=dict)

    def _count(self, column: str) -> int:
        return round(self.moments.total(column))

    @property
    def requests(self) -> int:
        return self._count("requests")

    @property
    def counted(self) -> int:
        """The denominator of rates: every request but client errors and cancellations."""
        return self._count("counted")

    @property
    def errors(self) -> int:
        return self._count("errors")

    @property
    def ok(self) -> int:
        return self._count("ok")

    @property
    def good(self) -> int:
        return self._count("good")

    @property
    def sessions(self) -> int:
        return self.moments.units

    @property
    def exposed(self) -> int:
        """Sessions whose first (non-failover) request in the window went to this arm."""
        return self.moments.exposed

    def ratio_for(
        self, metric: Metric | str, *, threshold: float | None = None, prices: tuple[float, float] = (0.0, 0.0)
    ) -> RatioStats | None:
        """The metric as a ratio over this arm's sessions, or None when the window cannot measure it.

        Percentile metrics give the 0/1 "over ``threshold``" share (a tail SLO); ``cost_per_request`` weighs
        prompt and completion tokens by the prices per million."""
        if isinstance(metric, str):
            metric = METRICS[metric]
        if metric.outcome:
            return self.outcomes.get(metric.source, RatioStats.empty())
        key: str
        coefficients: list[float] | None = None
        if metric.shape == "percentile":
            limits = list(self.thresholds.get(metric.source, ()))
            if threshold is None or threshold not in limits:
                return None
            key = f"{metric.source}:over{limits.index(threshold)}"
        elif metric.shape == "gmean":
            key = f"{metric.source}:log"
        elif metric.is_latency:
            key = f"{metric.source}:mean"
        elif metric.name in ("error_rate", "goodput"):
            key = metric.name
        elif metric.name in ("cost_per_request", "completion_tokens_mean"):
            key = "tokens"
            spec = self.specs.get(key)
            if spec is None:
                return None
            if metric.name == "cost_per_request":
                if len(spec.num) < 2:
                    return None  # no prompt tokens (shadow replies): cost is not comparable
                coefficients = [prices[0] / 1e6, prices[1] / 1e6]
            else:
                coefficients = [0.0] * (len(spec.num) - 1) + [1.0]
        else:
            return None
        spec = self.specs.get(key)
        if spec is None:
            return None
        return self.moments.ratio(spec, coefficients)

    def merge(self, other: ArmSums) -> ArmSums:
        """Two windows of the same arm (steps), for what is pooled by summing: SLOs and the summary."""
        outcomes = {k: self.outcomes.get(k, RatioStats.empty()) + other.outcomes.get(k, RatioStats.empty())
                    for k in {*self.outcomes, *other.outcomes}}  # fmt: skip
        return ArmSums(
            self.moments.merge(other.moments), {**other.specs, **self.specs}, self.thresholds or other.thresholds,
            outcomes, {},
        )  # fmt: skip


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.5g}")


def arm_summary(
    sums: ArmSums, *, window_s: float | None = None, prices: tuple[float, float] = (0.0, 0.0)
) -> dict[str, Any]:
    """Compact per-arm JSON for an analysis row or an event's evidence (what the UI charts)."""

    def ratio(stats: RatioStats | None, *, log: bool = False) -> float | None:
        if stats is None or stats.den <= 0:
            return None
        return _round(math.exp(stats.ratio) if log else stats.ratio)

    summary: dict[str, Any] = {
        "n": sums.requests,
        "sessions": sums.sessions,
        "exposed": sums.exposed,
        "errors": sums.errors,
        "error_rate": _round(sums.errors / sums.counted) if sums.counted else None,
        "goodput": _round(sums.good / sums.counted) if sums.counted else None,
    }
    if window_s:
        summary["rps"] = _round(sums.requests / window_s)
    for key, spec in sums.specs.items():
        name, _, kind = key.partition(":")
        if kind in ("mean", "log"):
            short = name.removesuffix("_ms")
            summary[f"{short}_{'gmean' if kind == 'log' else 'mean'}_ms"] = ratio(sums.moments.ratio(spec), log=kind == "log")
    for name, value in sums.percentiles.items():
        summary[name] = _round(value)
    tokens = sums.ratio_for("completion_tokens_mean")
    if tokens is not None and tokens.den:
        summary["completion_tokens_mean"] = ratio(tokens)
        cost = sums.ratio_for("cost_per_request", prices=prices) if any(prices) else None
        if cost is not None:
            summary["cost_per_request"] = ratio(cost)
    for kind, stats in sums.outcomes.items():
        summary[f"outcome_{kind}"] = {"n": round(stats.den), "sessions": stats.units, "mean": ratio(stats)}
    return summary
