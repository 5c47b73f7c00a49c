"""Every write the evals app makes: suites, runs (and the runner's checkpoints), eval gates of rollouts,
and shadow scoring. Reads that other code needs are in `evals.selectors`."""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from config.errors import Conflict, DomainError, NotFound
from evals import jsonl
from evals.models import EvalGate, EvalItem, EvalResult, EvalRun, EvalSuite, ShadowScoring
from evals.paired import gate_decide
from evals.scorers import FLIP_SUFFIX, SCORERS, ScorerSpecError, scorer_spec_normalise, scorer_specs_normalise
from serving.models import ModelVersion
from serving.selectors import model_version_get

log = logging.getLogger(__name__)

BUILTIN_ADDER_SUITE = "adder-heldout"
MAX_CONCURRENCY = 32
MAX_RUN_TOKENS = 4096


class SuiteUploadError(DomainError):
    """A JSONL upload refused; every bad line is listed by number (errors.file) and in `lines`."""

    def __init__(self, errors: list[jsonl.LineError], *, field: str = "file") -> None:
        super().__init__(str(jsonl.SuiteFormatError(errors)), field=field)
        self.line_errors = errors

    def as_dict(self) -> dict[str, object]:
        body = super().as_dict()
        body["errors"] = {self.field: [str(error) for error in self.line_errors]}
        body["lines"] = [{"line": error.line, "reason": error.reason} for error in self.line_errors]
        return body


def _spec_error(exc: ScorerSpecError, *, prefix: str) -> DomainError:
    field = f"{prefix}.{exc.field}" if exc.field and not exc.field.startswith(prefix) else (exc.field or prefix)
    return DomainError(exc.message, field=field)


# --- suites ---------------------------------------------------------------------------------------


def eval_suite_create(
    *, name: str, jsonl_data: bytes | str, description: str = "", created_by: AbstractBaseUser | AnonymousUser | None = None,
) -> EvalSuite:
    """A suite from a JSONL upload (the API and the web UI both call this).

    All or nothing: a bad line raises SuiteUploadError naming every bad line and nothing is stored. An
    upload under an existing name becomes its next version, unless it is the same as the latest one."""
    try:
        items = jsonl.parse_suite_jsonl(jsonl_data)
    except jsonl.SuiteFormatError as exc:
        raise SuiteUploadError(exc.errors) from exc
    return _suite_store(name=name, items=items, description=description, created_by=created_by,
                        source=EvalSuite.Source.UPLOAD)


def _check_suite_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_" for c in name):
        raise DomainError("name must be 1-64 letters, digits, '-' or '_'", field="name")
    return name


def _suite_store(
    *, name: str, items: Sequence[jsonl.ParsedItem], description: str, created_by: AbstractBaseUser | AnonymousUser | None,
    source: str,
) -> EvalSuite:
    name = _check_suite_name(name)
    content_hash = jsonl.items_hash(items)
    with transaction.atomic():
        latest = EvalSuite.objects.select_for_update().filter(name=name).order_by("-version").first()
        if latest is not None and latest.content_hash == content_hash:
            return latest
        tag_counts = Counter(tag for item in items for tag in item.tags)
        suite = EvalSuite.objects.create(
            name=name, version=(latest.version + 1) if latest else 1, description=description, source=source,
            content_hash=content_hash, item_count=len(items), tags=dict(sorted(tag_counts.items())),
            created_by_id=getattr(created_by, "pk", None),
        )
        EvalItem.objects.bulk_create(
            [
                EvalItem(suite=suite, position=item.position, key=item.key, prompt=item.prompt,
                         messages=item.messages, reference=item.reference, tags=item.tags, metadata=item.metadata)
                for item in items
            ],
            batch_size=500,
        )
    return suite


def _adder_items() -> list[jsonl.ParsedItem]:
    # Pure data (no torch): the same held-out sums the demo models were kept from during training.
    from serving.demo_models.data import heldout_pairs, prompt_for

    items = []
    for position, (a, b) in enumerate(heldout_pairs()):
        tags = ["carry" if (a % 10 + b % 10) >= 10 else "no-carry", "three-digit" if a + b >= 100 else "two-digit"]
        items.append(jsonl.ParsedItem(position=position, key=f"{a}+{b}", prompt=prompt_for(a, b),
                                      messages=None, reference=str(a + b), tags=sorted(tags)))
    return items


def builtin_suites_ensure() -> list[EvalSuite]:
    """The built-in suites, created or updated (idempotent; `setup_platform` and the tests call it).

    "adder-heldout": the demo models' held-out two-digit sums as completion prompts ("37+48=" -> "85"),
    tagged carry / no-carry and two-digit / three-digit."""
    return [
        _suite_store(
            name=BUILTIN_ADDER_SUITE, items=_adder_items(), created_by=None, source=EvalSuite.Source.BUILTIN,
            description="Held-out two-digit sums of the demo adder models (never seen in training).",
        )
    ]


# --- runs -----------------------------------------------------------------------------------------


def _scorer_specs_checked(scorers: Any, *, field: str) -> list[dict[str, Any]]:
    try:
        specs = scorer_specs_normalise(scorers, field=field)
    except ScorerSpecError as exc:
        raise DomainError(exc.message, field=exc.field or field) from exc
    for index, spec in enumerate(specs):
        if spec["name"] == "judge":
            try:
                model_version_get(ref=spec["params"]["judge_model"])
            except NotFound as exc:
                raise DomainError(exc.message, field=f"{field}[{index}].params.judge_model") from exc
    return specs


def _check_int(value: Any, *, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DomainError(f"{field} must be an integer from {low} to {high}", field=field)
    return value


def eval_run_create(
    *,
    suite: EvalSuite,
    model_version: ModelVersion,
    scorers: Any,
    concurrency: int = 4,
    max_tokens: int = 64,
    created_by: AbstractBaseUser | AnonymousUser | None = None,
    gate_rollout_id: int | None = None,
) -> EvalRun:
    """A queued run; a Celery worker picks it up once the transaction commits."""
    specs = _scorer_specs_checked(scorers, field="scorers")
    concurrency = _check_int(concurrency, field="concurrency", low=1, high=MAX_CONCURRENCY)
    max_tokens = _check_int(max_tokens, field="max_tokens", low=1, high=MAX_RUN_TOKENS)
    with transaction.atomic():
        run = EvalRun.objects.create(
            suite=suite, model_version=model_version, lineage_hash=model_version.lineage_hash, scorers=specs,
            concurrency=concurrency, max_tokens=max_tokens, total=suite.item_count,
            created_by_id=getattr(created_by, "pk", None),
            gate_rollout_id=gate_rollout_id,
        )
        transaction.on_commit(lambda: eval_run_enqueue(run_id=run.pk))
    return run


def eval_run_enqueue(*, run_id: int, countdown: float | None = None) -> None:
    from evals.tasks import eval_run_execute

    eval_run_execute.apply_async(args=[run_id], countdown=countdown)


def eval_run_cancel(*, run: EvalRun) -> EvalRun:
    """Stop a run. Unclaimed runs stop at once; a worker running one stops at its next checkpoint."""
    with transaction.atomic():
        locked = EvalRun.objects.select_for_update().get(pk=run.pk)
        if locked.state == EvalRun.State.CANCELLED:
            return locked
        if locked.is_finished:
            raise Conflict(f"run {locked.pk} has already {locked.state}", field="state")
        locked.cancel_requested = True
        fields = ["cancel_requested"]
        if not locked.claim_token:
            _finish_fields(locked, state=EvalRun.State.CANCELLED, reason="cancelled before a worker took it")
            fields += ["state", "state_reason", "finished_at", "summary", "claim_token"]
        locked.save(update_fields=fields)
    if locked.is_finished:
        transaction.on_commit(lambda: eval_gates_decide_for_run(run_id=locked.pk))
    return locked


# The runner's side: claim, checkpoint, release, finish. Every one checks the claim token, so a worker
# that lost its claim (it stalled past the stale limit and another took over) stops instead of writing.


def eval_run_claim(*, run_id: int, stale_after_s: float | None = None) -> str | None:
    """Claim a run for this worker (compare-and-set); None when another live worker holds it or it is over."""
    stale_after_s = settings.EVAL_RUN_STALE_S if stale_after_s is None else stale_after_s
    now = timezone.now()
    token = uuid.uuid4().hex
    claimed = (
        EvalRun.objects.filter(pk=run_id, state__in=EvalRun.ACTIVE_STATES)
        .filter(Q(claim_token="") | Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=now - timedelta(seconds=stale_after_s)))
        .update(state=EvalRun.State.RUNNING, claim_token=token, heartbeat_at=now, executions=F("executions") + 1,
                started_at=Coalesce(F("started_at"), now))
    )
    return token if claimed == 1 else None


@dataclass(frozen=True)
class ItemOutcome:
    """One item done by the runner, to be stored at the next checkpoint."""

    item_id: int
    output: str
    scores: dict[str, dict[str, Any]]
    error: str = ""
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Checkpoint:
    held: bool  # False: the claim was lost; stop without writing more
    cancel_requested: bool
    done: int


def eval_run_checkpoint(*, run_id: int, token: str, outcomes: Sequence[ItemOutcome], reason: str = "") -> Checkpoint:
    """Store finished items and renew the heartbeat, in one transaction (the batch is the unit of progress)."""
    with transaction.atomic():
        run = EvalRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None or run.claim_token != token or run.is_finished:
            return Checkpoint(held=False, cancel_requested=bool(run and run.cancel_requested), done=run.done if run else 0)
        if outcomes:
            # ignore_conflicts: an item stored by an earlier execution stays as it was; (run, item) is unique.
            EvalResult.objects.bulk_create(
                [
                    EvalResult(run_id=run_id, item_id=o.item_id, output=o.output, scores=o.scores, error=o.error[:500],
                               latency_ms=o.latency_ms, prompt_tokens=o.prompt_tokens,
                               completion_tokens=o.completion_tokens, attempts=min(o.attempts, 32767))
                    for o in outcomes
                ],
                ignore_conflicts=True,
            )
            run.done = EvalResult.objects.filter(run_id=run_id).count()
            run.failed_items = EvalResult.objects.filter(run_id=run_id).exclude(error="").count()
        run.heartbeat_at = timezone.now()
        run.state_reason = reason
        run.save(update_fields=["done", "failed_items", "heartbeat_at", "state_reason"])
        return Checkpoint(held=True, cancel_requested=run.cancel_requested, done=run.done)


def eval_run_release(*, run_id: int, token: str, reason: str = "") -> bool:
    """Give up the claim without finishing (end of a time slice, or waiting for an engine)."""
    return EvalRun.objects.filter(pk=run_id, claim_token=token, state=EvalRun.State.RUNNING).update(
        claim_token="", heartbeat_at=timezone.now(), state_reason=reason[:500]
    ) == 1


def _finish_fields(run: EvalRun, *, state: str, reason: str) -> None:
    from evals.selectors import eval_run_summary

    run.state = state
    run.state_reason = reason[:500]
    run.finished_at = timezone.now()
    run.claim_token = ""
    run.summary = eval_run_summary(run=run)


def eval_run_finish(*, run_id: int, token: str, state: str, reason: str = "") -> bool:
    if state not in EvalRun.TERMINAL_STATES:
        raise ValueError(f"not a final state: {state}")
    with transaction.atomic():
        run = EvalRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None or run.claim_token != token or run.is_finished:
            return False
        _finish_fields(run, state=state, reason=reason)
        run.save(update_fields=["state", "state_reason", "finished_at", "claim_token", "summary"])
    # The run's state is committed before any gate looks at it: of two runs finishing together, the
    # second to lock the gate sees both finished (see eval_gate_decide).
    eval_gates_decide_for_run(run_id=run_id)
    return True


def eval_runs_sweep(*, stale_after_s: float | None = None) -> dict[str, int]:
    """Beat's safety net: resume runs whose worker died or whose message was lost, finish cancelled runs
    nobody holds, and decide gates whose runs are over. Each resume is a plain enqueue; the task's
    compare-and-set claim makes duplicates harmless."""
    stale_after_s = settings.EVAL_RUN_STALE_S if stale_after_s is None else stale_after_s
    now = timezone.now()
    stale = now - timedelta(seconds=stale_after_s)
    # A run never claimed may just be queued behind others: only a much older one has lost its message.
    never_claimed = now - timedelta(seconds=max(5 * stale_after_s, 300.0))
    orphaned = EvalRun.objects.filter(state__in=EvalRun.ACTIVE_STATES).filter(
        Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True, created_at__lt=never_claimed)
    )
    counts = {"resumed": 0, "cancelled": 0, "gates": 0}
    for run_id, cancel in orphaned.values_list("id", "cancel_requested"):
        if cancel:
            with transaction.atomic():
                run = EvalRun.objects.select_for_update().get(pk=run_id)
                if run.is_finished:
                    continue
                _finish_fields(run, state=EvalRun.State.CANCELLED, reason="cancelled")
                run.save(update_fields=["state", "state_reason", "finished_at", "claim_token", "summary"])
            eval_gates_decide_for_run(run_id=run_id)
            counts["cancelled"] += 1
        else:
            eval_run_enqueue(run_id=run_id)
            counts["resumed"] += 1
    # Only gates with nothing left to wait for: deciding takes the gate's row lock.
    active = EvalRun.objects.filter(state__in=EvalRun.ACTIVE_STATES).values("id")
    decidable = EvalGate.objects.filter(status=EvalGate.Status.PENDING).exclude(
        Q(baseline_run_id__in=active) | Q(candidate_run_id__in=active)
    )
    for gate_id in list(decidable.values_list("id", flat=True)):
        if eval_gate_decide(gate_id=gate_id) != EvalGate.Status.PENDING:
            counts["gates"] += 1
    return counts


# --- eval gates -----------------------------------------------------------------------------------

GATE_KEYS = {"suite", "suite_version", "scorer", "max_drop", "min_score", "alpha", "concurrency", "max_tokens"}


def _gate_fraction(spec: dict[str, Any], key: str, *, low: float, high: float, default: float | None) -> float | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DomainError(f"{key} must be a number", field=f"eval_gate.{key}")
    if not low <= value <= high:
        raise DomainError(f"{key} must be between {low:g} and {high:g}", field=f"eval_gate.{key}")
    return float(value)


def eval_gate_validate(*, spec: dict[str, Any]) -> dict[str, Any]:
    """The gate spec, normalised, or DomainError(field="eval_gate.<key>").

    Keys: suite (a suite name; the latest version is used unless suite_version pins one), scorer (a name
    or {name, params, label}), max_drop (how much lower the candidate's score may be than the baseline's,
    0..0.5, a non-inferiority margin tested one-sided at alpha), min_score (the candidate's minimum mean
    score, 0..1, tested one-sided at alpha on a bound of the mean), alpha (the chance of passing a candidate worse by max_drop, 0.001..0.25, default 0.05;
    a rollout passes its own share of the plan's alpha instead), concurrency (default 4), max_tokens
    (default 64). max_drop or min_score or both."""
    if not isinstance(spec, dict):
        raise DomainError("the eval gate must be an object", field="eval_gate")
    unknown = sorted(set(spec) - GATE_KEYS)
    if unknown:
        raise DomainError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(GATE_KEYS))})",
                          field=f"eval_gate.{unknown[0]}")
    suite_name = spec.get("suite")
    if not isinstance(suite_name, str) or not suite_name:
        raise DomainError("suite is required: the name of an eval suite", field="eval_gate.suite")
    suites = EvalSuite.objects.filter(name=suite_name)
    suite_version = spec.get("suite_version")
    if suite_version is not None:
        suite_version = _check_int(suite_version, field="eval_gate.suite_version", low=1, high=10**9)
        suites = suites.filter(version=suite_version)
    if not suites.exists():
        pinned = f" version {suite_version}" if suite_version is not None else ""
        raise DomainError(f"no eval suite named {suite_name!r}{pinned}", field="eval_gate.suite")
    if "scorer" not in spec:
        raise DomainError("scorer is required, e.g. \"exact_match\"", field="eval_gate.scorer")
    try:
        scorer = scorer_spec_normalise(spec["scorer"])
    except ScorerSpecError as exc:
        raise _spec_error(exc, prefix="eval_gate.scorer") from exc
    if scorer["name"] == "judge":
        try:
            model_version_get(ref=scorer["params"]["judge_model"])
        except NotFound as exc:
            raise DomainError(exc.message, field="eval_gate.scorer.params.judge_model") from exc
    max_drop = _gate_fraction(spec, "max_drop", low=0.0, high=0.5, default=None)
    min_score = _gate_fraction(spec, "min_score", low=0.0, high=1.0, default=None)
    if max_drop is None and min_score is None:
        raise DomainError("give max_drop, min_score or both", field="eval_gate.max_drop")
    alpha = _gate_fraction(spec, "alpha", low=0.001, high=0.25, default=0.05)
    return {
        "suite": suite_name,
        "suite_version": suite_version,
        "scorer": scorer,
        "max_drop": max_drop,
        "min_score": min_score,
        "alpha": alpha,
        "concurrency": _check_int(spec.get("concurrency", 4), field="eval_gate.concurrency", low=1, high=MAX_CONCURRENCY),
        "max_tokens": _check_int(spec.get("max_tokens", 64), field="eval_gate.max_tokens", low=1, high=MAX_RUN_TOKENS),
    }


def _reusable_run(*, suite: EvalSuite, model_version: ModelVersion, scorer: dict[str, Any], max_tokens: int) -> EvalRun | None:
    """A run of this suite version on these exact weights that holds the scorer: finished, else in progress."""
    runs = EvalRun.objects.filter(
        suite=suite, model_version=model_version, lineage_hash=model_version.lineage_hash, max_tokens=max_tokens,
        cancel_requested=False, state__in=(EvalRun.State.SUCCEEDED, *EvalRun.ACTIVE_STATES),
    ).order_by("-finished_at", "-id")
    matching = [
        run for run in runs
        if any(s["name"] == scorer["name"] and s["params"] == scorer["params"] for s in run.scorers)
    ]
    finished = [run for run in matching if run.state == EvalRun.State.SUCCEEDED]
    chosen = finished or matching
    return chosen[0] if chosen else None


def eval_gate_start(*, rollout_id: int, baseline: ModelVersion, candidate: ModelVersion, spec: dict[str, Any]) -> None:
    """Start (or find) the rollout's eval gate: one run per version, reusing a finished run of the same suite
    version, model version and lineage. Idempotent per rollout_id; read the outcome with
    `evals.selectors.eval_gate_result`."""
    spec = eval_gate_validate(spec=spec)
    if EvalGate.objects.filter(rollout_id=rollout_id).exists():
        return
    suites = EvalSuite.objects.filter(name=spec["suite"])
    if spec["suite_version"] is not None:
        suites = suites.filter(version=spec["suite_version"])
    suite = suites.order_by("-version").first()
    if suite is None:
        raise DomainError(f"no eval suite named {spec['suite']!r}", field="eval_gate.suite")
    try:
        with transaction.atomic():
            runs = {}
            for side, version in (("baseline", baseline), ("candidate", candidate)):
                found = _reusable_run(suite=suite, model_version=version, scorer=spec["scorer"],
                                      max_tokens=spec["max_tokens"])
                runs[side] = found or eval_run_create(
                    suite=suite, model_version=version, scorers=[spec["scorer"]], concurrency=spec["concurrency"],
                    max_tokens=spec["max_tokens"], gate_rollout_id=rollout_id,
                )
            gate = EvalGate.objects.create(
                rollout_id=rollout_id, spec={**spec, "suite_version": suite.version}, baseline=baseline,
                candidate=candidate, baseline_run=runs["baseline"], candidate_run=runs["candidate"],
            )
            transaction.on_commit(lambda: eval_gate_decide(gate_id=gate.pk))
    except IntegrityError:
        # Another caller started this rollout's gate at the same moment: theirs stands.
        if not EvalGate.objects.filter(rollout_id=rollout_id).exists():
            raise


def _score_label(run: EvalRun, scorer: dict[str, Any]) -> str | None:
    for spec in run.scorers:
        if spec["name"] == scorer["name"] and spec["params"] == scorer["params"]:
            return str(spec["label"])
    return None


def eval_gate_decide(*, gate_id: int) -> str:
    """Decide a pending gate once both its runs are over; returns the gate's status."""
    from evals.selectors import eval_runs_compare

    with transaction.atomic():
        gate = EvalGate.objects.select_for_update().filter(pk=gate_id).first()
        if gate is None:
            return EvalGate.Status.ERROR
        if gate.status != EvalGate.Status.PENDING:
            return gate.status
        # Read fresh, not from a cache: the runs' states are what this decision is about.
        runs = EvalRun.objects.select_related("suite", "model_version")
        baseline_run = runs.filter(id=gate.baseline_run_id or 0).first()
        candidate_run = runs.filter(id=gate.candidate_run_id or 0).first()
        if baseline_run is None or candidate_run is None:
            side = "baseline" if baseline_run is None else "candidate"
            return _gate_close(gate, EvalGate.Status.ERROR, f"the {side} run was deleted", {})
        if not (baseline_run.is_finished and candidate_run.is_finished):
            return gate.status
        for side, run in (("baseline", baseline_run), ("candidate", candidate_run)):
            if run.state != EvalRun.State.SUCCEEDED:
                why = f": {run.state_reason}" if run.state_reason else ""
                return _gate_close(gate, EvalGate.Status.ERROR, f"the {side} run {run.pk} {run.state}{why}", {})
        spec = gate.spec
        labels = (_score_label(baseline_run, spec["scorer"]), _score_label(candidate_run, spec["scorer"]))
        comparison = eval_runs_compare(
            baseline_run=baseline_run, candidate_run=candidate_run, baseline_scorer=labels[0],
            candidate_scorer=labels[1], alpha=spec["alpha"], margin=spec["max_drop"],
        )
        decision = gate_decide(comparison["overall"], max_drop=spec["max_drop"], min_score=spec["min_score"],
                               alpha=spec["alpha"])
        evidence = {**comparison, "decision": decision.detail}
        if decision.verdict is None:
            return _gate_close(gate, EvalGate.Status.ERROR, decision.reason, evidence)
        status = {"pass": EvalGate.Status.PASSED, "fail": EvalGate.Status.FAILED}.get(
            decision.verdict, EvalGate.Status.UNDECIDED
        )
        return _gate_close(gate, status, decision.reason, evidence)


def _gate_close(gate: EvalGate, status: str, reason: str, evidence: dict[str, Any]) -> str:
    gate.status = status
    gate.reason = reason
    gate.evidence = {**evidence, "status": status, "reason": reason}
    gate.decided_at = timezone.now()
    gate.save(update_fields=["status", "reason", "evidence", "decided_at"])
    log.info("eval gate of rollout %s %s: %s", gate.rollout_id, status, reason)
    return status


def eval_gates_decide_for_run(*, run_id: int) -> None:
    for gate_id in EvalGate.objects.filter(status=EvalGate.Status.PENDING).filter(
        Q(baseline_run_id=run_id) | Q(candidate_run_id=run_id)
    ).values_list("id", flat=True):
        eval_gate_decide(gate_id=gate_id)


def eval_gate_cancel(*, rollout_id: int) -> None:
    """Cancel the rollout's pending gate and the runs it started that no other pending gate uses."""
    with transaction.atomic():
        gate = EvalGate.objects.select_for_update().filter(rollout_id=rollout_id).first()
        if gate is None or gate.status != EvalGate.Status.PENDING:
            return
        _gate_close(gate, EvalGate.Status.CANCELLED, "the eval gate was cancelled", gate.evidence)
        own = EvalRun.objects.filter(gate_rollout_id=rollout_id, state__in=EvalRun.ACTIVE_STATES)
        for run in own:
            shared = EvalGate.objects.filter(status=EvalGate.Status.PENDING).filter(
                Q(baseline_run=run) | Q(candidate_run=run)
            ).exists()
            if not shared:
                eval_run_cancel(run=run)


# --- shadow scoring -------------------------------------------------------------------------------


def shadow_scoring_configure(*, rollout_id: int, scorers: list[dict[str, Any]]) -> ShadowScoring:
    """Which scorers score the rollout's shadow pairs (the first is the one shadow_quality reports by
    default). Each pair is scored with the baseline's answer as the reference and the candidate's as the
    output; exact match makes sense only where decoding is greedy."""
    specs = _scorer_specs_checked(scorers, field="scorers")
    with transaction.atomic():
        config, _ = ShadowScoring.objects.select_for_update().update_or_create(
            rollout_id=rollout_id, defaults={"scorers": specs, "active": True}
        )
    return config


def shadow_scoring_stop(*, rollout_id: int) -> None:
    ShadowScoring.objects.filter(rollout_id=rollout_id).update(active=False, updated_at=timezone.now())


def scorer_is_binary(spec: dict[str, Any]) -> bool:
    return bool(SCORERS[spec["name"]].binary)


def shadow_pairs_score(*, rollout_id: int, limit: int = 200) -> int:
    """Score up to `limit` unscored shadow pairs of the rollout with its configured scorers; returns how
    many were scored. A pair whose candidate failed, or that a scorer cannot score, gets None for that
    scorer, so it is not looked at again."""
    import threading

    import httpx

    from evals.runner import bound_scorers
    from evals.scorers import ScoreInput
    from evals.selectors import shadow_pairs_unscored, shadow_scoring_get
    from serving.models import RequestRecord
    from serving.services import shadow_pair_scores_set

    config = shadow_scoring_get(rollout_id=rollout_id)
    if config is None or not config.active or not config.scorers:
        return 0
    labels = [spec["label"] for spec in config.scorers]
    pairs = list(shadow_pairs_unscored(rollout_id=rollout_id, labels=labels)[:limit])
    if not pairs:
        return 0
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        try:
            scorers = bound_scorers(config.scorers, client=client, retries=settings.EVAL_REQUEST_RETRIES,
                                    backoff_s=settings.EVAL_RETRY_BACKOFF_S, stop=threading.Event())
        except NotFound as exc:
            # A judge model without a ready engine: try again on the next beat.
            log.warning("shadow scoring of rollout %s waits: %s", rollout_id, exc)
            return 0
        for pair in pairs:
            scores: dict[str, float | bool | None] = {}
            if pair.candidate_outcome != RequestRecord.Outcome.OK:
                scores = {label: None for label in labels}
            else:
                case = ScoreInput(output=pair.candidate_output, reference=pair.baseline_output, prompt=pair.prompt_text)
                for label, scorer in scorers.items():
                    if label in (pair.scores or {}):
                        continue
                    score = scorer(case)
                    scores[label] = score.value
                    if score.flipped is not None:
                        scores[f"{label}{FLIP_SUFFIX}"] = score.flipped
            shadow_pair_scores_set(pair=pair, scores=scores)
    return len(pairs)
