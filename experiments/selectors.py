"""Reads of experiments for the UI: per-metric comparisons of a rollout's two arms."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from experiments.analysis import arm_sums
from experiments.metrics import METRICS
from experiments.stats import bayesian_summary, compare


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def arm_comparisons(
    *, rollout_id: int, since: datetime | None, until: datetime | None = None, metrics: list[str],
    prices: dict[str, tuple[float, float]], alpha: float = 0.05, tuning_n: float = 5000.0,
    differences: dict[str, str] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per metric: each arm's value, the effect (relative for means, absolute for shares) with its
    always-valid interval and p-value, and the Bayesian chance that the candidate is better.

    `differences` overrides that choice per metric ("relative" or "absolute"). The chance to win
    summarises; it does not decide (the rollout decides on the sequential test)."""
    sums = arm_sums(rollout_id=rollout_id, since=since, until=until)
    rows = []
    for name in metrics:
        metric = METRICS.get(name)
        if metric is None or metric.shape == "percentile":
            continue
        base = sums["baseline"].stats_for(metric, prices=prices.get("baseline", (0.0, 0.0)))
        cand = sums["candidate"].stats_for(metric, prices=prices.get("candidate", (0.0, 0.0)))
        kind = "proportion" if metric.shape == "proportion" else "mean"
        difference = (differences or {}).get(name) or ("absolute" if kind == "proportion" else "relative")
        row: dict[str, Any] = {
            "metric": name, "direction": metric.direction, "unit": metric.unit, "description": metric.description,
            "difference": difference, "baseline_n": base.n if base else 0, "candidate_n": cand.n if cand else 0,
            "baseline": _finite(base.mean) if base and base.n else None,
            "candidate": _finite(cand.mean) if cand and cand.n else None,
        }  # fmt: skip
        if base is None or cand is None or base.n < 2 or cand.n < 2:
            rows.append({**row, "reason": "not enough data in an arm"})
            continue
        try:
            result = compare(
                base,
                cand,
                kind=kind,
                difference=difference,
                method="sequential",
                alpha=alpha,
                tuning_n=tuning_n,
            )
            bayes = bayesian_summary(base, cand, kind=kind, difference=difference, direction=metric.direction)
        except ValueError as exc:
            rows.append({**row, "reason": str(exc)[:200]})
            continue
        rows.append({
            **row, "effect": _finite(result.effect), "ci_low": _finite(result.ci_low), "ci_high": _finite(result.ci_high),
            "p_value": _finite(result.p_value), "chance_to_win": _finite(bayes.chance_to_win),
            "expected_loss": _finite(bayes.expected_loss),
        })  # fmt: skip
    return rows
