"""A shadow step's evidence folded look by look, as a live step's is (experiments.rollups).

A shadow step (weight 0) compares the candidate's replies to mirrored requests with the baseline's replay of
the same requests (`ShadowPair`). Each look used to read every pair of the step four times: the candidate's
sums and percentiles (`shadow_candidate_sums`), the paired latency sums (`paired.shadow_paired_latency`),
both sides of each session's first pair (`tails.shadow_pair_bins`) and the candidate's first reply over the
tail SLOs' thresholds (`tails.shadow_pair_over`): a look's cost grew with the step's age. Here one window
over the step's pairs keeps all four, per session, and each look folds only the pairs committed since the
previous one (a pair's commit order: serving migration 0010):

- the candidate's per-session columns, as a live arm's (`sessions.session_columns` of `SHADOW`), with
  their products and the sketches of its latencies;
- per latency field, the paired sums of the pairs where both sides answered ok with a positive value: the
  session's count of them and its sums of b, c and ln(c / b) (`<field>_pn`, `_pb`, `_pc`, `_plr`), and the
  products `paired.PairedSums` takes;
- per latency field, the session's first such pair, baseline side (`<field>:baseline`): its buckets are the
  tail guardrails' baseline sample and their count the paired checks' units (the sessions with a pair of
  that field); for the tail guardrails' fields, the candidate side of the same pair (`<field>:candidate`:
  the same condition, the same order, so the same pair);
- per field with thresholds, the candidate's first reply that answered ok with the latency, and the
  sessions whose first reply was over each threshold (the tail SLOs').

The from-scratch reads stay as the definition the fold is tested against. Shadow quality is not folded:
its scores are written onto the pairs after they commit (`evals.selectors.shadow_quality` sums them per
session in SQL at each look).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db.models import CharField, F, FloatField, Q, QuerySet, Value, When
from django.db.models.expressions import Case

from experiments.analysis import CANDIDATE, shadow_candidate_sums, sketch_percentiles, threshold_tuples
from experiments.analysis.arms import ArmSums
from experiments.analysis.paired import (
    PAIRED_FIELDS,
    SUMS,
    PairedLatency,
    PairedSums,
    both_answered,
    paired_unit_sums,
    shadow_paired_latency,
)
from experiments.analysis.sessions import (
    SHADOW,
    UnitMoments,
    numeric_columns,
    product_pairs,
    ratio_specs,
    session_rows,
    unit_expression,
)
from experiments.analysis.tails import Bins, shadow_pair_bins, shadow_pair_over
from serving.selectors import shadow_pair_commit_horizon, shadow_pairs, shadow_pairs_committed

if TYPE_CHECKING:
    from experiments.rollups import ArmRollup, FoldTable, RollupSpec

# A paired field's per-session columns (`paired.paired_unit_sums`): the pairs counted, and the sums of b, c
# and ln(c / b).
PAIRED_PARTS = ("n", "b", "c", "lr")
# The `PairedSums` product sums, as products of a session's columns.
_PAIRED_PRODUCTS = {"b2": ("b", "b"), "c2": ("c", "c"), "bc": ("b", "c"), "lr2": ("lr", "lr"), "n2": ("n", "n"),
                    "nb": ("n", "b"), "nc": ("n", "c"), "nlr": ("n", "lr")}  # fmt: skip


def paired_column(name: str, part: str) -> str:
    """The window's column of a paired field's part: ttft_ms, n -> ttft_ms_pn."""
    return f"{name}_p{part}"


def _side(name: str, side: int) -> str:
    """The annotation that is one side of a pair (0 the baseline's, 1 the candidate's) of a latency field
    where the pair counts (`paired.both_answered`), else NULL: a first-request slot of the fold."""
    return f"paired_{name}_{'bc'[side]}"


def _pairs(rollout_id: int | None) -> QuerySet[Any]:
    """The rows a shadow window folds: the rollout's pairs, each the candidate's, with both sides of every
    latency field where the pair counts for it."""
    sides = {
        _side(name, side): Case(When(both_answered(name), then=F(columns[side])), default=None, output_field=FloatField())
        for name, columns in PAIRED_FIELDS.items() for side in (0, 1)
    }  # fmt: skip
    return shadow_pairs(rollout_id=rollout_id).annotate(arm=Value(CANDIDATE, output_field=CharField()), **sides)


@functools.cache
def shadow_table() -> FoldTable:
    from experiments.rollups import FoldTable

    return FoldTable("shadow", _pairs, shadow_pair_commit_horizon, shadow_pairs_committed)


def shadow_rollup_spec(*, limits: Mapping[str, Sequence[float]], bin_fields: Sequence[str] = ()) -> RollupSpec:
    """What a shadow step's window keeps (the module's docstring): the candidate's columns with the tail SLOs'
    `limits`, the paired sums, the sketches, and the first pairs: both sides for `bin_fields` (the tail
    guardrails'), the baseline side for every field, the candidate's first reply for the fields of `limits`."""
    from experiments.rollups import RollupSpec

    limits = threshold_tuples(limits)
    paired = [paired_column(name, part) for name in PAIRED_FIELDS for part in PAIRED_PARTS]
    pairs = set(product_pairs(ratio_specs(SHADOW, limits).values()))
    for name in PAIRED_FIELDS:
        for a, b in _PAIRED_PRODUCTS.values():
            x, y = paired_column(name, a), paired_column(name, b)
            pairs.add((x, y) if x <= y else (y, x))
    firsts = [(f"{name}:baseline", _side(name, 0)) for name in PAIRED_FIELDS]
    firsts += [(f"{name}:candidate", _side(name, 1)) for name in sorted(set(bin_fields))]
    over_fields = sorted(name for name, values in limits.items() if values and name in SHADOW.latency)
    firsts += [(name, SHADOW.latency[name]) for name in over_fields]
    return RollupSpec(
        columns=(*numeric_columns(SHADOW, limits), *paired), pairs=tuple(sorted(pairs)), sketch=tuple(SHADOW.latency.items()),
        firsts=tuple(firsts), over=tuple((name, float(limit)) for name in over_fields for limit in limits[name]),
    )  # fmt: skip


def shadow_fold(*, limits: Mapping[str, Sequence[float]], bin_fields: Sequence[str] = ()) -> dict[str, Any]:
    """The arguments to `experiments.rollups.window_fold` (and `window_scratch`) besides the window."""
    limits = threshold_tuples(limits)
    return {
        "spec": shadow_rollup_spec(limits=limits, bin_fields=bin_fields),
        "session_rows": lambda rows: session_rows(rows, source=SHADOW, thresholds=limits).annotate(**paired_unit_sums(paired_column)),
        "rows_key": ("shadow", tuple(sorted(limits.items()))), "outcome_ok": Q(candidate_outcome="ok"),
        "first_ok": Q(candidate_outcome="ok"), "unit": unit_expression(SHADOW), "table": shadow_table(),
    }  # fmt: skip


@dataclass(frozen=True)
class ShadowStepSums:
    """A shadow step's evidence since its window began: the candidate's `ArmSums` (what
    `shadow_candidate_sums` gives), the paired latency sums (`shadow_paired_latency`), both sides' first
    pairs' buckets for the fields asked (`shadow_pair_bins`) and the candidate's first replies over the
    thresholds (`shadow_pair_over`)."""

    candidate: ArmSums
    paired: PairedLatency
    bins: dict[str, dict[str, Bins]]
    over: dict[tuple[str, float], tuple[int, int]]


def shadow_step_sums(
    *, rollout_id: int, since: datetime, thresholds: Mapping[str, Sequence[float]] | None = None,
    bin_fields: Sequence[str] = (),
) -> ShadowStepSums:  # fmt: skip
    """Fold the step's pairs committed since the previous look into its window (experiments.rollups) and read
    the step's evidence from it; the same numbers as the from-scratch reads, the percentiles from the
    window's sketches (each within `rollups.RELATIVE_ACCURACY` of the nearest rank, as those reads give).
    From scratch when the spec does not fit a rollup (more thresholds than its slots)."""
    from experiments.rollups import window_fold

    limits = threshold_tuples(thresholds)
    try:
        fold = shadow_fold(limits=limits, bin_fields=bin_fields)
    except ValueError:
        return shadow_step_scratch(rollout_id=rollout_id, since=since, thresholds=limits, bin_fields=bin_fields)
    folded = window_fold(rollout_id=rollout_id, since=since, until=None, **fold)
    return shadow_step_from(folded.arms.get(CANDIDATE), limits=limits, bin_fields=bin_fields)


def shadow_step_from(
    arm: ArmRollup | None, *, limits: Mapping[str, Sequence[float]], bin_fields: Sequence[str] = ()
) -> ShadowStepSums:
    """`ShadowStepSums` from a shadow window's candidate arm (none yet: an empty step)."""
    from experiments.rollups import ArmRollup, over_key

    limits = threshold_tuples(limits)
    arm = arm if arm is not None else ArmRollup()
    specs = ratio_specs(SHADOW, limits)
    moments = UnitMoments(arm.units, arm.exposed, dict(arm.sums), dict(arm.products))
    candidate = ArmSums(moments, specs, limits, {}, sketch_percentiles(arm, SHADOW.latency))
    fields = {}
    for name in PAIRED_FIELDS:
        column = {part: paired_column(name, part) for part in PAIRED_PARTS}
        sums = {part: moments.total(column[part]) for part in ("b", "c", "lr")}
        sums.update({key: moments.product(column[a], column[b]) for key, (a, b) in _PAIRED_PRODUCTS.items()})
        units = sum(arm.firsts.get(f"{name}:baseline", {}).values())
        fields[name] = PairedSums(round(moments.total(column["n"])), units, **{key: sums[key] for key in SUMS})
    bins: dict[str, dict[str, Bins]] = {}
    for name in sorted(set(bin_fields)):
        for side in ("baseline", "candidate"):
            found = arm.firsts.get(f"{name}:{side}")
            if found:
                bins.setdefault(side, {})[name] = dict(found)
    over: dict[tuple[str, float], tuple[int, int]] = {}
    for name, values in limits.items():
        if not values or name not in SHADOW.latency:
            continue
        n = sum(arm.firsts.get(name, {}).values())
        for limit in values:
            over[(name, float(limit))] = (arm.over.get(over_key(name, limit), 0), n)
    return ShadowStepSums(candidate, PairedLatency(fields=fields), bins, over)


def shadow_step_scratch(
    *, rollout_id: int, since: datetime, thresholds: Mapping[str, Sequence[float]] | None = None,
    bin_fields: Sequence[str] = (),
) -> ShadowStepSums:  # fmt: skip
    """`shadow_step_sums` from scratch: the four reads over every pair of the step, what each look did before
    the fold, and what the fold is checked against."""
    limits = threshold_tuples(thresholds)
    return ShadowStepSums(
        shadow_candidate_sums(rollout_id=rollout_id, since=since, thresholds=limits),
        shadow_paired_latency(rollout_id=rollout_id, since=since),
        shadow_pair_bins(rollout_id=rollout_id, since=since, fields=sorted(set(bin_fields))),
        shadow_pair_over(rollout_id=rollout_id, since=since, thresholds=limits),
    )


def shadow_step_differences(a: ShadowStepSums, b: ShadowStepSums, *, rel: float = 1e-9) -> list[str]:
    """Where two reads of a shadow step differ beyond float rounding (sums added in another order): empty
    when the folded and the from-scratch ones agree. `b`'s candidate columns are compared (the folded
    moments also hold the paired ones)."""

    def close(x: float, y: float) -> bool:
        return math.isclose(x, y, rel_tol=rel, abs_tol=1e-9)

    problems = []
    x, y = a.candidate.moments, b.candidate.moments
    if (x.units, x.exposed) != (y.units, y.exposed):
        problems.append(f"candidate units/exposed {x.units}/{x.exposed} != {y.units}/{y.exposed}")
    problems += [f"candidate sum {k}" for k, v in y.sums.items() if not close(x.total(k), v)]
    problems += [f"candidate product {k}" for k, v in y.products.items() if not close(x.product(*k), v)]
    if a.candidate.percentiles != b.candidate.percentiles:
        problems.append(f"candidate percentiles {a.candidate.percentiles} != {b.candidate.percentiles}")
    for name in sorted(set(a.paired.fields) | set(b.paired.fields)):
        p, q = a.paired.fields.get(name), b.paired.fields.get(name)
        if p is None or q is None or (p.n, p.units) != (q.n, q.units) or not all(close(getattr(p, k), getattr(q, k)) for k in SUMS):
            problems.append(f"paired {name}: {p} != {q}")
    if a.bins != b.bins:
        problems.append("first pairs' buckets differ")
    if a.over != b.over:
        problems.append(f"first replies over thresholds {a.over} != {b.over}")
    return problems
