"""The eval gate path: start -> gating -> (the evals app decides) -> first step, or rolled back with evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

import evals.selectors
import evals.services
from rollouts.analysis import rollout_analyse
from rollouts.models import Notification, Rollout
from rollouts.plans import PlanInvalid
from rollouts.services import rollout_create, rollout_rollback
from serving.selectors import alias_get
from tests.rollouts.helpers import canary_plan, kinds, version

pytestmark = pytest.mark.django_db

GATE = {"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 0.05}


@dataclass
class FakeGateResult:
    status: str
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeEvals:
    """The evals app's gate functions, recorded (unit tests only; the real integration is below)."""

    result: FakeGateResult | None = None
    started: list[int] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)


@pytest.fixture
def fake_evals(monkeypatch: pytest.MonkeyPatch) -> FakeEvals:
    fake = FakeEvals()

    def validate(*, spec: dict[str, Any]) -> dict[str, Any]:
        from config.errors import DomainError

        if "suite" not in spec:
            raise DomainError("suite is required", field="eval_gate.suite")
        return {**spec, "alpha": 0.05}

    monkeypatch.setattr(evals.services, "eval_gate_validate", validate)
    def start(*, rollout_id: int, baseline: Any, candidate: Any, spec: dict[str, Any]) -> None:
        fake.started.append(rollout_id)
        fake.alphas.append(spec["alpha"])

    monkeypatch.setattr(evals.services, "eval_gate_start", start)
    monkeypatch.setattr(evals.services, "eval_gate_cancel", lambda *, rollout_id: fake.cancelled.append(rollout_id))
    monkeypatch.setattr(evals.selectors, "eval_gate_result", lambda *, rollout_id: fake.result)
    return fake


@pytest.fixture
def versions() -> None:
    version("adder-v1")
    version("adder-v2")


def gated(owner: Any, capture: Any) -> Rollout:
    with capture(execute=True):
        return rollout_create(plan=canary_plan(eval_gate=GATE), actor=owner.user, start=True).rollout


def test_a_passed_gate_starts_the_first_step(
    owner: Any, versions: None, fake_evals: FakeEvals, django_capture_on_commit_callbacks: Any
) -> None:
    rollout = gated(owner, django_capture_on_commit_callbacks)
    assert rollout.state == "gating" and fake_evals.started == [rollout.pk]
    assert rollout.plan["eval_gate"]["alpha"] == 0.05  # stored as the evals app normalised it
    # The gate runs at its share of the rollout's one alpha: two guardrails and the gate split 0.05 (the
    # guardrails' checks on the bake alone take half of their breach sides, no share; 0.05 / 5 when they did).
    assert fake_evals.alphas == [pytest.approx(0.05 / 3)]
    alias = alias_get(name="adder")
    assert alias is not None and alias.candidate_weight == 0.0  # no traffic moves while gating

    fake_evals.result = FakeGateResult("pending", "running the suite: 10/100")
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None and analysis.decision == "hold" and "10/100" in analysis.reason

    fake_evals.result = FakeGateResult("passed", "no worse than the baseline", {"decision": {"drop": 0.0}})
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None and analysis.decision == "gate_passed"
    rollout = Rollout.objects.get(pk=rollout.pk)
    assert (rollout.state, rollout.step_index) == ("running", 0)
    assert alias_get(name="adder").candidate_weight == 0.1  # type: ignore[union-attr]
    event = rollout.events.order_by("seq").last()
    assert event is not None and event.kind == "eval_gate_passed" and event.evidence["eval_gate"]["status"] == "passed"


def test_a_failed_gate_rolls_back_with_the_comparison_and_notifies(
    owner: Any, versions: None, fake_evals: FakeEvals, django_capture_on_commit_callbacks: Any
) -> None:
    rollout = gated(owner, django_capture_on_commit_callbacks)
    fake_evals.result = FakeGateResult(
        "failed", "the candidate is worse by 0.31 (McNemar p=1e-9)", {"decision": {"drop": 0.31, "max_drop": 0.05}}
    )
    assert rollout_analyse(rollout_id=rollout.pk).decision == "gate_failed"  # type: ignore[union-attr]
    rollout = Rollout.objects.get(pk=rollout.pk)
    assert rollout.state == "rolled_back" and "worse by 0.31" in rollout.state_reason
    event = rollout.events.order_by("seq").last()
    assert event is not None and (event.kind, event.to_state) == ("eval_gate_failed", "rolled_back")
    assert event.evidence["eval_gate"]["evidence"]["decision"]["drop"] == 0.31
    assert Notification.objects.filter(event=event).exists()


def test_a_gate_error_pauses_and_a_lost_start_is_asked_again(
    owner: Any, versions: None, fake_evals: FakeEvals, django_capture_on_commit_callbacks: Any
) -> None:
    rollout = gated(owner, django_capture_on_commit_callbacks)
    fake_evals.result = None  # the evals app never heard of it
    rollout_analyse(rollout_id=rollout.pk)
    assert fake_evals.started == [rollout.pk, rollout.pk]
    fake_evals.result = FakeGateResult("error", "the engine of adder-v2 is not ready")
    assert rollout_analyse(rollout_id=rollout.pk).decision == "pause"  # type: ignore[union-attr]
    rollout = Rollout.objects.get(pk=rollout.pk)
    assert (rollout.state, rollout.paused_from) == ("paused", "gating")


def test_rolling_back_while_gating_cancels_the_gate(
    owner: Any, versions: None, fake_evals: FakeEvals, django_capture_on_commit_callbacks: Any
) -> None:
    rollout = gated(owner, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        rollout_rollback(rollout=rollout, actor=owner.user, reason="not today")
    assert fake_evals.cancelled == [rollout.pk]


def test_a_bad_gate_spec_is_refused_at_creation_naming_the_field(owner: Any, versions: None, fake_evals: FakeEvals) -> None:
    with pytest.raises(PlanInvalid) as invalid:
        rollout_create(plan=canary_plan(eval_gate={"scorer": "exact_match"}), actor=owner.user)
    assert invalid.value.errors == {"eval_gate.suite": ["suite is required"]}


# --- with the real evals app (no engines: the gate's runs stay queued) ---------------------------


def test_the_real_evals_app_validates_starts_and_cancels_the_gate(
    owner: Any, versions: None, django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evals.services, "eval_run_enqueue", lambda **kwargs: None)  # no worker in this test
    evals.services.builtin_suites_ensure()
    with pytest.raises(PlanInvalid) as invalid:
        rollout_create(plan=canary_plan(eval_gate={**GATE, "suite": "nope"}), actor=owner.user)
    assert list(invalid.value.errors) == ["eval_gate.suite"]

    rollout = gated(owner, django_capture_on_commit_callbacks)
    assert rollout.plan["eval_gate"]["scorer"]["name"] == "exact_match"
    result = evals.selectors.eval_gate_result(rollout_id=rollout.pk)
    assert result is not None and result.status == "pending"
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None and analysis.decision == "hold" and analysis.reason.startswith("eval gate pending")

    with django_capture_on_commit_callbacks(execute=True):
        rollout_rollback(rollout=rollout, actor=owner.user, reason="changed my mind")
    gate = evals.selectors.eval_gate_result(rollout_id=rollout.pk)
    assert gate is not None and gate.status == "error" and "cancelled" in gate.reason
    assert kinds(Rollout.objects.get(pk=rollout.pk)) == ["created", "gating", "rolled_back"]
