from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from evals.models import EvalItem, EvalRun, EvalSuite
from evals.scorers import ScoreInput, scorer_build
from evals.services import (
    ItemOutcome,
    builtin_suites_ensure,
    eval_run_checkpoint,
    eval_run_claim,
    eval_run_create,
    eval_run_finish,
    eval_suite_create,
)
from serving.models import ModelVersion
from serving.services import model_version_register

SMALL_SUITE = (
    '{"id": "a", "prompt": "12+30=", "reference": "42", "tags": ["no-carry"]}\n'
    '{"id": "b", "prompt": "19+23=", "reference": "42", "tags": ["carry"]}\n'
    '{"id": "c", "messages": [{"role": "user", "content": "55+45"}], "reference": "100", "tags": ["carry"]}\n'
)


@pytest.fixture
def versions(db: None) -> dict[str, ModelVersion]:
    # Artifacts that are not directories hash their name: enough for tests that start no engine.
    return {
        label: model_version_register(name="adder", version=label.split("-", 1)[1], artifact=f"/nonexistent/{label}")
        for label in ("adder-v1", "adder-v2", "adder-v2-broken")
    }


@pytest.fixture
def small_suite(db: None) -> EvalSuite:
    return eval_suite_create(name="small", jsonl_data=SMALL_SUITE)


@pytest.fixture
def adder_suite(db: None) -> EvalSuite:
    return builtin_suites_ensure()[0]


RunFactory = Callable[..., EvalRun]


@pytest.fixture
def finished_run() -> RunFactory:
    """A run finished through the runner's own services, with each item's output chosen by `answer`."""

    def make(*, suite: EvalSuite, version: ModelVersion, answer: Callable[[EvalItem], str],
             scorers: Sequence[object] = ("exact_match",), gate_rollout_id: int | None = None) -> EvalRun:
        run = eval_run_create(suite=suite, model_version=version, scorers=list(scorers),
                              gate_rollout_id=gate_rollout_id)
        token = eval_run_claim(run_id=run.pk)
        assert token
        built = {spec["label"]: scorer_build(spec) for spec in run.scorers}
        outcomes = []
        for item in suite.items.order_by("position"):
            output = answer(item)
            case = ScoreInput(output=output, reference=item.reference, prompt=item.prompt)
            outcomes.append(ItemOutcome(item_id=item.pk, output=output,
                                        scores={label: s(case).as_dict() for label, s in built.items()}))
        assert eval_run_checkpoint(run_id=run.pk, token=token, outcomes=outcomes).held
        assert eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.SUCCEEDED)
        run.refresh_from_db()
        return run

    return make
