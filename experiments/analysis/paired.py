"""Shadow latency, pair by pair: the mirror task asks the candidate and the baseline the same request at
the same moment through the same code (serving.gateway.shadow), so each shadow pair is a matched
comparison. One aggregate query gives, per latency field, the sums any paired test of the two needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, F, FloatField, Q, Sum
from django.db.models.functions import Ln

from experiments.stats import ArmStats
from serving.selectors import shadow_pairs

# The two sides of a shadow pair, each timed by the mirror task (baseline, candidate).
PAIRED_FIELDS = {
    "ttft_ms": ("baseline_replay_ttft_ms", "candidate_ttft_ms"),
    "tpot_ms": ("baseline_replay_tpot_ms", "candidate_tpot_ms"),
    "e2e_ms": ("baseline_replay_e2e_ms", "candidate_e2e_ms"),
}
SUMS = ("b", "b2", "c", "c2", "bc", "lr", "lr2")


@dataclass(frozen=True)
class PairedSums:
    """n pairs (b_i, c_i) of one latency field: sums of b, b^2, c, c^2, b c, and of the log ratio
    ln(c / b) and its square. Every paired statistic below is a linear function of one pair."""

    n: int
    b: float = 0.0
    b2: float = 0.0
    c: float = 0.0
    c2: float = 0.0
    bc: float = 0.0
    lr: float = 0.0
    lr2: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"n must be a non-negative integer, got {self.n!r}")
        for name in SUMS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")

    def log_ratio(self) -> ArmStats:
        """Per pair ln(c / b): its mean is the log of the ratio of geometric means."""
        return ArmStats(self.n, self.lr, self.lr2)

    def scaled_difference(self, k: float) -> ArmStats:
        """Per pair c - k b: k = 1 is the difference in ms; k = 1 + m tests "mean c <= (1 + m) mean b"."""
        return ArmStats(self.n, self.c - k * self.b, self.c2 - 2.0 * k * self.bc + k * k * self.b2)

    @property
    def baseline_mean(self) -> float:
        return self.b / self.n if self.n else math.nan

    @property
    def candidate_mean(self) -> float:
        return self.c / self.n if self.n else math.nan


@dataclass(frozen=True)
class PairedLatency:
    """Per latency field (ttft_ms, tpot_ms, e2e_ms), the sums of the shadow pairs where both sides
    answered ("ok") with a positive value."""

    fields: dict[str, PairedSums]


def shadow_paired_latency(
    *, rollout_id: int, since: datetime | None = None, until: datetime | None = None
) -> PairedLatency:
    """One aggregate query over the rollout's shadow pairs in [since, until). Pairs from before the baseline
    was replayed have no baseline side and never enter."""
    pairs = shadow_pairs(rollout_id=rollout_id).order_by()
    if since is not None:
        pairs = pairs.filter(created_at__gte=since)
    if until is not None:
        pairs = pairs.filter(created_at__lt=until)
    both_ok = Q(candidate_outcome="ok", baseline_replay_outcome="ok")
    aggregates: dict[str, Any] = {}
    for logical, (base, cand) in PAIRED_FIELDS.items():
        present = both_ok & Q(**{f"{base}__gt": 0.0, f"{cand}__gt": 0.0})
        b, c = F(base), F(cand)
        log_ratio = Ln(c) - Ln(b)
        terms = {
            "b": b,
            "b2": b * b,
            "c": c,
            "c2": c * c,
            "bc": b * c,
            "lr": log_ratio,
            "lr2": log_ratio * log_ratio,
        }
        aggregates[f"{logical}__n"] = Count("pk", filter=present)
        for name, term in terms.items():
            aggregates[f"{logical}__{name}"] = Sum(term, filter=present, output_field=FloatField())
    row = pairs.aggregate(**aggregates)
    fields = {}
    for logical in PAIRED_FIELDS:
        n = int(row[f"{logical}__n"] or 0)
        fields[logical] = PairedSums(n, **{name: float(row[f"{logical}__{name}"] or 0.0) for name in SUMS})
    return PairedLatency(fields=fields)
