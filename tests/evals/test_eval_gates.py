"""Eval gates without engines: the spec's errors, start (idempotent, reusing runs), the decision, cancel.

The runs here are finished through the runner's own services with chosen answers; the gates with real
engines and real models are in test_eval_engines.py."""

from __future__ import annotations

import json

import pytest

from config.errors import DomainError
from evals.models import EvalGate, EvalRun
from evals.selectors import eval_gate_result
from evals.services import eval_gate_cancel, eval_gate_start, eval_gate_validate, eval_runs_sweep

SPEC = {"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 0.05}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"scorer": "exact_match", "max_drop": 0.05}, "eval_gate.suite"),
        ({"suite": "nope", "scorer": "exact_match", "max_drop": 0.05}, "eval_gate.suite"),
        ({"suite": "adder-heldout", "suite_version": 7, "scorer": "exact_match", "max_drop": 0.05}, "eval_gate.suite"),
        ({"suite": "adder-heldout", "max_drop": 0.05}, "eval_gate.scorer"),
        ({"suite": "adder-heldout", "scorer": "bleu", "max_drop": 0.05}, "eval_gate.scorer.name"),
        ({"suite": "adder-heldout", "scorer": {"name": "numeric", "params": {"tolerance": "x"}}, "max_drop": 0.05},
         "eval_gate.scorer.params.tolerance"),
        ({"suite": "adder-heldout", "scorer": "exact_match"}, "eval_gate.max_drop"),
        ({"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 1.5}, "eval_gate.max_drop"),
        ({"suite": "adder-heldout", "scorer": "exact_match", "min_score": "high"}, "eval_gate.min_score"),
        ({"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 0.1, "alpha": 0.9}, "eval_gate.alpha"),
        ({"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 0.1, "margin": 1}, "eval_gate.margin"),
        ({"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 0.1, "concurrency": 0}, "eval_gate.concurrency"),
    ],
)
def test_gate_spec_errors_name_the_key(spec: dict, field: str, adder_suite) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DomainError) as caught:
        eval_gate_validate(spec=spec)
    assert caught.value.field == field


def test_gate_spec_is_normalised(adder_suite) -> None:  # type: ignore[no-untyped-def]
    spec = eval_gate_validate(spec={"suite": "adder-heldout", "scorer": "exact_match", "min_score": 0.8})
    assert spec == {
        "suite": "adder-heldout", "suite_version": None,
        "scorer": {"name": "exact_match", "label": "exact_match", "params": {}},
        "max_drop": None, "min_score": 0.8, "alpha": 0.05, "concurrency": 4, "max_tokens": 64,
    }


def _right(item) -> str:  # type: ignore[no-untyped-def]
    return item.reference


def _wrong_on_carries(item) -> str:  # type: ignore[no-untyped-def]
    return "0" if "carry" in item.tags else item.reference


def test_a_worse_candidate_fails_with_mcnemar_evidence(adder_suite, versions, finished_run) -> None:  # type: ignore[no-untyped-def]
    baseline = finished_run(suite=adder_suite, version=versions["adder-v1"], answer=_right)
    eval_gate_start(rollout_id=1, baseline=versions["adder-v1"], candidate=versions["adder-v2-broken"], spec=SPEC)
    gate = EvalGate.objects.get(rollout_id=1)
    assert gate.baseline_run_id == baseline.pk  # reused: same suite version, version and lineage
    assert eval_gate_result(rollout_id=1).status == "pending"  # type: ignore[union-attr]
    candidate_run = EvalRun.objects.get(pk=gate.candidate_run_id)
    assert candidate_run.gate_rollout_id == 1 and candidate_run.state == "queued"
    # The candidate's run, done by "the worker": wrong on every carry.
    candidate = finished_run(suite=adder_suite, version=versions["adder-v2-broken"], answer=_wrong_on_carries)
    EvalGate.objects.filter(pk=gate.pk).update(candidate_run=candidate)
    candidate_run.delete()
    assert eval_runs_sweep()["gates"] == 1
    result = eval_gate_result(rollout_id=1)
    assert result is not None and result.status == "failed"
    assert result.reason.startswith("candidate failed: worse than the baseline by more than 0.05")
    evidence = result.evidence
    assert json.loads(json.dumps(evidence)) == evidence
    carries = adder_suite.tags["carry"]
    assert evidence["overall"]["mcnemar"]["baseline_only"] == carries
    assert evidence["overall"]["mcnemar"]["candidate_only"] == 0
    assert evidence["overall"]["mcnemar"]["p_value"] < 1e-20
    by_tag = {row["tag"]: row for row in evidence["per_tag"]}
    assert by_tag["carry"]["candidate_mean"] == 0.0 and by_tag["no-carry"]["difference"] == 0.0
    decision = evidence["decision"]
    assert decision["max_drop"] == 0.05 and decision["decision"] == "fail" and decision["alpha"] == 0.05
    assert decision["high"] < -0.4 and decision["drop_upper_bound"] > 0.4 and decision["n"] == 200
    assert decision["method"] == "tango-score+exact-unconditional" and decision["items_needed"] is None
    assert evidence["baseline"]["run_id"] == baseline.pk and evidence["suite"]["name"] == "adder-heldout"


def test_an_equal_candidate_passes_and_start_is_idempotent(adder_suite, versions, finished_run) -> None:  # type: ignore[no-untyped-def]
    finished_run(suite=adder_suite, version=versions["adder-v1"], answer=_right)
    finished_run(suite=adder_suite, version=versions["adder-v2"], answer=_right)
    eval_gate_start(rollout_id=2, baseline=versions["adder-v1"], candidate=versions["adder-v2"], spec=SPEC)
    eval_gate_start(rollout_id=2, baseline=versions["adder-v1"], candidate=versions["adder-v2"], spec=SPEC)
    assert EvalGate.objects.filter(rollout_id=2).count() == 1
    assert EvalRun.objects.count() == 2  # both reused, none started
    from evals.services import eval_gate_decide

    eval_gate_decide(gate_id=EvalGate.objects.get(rollout_id=2).pk)
    result = eval_gate_result(rollout_id=2)
    assert result is not None and result.status == "passed"
    assert "McNemar exact p = 1" in result.reason
    assert result.evidence["decision"]["low"] > -0.05


def test_a_suite_too_small_for_its_margin_is_undecided_not_passed(versions, finished_run) -> None:  # type: ignore[no-untyped-def]
    from evals.services import eval_gate_decide, eval_suite_create

    lines = "".join(f'{{"id": "s{i}", "prompt": "{i}+1=", "reference": "{i + 1}"}}\n' for i in range(5))
    small = eval_suite_create(name="five-sums", jsonl_data=lines)
    finished_run(suite=small, version=versions["adder-v1"], answer=_right)
    finished_run(suite=small, version=versions["adder-v2"], answer=_right)
    spec = {"suite": "five-sums", "scorer": "exact_match", "max_drop": 0.02}
    eval_gate_start(rollout_id=7, baseline=versions["adder-v1"], candidate=versions["adder-v2"], spec=spec)
    eval_gate_decide(gate_id=EvalGate.objects.get(rollout_id=7).pk)
    result = eval_gate_result(rollout_id=7)
    assert result is not None and result.status == "undecided"
    assert result.reason.startswith("undecided: 5 items cannot show the candidate is within 0.02 of the baseline")
    assert "about 133 items would show it" in result.reason
    assert result.evidence["decision"]["items_needed"] == 133 and result.evidence["decision"]["low"] < -0.3
    # The rollout reads an undecided gate as not passed.
    from rollouts import gates

    assert gates.eval_gate_result(rollout_id=7).status == "failed"


def test_min_score_alone(adder_suite, versions, finished_run) -> None:  # type: ignore[no-untyped-def]
    from evals.services import eval_gate_decide

    finished_run(suite=adder_suite, version=versions["adder-v1"], answer=_wrong_on_carries)
    finished_run(suite=adder_suite, version=versions["adder-v2"], answer=_wrong_on_carries)
    spec = {"suite": "adder-heldout", "scorer": "exact_match", "min_score": 0.9}
    eval_gate_start(rollout_id=3, baseline=versions["adder-v1"], candidate=versions["adder-v2"], spec=spec)
    eval_gate_decide(gate_id=EvalGate.objects.get(rollout_id=3).pk)
    result = eval_gate_result(rollout_id=3)
    assert result is not None and result.status == "failed" and "below the minimum 0.9" in result.reason


def test_a_failed_run_makes_the_gate_an_error(adder_suite, versions, finished_run) -> None:  # type: ignore[no-untyped-def]
    from evals.services import eval_run_claim, eval_run_finish

    finished_run(suite=adder_suite, version=versions["adder-v1"], answer=_right)
    eval_gate_start(rollout_id=4, baseline=versions["adder-v1"], candidate=versions["adder-v2"], spec=SPEC)
    gate = EvalGate.objects.get(rollout_id=4)
    token = eval_run_claim(run_id=gate.candidate_run_id)
    assert token
    eval_run_finish(run_id=gate.candidate_run_id, token=token, state=EvalRun.State.FAILED,
                    reason="no ready engine after 900 s")
    result = eval_gate_result(rollout_id=4)
    assert result is not None and result.status == "error"
    assert "candidate run" in result.reason and "no ready engine" in result.reason


def test_cancel_stops_the_gates_own_runs_but_not_reused_ones(adder_suite, versions, finished_run) -> None:  # type: ignore[no-untyped-def]
    eval_gate_start(rollout_id=5, baseline=versions["adder-v1"], candidate=versions["adder-v2"], spec=SPEC)
    eval_gate_start(rollout_id=6, baseline=versions["adder-v1"], candidate=versions["adder-v2-broken"], spec=SPEC)
    gate5, gate6 = EvalGate.objects.get(rollout_id=5), EvalGate.objects.get(rollout_id=6)
    assert gate6.baseline_run_id == gate5.baseline_run_id  # the in-progress baseline run is shared
    eval_gate_cancel(rollout_id=5)
    eval_gate_cancel(rollout_id=5)
    assert eval_gate_result(rollout_id=5) == eval_gate_result(rollout_id=5)
    assert eval_gate_result(rollout_id=5).status == "error"  # type: ignore[union-attr]
    assert EvalRun.objects.get(pk=gate5.candidate_run_id).state == "cancelled"
    assert EvalRun.objects.get(pk=gate5.baseline_run_id).state == "queued"  # gate 6 still needs it
    assert eval_gate_result(rollout_id=6).status == "pending"  # type: ignore[union-attr]
    assert eval_gate_result(rollout_id=99) is None
