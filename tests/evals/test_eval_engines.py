"""Evals against real vLLM engines serving the demo adders (at most two engines at once).

- adder-v2-broken is stopped by the eval gate with McNemar evidence; adder-v2 passes it;
- a run survives SIGKILL of its Celery worker: another worker finishes it without redoing finished items;
- a judge whose replies are no verdict at all (the adder, asked to grade) leaves per-item scorer errors,
  and the run finishes.

Engines are registered as static workers and marked READY through the engine agent's own transitions."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from evals import runner, services
from evals.models import EvalGate, EvalResult, EvalRun, EvalSuite
from evals.selectors import eval_gate_result
from evals.services import (
    builtin_suites_ensure,
    eval_gate_start,
    eval_run_create,
    eval_runs_sweep,
    eval_suite_create,
)
from serving.demo_models import DEMO_RECIPES, BuiltModel, build_demo_models
from serving.models import ModelVersion
from serving.services import model_version_register
from tests.support.demo import EnginePool, static_worker_ready
from tests.support.engines import RunningEngine
from tests.support.eval_runs import assert_resumed_without_redoing, stored_results
from tests.support.processes import celery_worker, wait_until

# Engines take minutes to start on a busy 2-core machine: more than the suite's default 600 s limit.
pytestmark = [pytest.mark.engines, pytest.mark.django_db(transaction=True), pytest.mark.timeout(2400)]

LOG_DIR = Path(settings.VAR_DIR) / "test-logs"
AGENT = "evals-tests"
GATE = {"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 0.05, "concurrency": 4}


@pytest.fixture(scope="module")
def built() -> dict[str, BuiltModel]:
    wanted = [r for r in DEMO_RECIPES if r.name in ("adder-v1", "adder-v2", "adder-v2-broken")]
    return {m.name: m for m in build_demo_models(Path(settings.DEMO_MODELS_DIR), recipes=wanted, log=lambda _: None)}


@pytest.fixture
def v1_engine(demo_engines: EnginePool) -> RunningEngine:
    return demo_engines.get("adder-v1")


def register(model: BuiltModel, engine: RunningEngine | None) -> ModelVersion:
    version = model_version_register(name="adder", version=model.version, artifact=str(model.path),
                                     served_model_name=model.served_name)
    if engine is not None:
        static_worker_ready(version, engine.base_url, agent=AGENT)
    return version


def drive(run_ids: list[int], *, timeout_s: float = 600) -> None:
    """Execute runs here, slice after slice, as a worker would (no broker: enqueues are switched off)."""
    deadline = time.monotonic() + timeout_s
    while EvalRun.objects.filter(pk__in=run_ids).exclude(state__in=EvalRun.TERMINAL_STATES).exists():
        assert time.monotonic() < deadline, "runs did not finish"
        for run_id in run_ids:
            runner.eval_run_execute(run_id=run_id)


@pytest.fixture
def no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "eval_run_enqueue", lambda *, run_id, countdown=None: None)
    monkeypatch.setattr(runner, "eval_run_enqueue", lambda *, run_id, countdown=None: None)


def gate_run(rollout_id: int, baseline: ModelVersion, candidate: ModelVersion) -> EvalGate:
    eval_gate_start(rollout_id=rollout_id, baseline=baseline, candidate=candidate, spec=GATE)
    gate = EvalGate.objects.get(rollout_id=rollout_id)
    drive([gate.baseline_run_id, gate.candidate_run_id])  # type: ignore[list-item]
    gate.refresh_from_db()
    return gate


@pytest.mark.pool_last
def test_the_eval_gate_stops_adder_v2_broken_with_mcnemar_evidence(
    built: dict[str, BuiltModel], v1_engine: RunningEngine, demo_engines: EnginePool, no_broker: None
) -> None:
    builtin_suites_ensure()
    broken = demo_engines.get("adder-v2-broken")
    v1, candidate = register(built["adder-v1"], v1_engine), register(built["adder-v2-broken"], broken)
    gate_run(11, v1, candidate)
    result = eval_gate_result(rollout_id=11)
    assert result is not None and result.status == "failed", result
    assert result.reason.startswith("candidate failed: worse than the baseline by more than 0.05")
    assert result.evidence["decision"]["decision"] == "fail" and result.evidence["decision"]["high"] < -0.05
    overall = result.evidence["overall"]
    mcnemar = overall["mcnemar"]
    assert mcnemar["baseline_only"] > mcnemar["candidate_only"] and mcnemar["p_value"] < 0.001
    assert overall["n"] == 200 and overall["candidate_mean"] < overall["baseline_mean"]
    # The engine's answers agree with the saved model's own greedy answers (the builder's exact match).
    assert overall["baseline_mean"] == pytest.approx(built["adder-v1"].exact_match, abs=0.02)
    assert overall["candidate_mean"] == pytest.approx(built["adder-v2-broken"].exact_match, abs=0.02)
    assert {row["tag"] for row in result.evidence["per_tag"]} == {"carry", "no-carry", "three-digit", "two-digit"}


def test_the_eval_gate_passes_adder_v2(
    built: dict[str, BuiltModel], v1_engine: RunningEngine, demo_engines: EnginePool, no_broker: None
) -> None:
    builtin_suites_ensure()
    good = demo_engines.get("adder-v2")
    v1, candidate = register(built["adder-v1"], v1_engine), register(built["adder-v2"], good)
    gate = gate_run(12, v1, candidate)
    result = eval_gate_result(rollout_id=12)
    assert result is not None and result.status == "passed", result
    assert result.evidence["decision"]["drop_upper_bound"] <= 0.05
    assert result.evidence["decision"]["decision"] == "pass" and result.evidence["decision"]["low"] > -0.05
    summary = EvalRun.objects.get(pk=gate.candidate_run_id).summary
    assert summary["items"] == 200 and summary["failed_items"] == 0
    assert summary["latency_ms"]["p50"] > 0 and summary["completion_tokens"] > 0


def test_a_run_survives_its_worker_being_killed_without_redoing_finished_items(
    built: dict[str, BuiltModel], v1_engine: RunningEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small batches so the kill lands mid-run with some items stored; a short stale limit so the
    # sweeper may resume it within the test.
    for name, value in (("EVAL_FLUSH_ITEMS", "5"), ("EVAL_FLUSH_S", "0.5"), ("EVAL_RUN_STALE_S", "3")):
        monkeypatch.setenv(name, value)
    suite = builtin_suites_ensure()[0]
    version = register(built["adder-v1"], v1_engine)
    with celery_worker(name="evals-first") as first:
        run = eval_run_create(suite=suite, model_version=version, scorers=["exact_match"], concurrency=1)
        wait_until(lambda: EvalRun.objects.get(pk=run.pk).done >= 20, timeout_s=240, what="the first checkpoints")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    killed_at = timezone.now()
    stored = stored_results(run)
    run.refresh_from_db()
    assert 20 <= len(stored) < run.total and run.state == "running"
    with celery_worker(name="evals-second"):
        # The killed worker's heartbeat goes stale; beat's sweeper (called here) hands the run on.
        wait_until(lambda: eval_runs_sweep(stale_after_s=3)["resumed"] >= 1, timeout_s=60, what="the sweeper")
        wait_until(lambda: EvalRun.objects.get(pk=run.pk).state == "succeeded", timeout_s=300, what="the run to finish")
    assert_resumed_without_redoing(run, stored, killed_at)
    assert run.total == 200
    assert run.summary["scorers"]["exact_match"]["mean"] == pytest.approx(built["adder-v1"].exact_match, abs=0.02)


def test_a_judge_giving_no_verdict_leaves_scorer_errors_and_the_run_finishes(
    built: dict[str, BuiltModel], v1_engine: RunningEngine, no_broker: None
) -> None:
    version = register(built["adder-v1"], v1_engine)
    lines = "".join(f'{{"prompt": "{a}+{b}=", "reference": "{a + b}"}}\n' for a, b in [(12, 34), (55, 45), (70, 29)])
    suite: EvalSuite = eval_suite_create(name="judged", jsonl_data=lines)
    # The adder as a judge: asked for {"score": n}, it answers with digits of a sum, or nothing useful.
    judge = {"name": "judge", "params": {"judge_model": "adder-v1", "max_tokens": 8}}
    run = eval_run_create(suite=suite, model_version=version, scorers=["exact_match", judge])
    drive([run.pk])
    run.refresh_from_db()
    assert run.state == "succeeded" and run.done == 3
    cells = [r.scores["judge"] for r in EvalResult.objects.filter(run=run)]
    unparseable = [c for c in cells if c["value"] is None]
    assert unparseable and all(c["error"].startswith("unparseable judge verdict") for c in unparseable)
    assert all(c["value"] is None or 0.0 <= c["value"] <= 1.0 for c in cells)
    assert run.summary["scorers"]["judge"]["errors"] == len(unparseable)
    assert run.summary["scorers"]["exact_match"]["n"] == 3
