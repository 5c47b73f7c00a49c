"""Reads of the evals app: suites, runs with their progress, paired comparisons, eval gate results for the
rollouts app, and the shadow-quality guardrail. The web UI builds its pages from these."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.db import NotSupportedError
from django.db.models import Count, F, FloatField, IntegerField, Q, QuerySet, Sum
from django.db.models.expressions import Func

from config.errors import DomainError, NotFound
from evals.models import EvalGate, EvalItem, EvalResult, EvalRun, EvalSuite, ShadowScoring
from evals.paired import PairedItem, compare_paired
from evals.scorers import FLIP_SUFFIX, SCORERS
from experiments.stats import RatioStats
from experiments.stats.bounded import session_mean_bounds
from serving.selectors import session_unit, shadow_pairs

# --- suites ---------------------------------------------------------------------------------------


def eval_suite_list(*, name: str | None = None, latest_only: bool = False) -> QuerySet[EvalSuite]:
    """Suites, newest version first within a name; `latest_only` keeps each name's newest version."""
    suites = EvalSuite.objects.order_by("name", "-version")
    if name:
        suites = suites.filter(name=name)
    if latest_only:
        newest: dict[str, int] = {}
        for suite_id, suite_name in suites.values_list("id", "name"):
            newest.setdefault(suite_name, suite_id)
        suites = suites.filter(pk__in=newest.values())
    return suites


def eval_suite_get(*, ref: int | str) -> EvalSuite:
    """A suite by id, by name (its latest version) or by "name@version"."""
    found: EvalSuite | None
    if isinstance(ref, int) or str(ref).isdigit():
        found = EvalSuite.objects.filter(pk=int(ref)).first()
    elif "@" in str(ref):
        name, _, version = str(ref).partition("@")
        found = EvalSuite.objects.filter(name=name, version=int(version)).first() if version.isdigit() else None
    else:
        found = EvalSuite.objects.filter(name=ref).order_by("-version").first()
    if found is None:
        raise NotFound(f"no eval suite {ref!r}")
    return found


def eval_suite_items(*, suite: EvalSuite, tag: str | None = None) -> QuerySet[EvalItem]:
    items = EvalItem.objects.filter(suite=suite).order_by("position")
    if tag:
        # JSON containment is not portable to SQLite; tags are few, so filter on the serialised list.
        items = items.filter(tags__icontains=f'"{tag}"')
    return items


# --- runs -----------------------------------------------------------------------------------------


def eval_run_list(*, suite: EvalSuite | None = None, model_version_id: int | None = None,
                  state: str | None = None) -> QuerySet[EvalRun]:
    runs = EvalRun.objects.select_related("suite", "model_version").order_by("-id")
    if suite is not None:
        runs = runs.filter(suite=suite)
    if model_version_id is not None:
        runs = runs.filter(model_version_id=model_version_id)
    if state:
        runs = runs.filter(state=state)
    return runs


def eval_run_get(*, run_id: int) -> EvalRun:
    run = EvalRun.objects.select_related("suite", "model_version").filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"no eval run {run_id}")
    return run


@dataclass(frozen=True)
class RunProgress:
    done: int
    total: int
    failed_items: int
    state: str
    state_reason: str

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def eval_run_progress(*, run: EvalRun) -> RunProgress:
    """done/total as of the runner's last checkpoint (it writes progress in batches)."""
    return RunProgress(done=run.done, total=run.total, failed_items=run.failed_items, state=run.state,
                       state_reason=run.state_reason)


def eval_run_results(*, run: EvalRun, failed_only: bool = False) -> QuerySet[EvalResult]:
    results = EvalResult.objects.filter(run=run).select_related("item").order_by("item__position")
    if failed_only:
        results = results.exclude(error="")
    return results


def _nearest_rank(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def eval_run_summary(*, run: EvalRun) -> dict[str, Any]:
    """Per scorer: {n, mean, pass_rate, errors, judge_flip_rate (pairwise judges only)}; and items, failed
    items, latency p50/p95 (ms), tokens."""
    rows = list(EvalResult.objects.filter(run=run).values_list("scores", "error", "latency_ms", "completion_tokens",
                                                                "prompt_tokens"))
    scorers: dict[str, Any] = {}
    for spec in run.scorers:
        label = spec["label"]
        cells = [scores.get(label) or {} for scores, *_ in rows]
        values = [c["value"] for c in cells if c.get("value") is not None]
        verdicts = [c["passed"] for c in cells if c.get("passed") is not None]
        flips = [c["flipped"] for c in cells if isinstance(c.get("flipped"), bool)]
        scorers[label] = {
            "name": spec["name"],
            "n": len(values),
            "mean": float(np.mean(values)) if values else None,
            "pass_rate": sum(verdicts) / len(verdicts) if verdicts else None,
            "errors": sum(1 for c in cells if c.get("value") is None),
        }
        if flips:
            # A pairwise judge: how often its verdict changed with the answers swapped.
            scorers[label]["judge_flip_rate"] = sum(flips) / len(flips)
    latencies = sorted(r[2] for r in rows if r[2] is not None)
    return {
        "items": len(rows),
        "failed_items": sum(1 for r in rows if r[1]),
        "scorers": scorers,
        "latency_ms": {"p50": _nearest_rank(latencies, 0.5), "p95": _nearest_rank(latencies, 0.95)},
        "prompt_tokens": sum(r[4] or 0 for r in rows),
        "completion_tokens": sum(r[3] or 0 for r in rows),
    }


def eval_run_live_summary(*, run: EvalRun) -> dict[str, Any]:
    """The stored summary of a finished run, or one computed from the results so far."""
    return run.summary if run.is_finished and run.summary else eval_run_summary(run=run)


def eval_runs_comparable(*, run: EvalRun) -> QuerySet[EvalRun]:
    """Finished runs a run can be compared with: the same suite version, another run, newest first."""
    return (
        EvalRun.objects.select_related("suite", "model_version")
        .filter(suite_id=run.suite_id, state=EvalRun.State.SUCCEEDED)
        .exclude(pk=run.pk)
        .order_by("-id")
    )


# --- comparisons ----------------------------------------------------------------------------------


def _run_ref(run: EvalRun) -> dict[str, Any]:
    return {"run_id": run.pk, "model_version": run.model_version.label, "model_version_id": run.model_version_id,
            "lineage_hash": run.lineage_hash, "state": run.state}


def eval_runs_compare(
    *, baseline_run: EvalRun, candidate_run: EvalRun, scorer: str | None = None,
    baseline_scorer: str | None = None, candidate_scorer: str | None = None, alpha: float = 0.05, seed: int = 0,
    resamples: int = 2000, margin: float | None = None,
) -> dict[str, Any]:
    """The paired comparison of two runs of the same suite version on one scorer (its label), as JSON.

    The scorer defaults to the first one both runs share. The structure is evals.paired.compare_paired's
    (with a non-inferiority test at `margin`, one-sided at alpha, when one is given), plus "suite",
    "scorer", "baseline" and "candidate" (run ids, model versions, lineage hashes)."""
    if baseline_run.suite_id != candidate_run.suite_id:
        raise DomainError("the two runs are not on the same suite version", field="candidate")
    if not 0 < alpha < 1:
        raise DomainError("alpha must be between 0 and 1", field="alpha")
    b_specs = {s["label"]: s for s in baseline_run.scorers}
    c_specs = {s["label"]: s for s in candidate_run.scorers}
    if baseline_scorer is None and candidate_scorer is None:
        if scorer is None:
            shared = [label for label in b_specs if label in c_specs]
            if not shared:
                raise DomainError("the two runs share no scorer", field="scorer")
            scorer = shared[0]
        baseline_scorer = candidate_scorer = scorer
    if baseline_scorer not in b_specs or candidate_scorer not in c_specs:
        raise DomainError(f"both runs must have the scorer {scorer or baseline_scorer!r}", field="scorer")
    spec = b_specs[baseline_scorer]
    if spec["name"] != c_specs[candidate_scorer]["name"]:
        raise DomainError("the two runs scored with different scorers", field="scorer")
    b_cells = dict(EvalResult.objects.filter(run=baseline_run).values_list("item_id", "scores"))
    c_cells = dict(EvalResult.objects.filter(run=candidate_run).values_list("item_id", "scores"))
    items = []
    for item_id, key, tags in EvalItem.objects.filter(suite_id=baseline_run.suite_id).values_list("id", "key", "tags"):
        b = (b_cells.get(item_id) or {}).get(baseline_scorer) or {}
        c = (c_cells.get(item_id) or {}).get(candidate_scorer) or {}
        items.append(PairedItem(key=key, baseline=b.get("value"), candidate=c.get("value"),
                                baseline_passed=b.get("passed"), candidate_passed=c.get("passed"),
                                tags=tuple(tags or ())))
    comparison = compare_paired(items, binary=bool(SCORERS[spec["name"]].binary), alpha=alpha, seed=seed,
                                resamples=resamples, margin=margin)
    suite = baseline_run.suite
    return {
        **comparison,
        "suite": {"id": suite.pk, "name": suite.name, "version": suite.version},
        "scorer": {"name": spec["name"], "label": baseline_scorer, "params": spec["params"]},
        "baseline": _run_ref(baseline_run),
        "candidate": _run_ref(candidate_run),
    }


# --- eval gates -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalGateResult:
    """status: "pending" | "passed" | "failed" | "undecided" | "error"; evidence: the comparison (see
    eval_runs_compare) plus "decision" {decision (pass/fail/undecided), max_drop, min_score, alpha, rule, n,
    low, high (one-sided (1 - alpha) bounds of candidate - baseline), items_needed (undecided: how many
    items would show non-inferiority of an equally good candidate), method, noninferiority, drop,
    drop_low, drop_upper_bound (the same on the baseline - candidate scale), baseline_score,
    candidate_score}, "status" and "reason"; {} while pending. "undecided": the suite is too small to show
    non-inferiority at its margin; it is not a pass."""

    status: str
    reason: str
    evidence: dict[str, Any]


def eval_gate_result(*, rollout_id: int) -> EvalGateResult | None:
    """The rollout's eval gate: None if it has none. A cancelled gate reads as an error."""
    gate = EvalGate.objects.select_related("baseline_run", "candidate_run").filter(rollout_id=rollout_id).first()
    if gate is None:
        return None
    if gate.status == EvalGate.Status.CANCELLED:
        return EvalGateResult(status="error", reason="the eval gate was cancelled", evidence=gate.evidence)
    if gate.status == EvalGate.Status.PENDING:
        parts = []
        for side, run in (("baseline", gate.baseline_run), ("candidate", gate.candidate_run)):
            if run is not None:
                parts.append(f"{side} {run.model_version.label}: {run.done}/{run.total} ({run.state})")
        return EvalGateResult(status="pending", reason="running the suite: " + ", ".join(parts), evidence={})
    return EvalGateResult(status=gate.status, reason=gate.reason, evidence=gate.evidence)


def eval_gate_get(*, rollout_id: int) -> EvalGate | None:
    """The gate row itself (for pages that link to its runs)."""
    return EvalGate.objects.select_related("baseline_run", "candidate_run", "baseline", "candidate").filter(
        rollout_id=rollout_id).first()


# --- shadow quality -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowQuality:
    """The mean score of the candidate's shadow answers, scored against the baseline's answers to the same
    requests, with always-valid one-sided bounds at `alpha` (the analysis looks at it every interval, so a
    fixed-n interval would not do). The unit is the session, as for the live checks: a sticky user's pairs
    share their prompts, so the mean is sum of scores over sum of counts across sessions with the
    delta-method variance (experiments.stats.bounded.session_mean_bounds); a pair with no session is its own
    unit. `units` counts them. `reference` is what the baseline scores against itself on this scorer: 1 for
    a reference-based scorer (1 = the same answer), 0.5 for a pairwise judge (a tie), so a margin reads "at
    most max_drop below the baseline". `sd` is the spread per pair the bounds used, clustering included (for
    how many more pairs a decision needs). `judge_flip_rate`: for a pairwise judge, the share of pairs whose
    verdict changed when the two answers swapped places (None otherwise, or before any judged pair)."""

    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    scorer: str
    alpha: float = 0.05
    reference: float = 1.0
    sd: float | None = None
    method: str = "session-delta-method-cs"
    judge_flip_rate: float | None = None
    units: int | None = None


def shadow_scoring_get(*, rollout_id: int) -> ShadowScoring | None:
    return ShadowScoring.objects.filter(rollout_id=rollout_id).first()


def _scorer_reference(spec: dict[str, Any]) -> float:
    pairwise = spec["name"] == "judge" and (spec.get("params") or {}).get("mode") == "pairwise"
    return 0.5 if pairwise else 1.0


def _json_path(key: str) -> str:
    """SQLite's JSON path of an object's key, quoted as Django quotes it (`$."key"`)."""
    return f"$.{json.dumps(key)}"


class _JsonKey(Func):
    """A JSON object column's value at `key`, read as the subclass says, on PostgreSQL (jsonb) and SQLite."""

    def __init__(self, column: str, key: str) -> None:
        super().__init__(F(column))
        self.key = key

    def as_sql(self, compiler: Any, connection: Any, *args: Any, **extra: Any) -> Any:
        raise NotSupportedError(f"shadow scores are read on PostgreSQL and SQLite, not {connection.vendor}")


class _ScoreOf(_JsonKey):
    """The value as shadow quality counts it: a finite JSON number (not a bool, not a string) clamped to
    [0, 1]; NULL for anything else or a missing key."""

    output_field = FloatField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        column, params = compiler.compile(self.get_source_expressions()[0])
        # jsonb holds no NaN or infinity; a number past a double's range (10^400) is clamped as a numeric.
        sql = (f"CASE WHEN jsonb_typeof({column} -> %s) = 'number' "
               f"THEN LEAST(GREATEST(({column} ->> %s)::numeric, 0), 1)::double precision END")  # fmt: skip
        return sql, (*params, self.key, *params, self.key)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        column, params = compiler.compile(self.get_source_expressions()[0])
        path = _json_path(self.key)
        value = f"json_extract({column}, %s)"
        # SQLite's JSON reads a true as the integer 1: the type tells a bool from a number. Past a double's
        # range (an Infinity) is not finite.
        sql = (f"CASE WHEN json_type({column}, %s) IN ('integer', 'real') "
               f"AND abs({value}) <= 1.7976931348623157e308 THEN MIN(MAX({value}, 0.0), 1.0) END")  # fmt: skip
        return sql, (*params, path, *params, path, *params, path)


class _FlagOf(_JsonKey):
    """The value as 1 (true) or 0 (false); NULL when it is not a bool."""

    output_field = IntegerField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        column, params = compiler.compile(self.get_source_expressions()[0])
        sql = (f"CASE jsonb_typeof({column} -> %s) WHEN 'boolean' "
               f"THEN CASE WHEN ({column} ->> %s) = 'true' THEN 1 ELSE 0 END END")  # fmt: skip
        return sql, (*params, self.key, *params, self.key)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        column, params = compiler.compile(self.get_source_expressions()[0])
        return f"CASE json_type({column}, %s) WHEN 'true' THEN 1 WHEN 'false' THEN 0 END", (
            *params, _json_path(self.key))  # fmt: skip


def shadow_quality(*, rollout_id: int, scorer: str | None = None, alpha: float = 0.05) -> ShadowQuality | None:
    """None when the rollout has no shadow scoring; n = 0 (and no mean) until a pair is scored.

    `scorer` is a label of the configured scorers (default: the first). Each pair's score joins its
    session's sum and count (the pair's own when it has no session); the database sums them per session
    and then across sessions, so a look reads one row however many pairs were scored."""
    config = shadow_scoring_get(rollout_id=rollout_id)
    if config is None or not config.scorers:
        return None
    specs = {spec["label"]: spec for spec in config.scorers}
    label = scorer or config.scorers[0]["label"]
    if label not in specs:
        raise DomainError(f"the rollout's shadow pairs are not scored with {label!r}", field="scorer")
    reference = _scorer_reference(specs[label])
    score, flag = _ScoreOf("scores", label), _FlagOf("scores", f"{label}{FLIP_SUFFIX}")
    units = (
        shadow_pairs(rollout_id=rollout_id).order_by().annotate(score=score).filter(score__isnull=False)
        .annotate(unit=session_unit(session="session_hash", request_id="request_id"))
        .values("unit").annotate(a=Sum("score"), b=Count("pk"), f=Sum(flag), j=Count(flag))
    )  # fmt: skip
    # The per-unit rows stay in the database: Python gets the sums RatioStats.from_units would take of them.
    totals = units.aggregate(
        units=Count("unit"), num=Sum("a", output_field=FloatField()), den=Sum("b", output_field=FloatField()),
        num_sq=Sum(F("a") * F("a"), output_field=FloatField()), den_sq=Sum(F("b") * F("b"), output_field=FloatField()),
        num_den=Sum(F("a") * F("b"), output_field=FloatField()), flips=Sum("f"), judged=Sum("j"),
    )  # fmt: skip
    flips, judged = int(totals["flips"] or 0), int(totals["judged"] or 0)
    flip_rate = flips / judged if judged else None
    if not totals["units"]:
        return ShadowQuality(n=0, mean=None, ci_low=None, ci_high=None, scorer=label, alpha=alpha, reference=reference)
    sums = {key: float(totals[key]) for key in ("num", "den", "num_sq", "den_sq", "num_den")}
    bounds = session_mean_bounds(RatioStats(int(totals["units"]), **sums), alpha=alpha)
    return ShadowQuality(
        n=bounds.n, mean=bounds.mean, ci_low=bounds.lower, ci_high=bounds.upper, scorer=label, alpha=alpha,
        reference=reference, sd=bounds.sd, judge_flip_rate=flip_rate, units=bounds.units,
    )  # fmt: skip


def shadow_pairs_unscored(*, rollout_id: int, labels: list[str]) -> QuerySet[Any]:
    """The rollout's shadow pairs lacking a score of any of `labels`, oldest first. Pairs of an alias that
    does not store prompts hold no texts to score and are left out."""
    missing = Q()
    for label in labels:
        missing |= ~Q(scores__has_key=label)
    return shadow_pairs(rollout_id=rollout_id).filter(missing, texts_stored=True).order_by("created_at", "id")


def eval_suite_run_counts() -> dict[int, int]:
    return dict(EvalRun.objects.values_list("suite_id").annotate(n=Count("id")).values_list("suite_id", "n"))
