"""Shadow latency, pair by pair: the mirror task asks the candidate and the baseline the same request at
the same moment through the same code (serving.gateway.shadow), so each shadow pair is a matched
comparison. The pairs of one session are not independent of each other, though: a user is sticky, sends
many requests (their count heavy-tailed) and brings their own prompts, so their pairs share an effect. The
session is the unit (DESIGN.md, "Real traffic and production"); a pair with no session is its own unit.

One aggregate query groups the pairs per unit and latency field (the unit's count of pairs and its sums of
b, c and ln(c / b)) and sums those totals over the units with their products: they give any paired statistic
as a ratio over sessions (``experiments.stats.RatioStats``: the delta-method variance)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from django.db import connection
from django.db.models import Count, F, FloatField, Q, Sum
from django.db.models.functions import Ln

from experiments.analysis.sessions import SHADOW, unit_expression
from experiments.stats import RatioStats
from serving.selectors import shadow_pairs

# The two sides of a shadow pair, each timed by the mirror task (baseline, candidate).
PAIRED_FIELDS = {
    "ttft_ms": ("baseline_replay_ttft_ms", "candidate_ttft_ms"),
    "tpot_ms": ("baseline_replay_tpot_ms", "candidate_tpot_ms"),
    "e2e_ms": ("baseline_replay_e2e_ms", "candidate_e2e_ms"),
}
SUMS = ("b", "b2", "c", "c2", "bc", "lr", "lr2", "n2", "nb", "nc", "nlr")


@dataclass(frozen=True)
class PairedSums:
    """n pairs (b_j, c_j) of one latency field in `units` units (sessions, or pairs without one). With
    n_u, b_u, c_u, lr_u a unit's count of pairs and its sums of b, c and ln(c / b): b, c, lr are the sums
    of those over the units, and b2, c2, bc, lr2, n2, nb, nc, nlr the sums over the units of the products
    b_u^2, c_u^2, b_u c_u, lr_u^2, n_u^2, n_u b_u, n_u c_u, n_u lr_u. Every paired statistic below is a
    linear function of one pair, so a unit's total of it is the same function of the unit's totals."""

    n: int
    units: int
    b: float = 0.0
    b2: float = 0.0
    c: float = 0.0
    c2: float = 0.0
    bc: float = 0.0
    lr: float = 0.0
    lr2: float = 0.0
    n2: float = 0.0
    nb: float = 0.0
    nc: float = 0.0
    nlr: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n", "units"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.units > self.n or (self.n and not self.units):
            raise ValueError(f"{self.n} pairs cannot be in {self.units} units")
        for name in SUMS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")

    @classmethod
    def from_units(
        cls, counts: np.ndarray, b: np.ndarray, c: np.ndarray, lr: np.ndarray
    ) -> PairedSums:
        """From per-unit totals: each unit's count of pairs and its sums of b, c and ln(c / b)."""
        n, b, c, lr = (np.asarray(v, dtype=float) for v in (counts, b, c, lr))
        keep = n > 0
        n, b, c, lr = n[keep], b[keep], c[keep], lr[keep]
        return cls(
            int(n.sum()), int(n.size), b=float(b.sum()), b2=float(b @ b), c=float(c.sum()), c2=float(c @ c),
            bc=float(b @ c), lr=float(lr.sum()), lr2=float(lr @ lr), n2=float(n @ n), nb=float(n @ b),
            nc=float(n @ c), nlr=float(n @ lr),
        )  # fmt: skip

    def log_ratio(self) -> RatioStats:
        """Per pair ln(c / b) over the units: its ratio is the log of the ratio of geometric means."""
        return RatioStats(self.units, num=self.lr, den=float(self.n), num_sq=self.lr2, den_sq=self.n2,
                          num_den=self.nlr)  # fmt: skip

    def scaled_difference(self, k: float) -> RatioStats:
        """Per pair c - k b over the units: k = 1 is the difference in ms; k = 1 + m tests "mean c <= (1 + m)
        mean b"."""
        return RatioStats(
            self.units, num=self.c - k * self.b, den=float(self.n), num_sq=self.c2 - 2.0 * k * self.bc + k * k * self.b2,
            den_sq=self.n2, num_den=self.nc - k * self.nb,
        )  # fmt: skip

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


def both_answered(name: str) -> Q:
    """A shadow pair that counts for the paired statistics of latency field `name`: both sides answered ok
    with a positive value (pairs from before the baseline was replayed have no baseline side)."""
    base, cand = PAIRED_FIELDS[name]
    return Q(candidate_outcome="ok", baseline_replay_outcome="ok", **{f"{base}__gt": 0.0, f"{cand}__gt": 0.0})


def paired_unit_sums(name_of: Callable[[str, str], str]) -> dict[str, Any]:
    """Per latency field, a unit's aggregates over its pairs that count (`both_answered`): their count ("n")
    and their sums of b ("b"), c ("c") and ln(c / b) ("lr"), each named `name_of(field, part)`."""
    out: dict[str, Any] = {}
    for logical, (base, cand) in PAIRED_FIELDS.items():
        present = both_answered(logical)
        b, c = F(base), F(cand)
        out[name_of(logical, "n")] = Count("pk", filter=present)
        for part, term in (("b", b), ("c", c), ("lr", Ln(c) - Ln(b))):
            out[name_of(logical, part)] = Sum(term, filter=present, output_field=FloatField())
    return out


def shadow_paired_latency(
    *, rollout_id: int, since: datetime | None = None, until: datetime | None = None
) -> PairedLatency:
    """One aggregate query over the rollout's shadow pairs in [since, until): per unit its totals, summed
    over the units with their products in the same statement (`PairedSums`), so one row comes back however
    many sessions the step has (at 28,700 units, fetching them and summing in numpy was 150 ms of this
    process's CPU a look). Pairs from before the baseline was replayed have no baseline side and never
    enter."""
    pairs = shadow_pairs(rollout_id=rollout_id).order_by()
    if since is not None:
        pairs = pairs.filter(created_at__gte=since)
    if until is not None:
        pairs = pairs.filter(created_at__lt=until)
    aggregates = paired_unit_sums(lambda logical, part: f"{logical}__{part}")
    per_unit = pairs.annotate(unit=unit_expression(SHADOW)).values("unit").annotate(**aggregates).values_list(*aggregates)
    sql, params = per_unit.query.sql_with_params()
    quote = connection.ops.quote_name
    terms = []
    for logical in PAIRED_FIELDS:
        # A unit with no pair of a field sums to NULL there, and does not count as one of its units.
        un, ub, uc, ulr = (f"COALESCE(t.{quote(f'{logical}__{x}')}, 0)" for x in ("n", "b", "c", "lr"))
        summed = {"b": ub, "b2": f"{ub} * {ub}", "c": uc, "c2": f"{uc} * {uc}", "bc": f"{ub} * {uc}", "lr": ulr,
                  "lr2": f"{ulr} * {ulr}", "n2": f"{un} * {un}", "nb": f"{un} * {ub}", "nc": f"{un} * {uc}",
                  "nlr": f"{un} * {ulr}"}  # fmt: skip
        terms += [f"SUM({un})", f"SUM(CASE WHEN {un} > 0 THEN 1 ELSE 0 END)", *(f"SUM({summed[name]})" for name in SUMS)]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(terms)} FROM ({sql}) t", params)
        row = [float(v or 0.0) for v in cursor.fetchone()]
    fields = {}
    width = 2 + len(SUMS)
    for i, logical in enumerate(PAIRED_FIELDS):
        pairs_n, units, *sums = row[i * width : (i + 1) * width]
        fields[logical] = PairedSums(round(pairs_n), round(units), **dict(zip(SUMS, sums, strict=True)))
    return PairedLatency(fields=fields)
