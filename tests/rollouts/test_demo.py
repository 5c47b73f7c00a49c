"""The demo seeding `make run` does: idempotent, and the canaries start once their engines are ready."""

from __future__ import annotations

from typing import Any

import pytest

from evals.services import builtin_suites_ensure
from rollouts.demo import DEMO_PLANS, demo_ensure
from rollouts.models import Rollout
from rollouts.tasks import analyse_live_rollouts
from serving.models import EngineWorker, GatewayKey
from serving.selectors import alias_get
from serving.services import gateway_key_digest
from tests.rollouts.helpers import engine_ready, version

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo_versions() -> None:
    for label in ("adder-v1", "adder-v2", "adder-v2-slow", "adder-v2-broken"):
        version(label, ready=False, price_in=0.1, price_out=0.2)
    builtin_suites_ensure()  # the broken canary's eval gate runs adder-heldout


def test_the_demo_is_seeded_once_and_starts_when_its_engines_are_ready(
    demo_versions: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLATFORM_DEMO_GATEWAY_KEY", "gw_demo-key-for-tests")
    monkeypatch.setattr("rollouts.tasks.analyse_rollout.delay", lambda rollout_id: None)
    lines: list[str] = []
    state = demo_ensure(log=lines.append)
    assert state.ready and sorted(state.workers_created) == ["adder-v1", "adder-v2", "adder-v2-slow"]
    # The broken candidate's engine is asked for by its canary, created to start when ready.
    assert sorted(EngineWorker.objects.filter(driver="local").values_list("model_version__served_model_name",
                                                                          flat=True)) == [
        "adder-v1", "adder-v2", "adder-v2-broken", "adder-v2-slow"]
    broken = Rollout.objects.get(alias_name="adder-broken-demo")
    assert [e["version"] for e in broken.events.get(kind="created").evidence["engines_requested"]] == ["adder-v2-broken"]
    assert broken.plan["eval_gate"]["suite"] == "adder-heldout"
    for alias in ("adder", "adder-slow-demo", "adder-broken-demo"):
        assert alias_get(name=alias).baseline.label == "adder-v1"  # type: ignore[union-attr]
    assert GatewayKey.objects.filter(key_hash=gateway_key_digest("gw_demo-key-for-tests")).exists()
    rollouts = {r.alias_name: r for r in Rollout.objects.all()}
    assert set(rollouts) == set(DEMO_PLANS)
    assert all(r.state == "draft" and r.start_when_ready for r in rollouts.values())
    assert any("starts once its engines are ready" in line for line in lines)

    again = demo_ensure(log=lines.append)  # `make run` again
    assert again.workers_created == [] and again.rollouts == state.rollouts
    assert Rollout.objects.count() == 3 and EngineWorker.objects.count() == 4 and GatewayKey.objects.count() == 1

    analyse_live_rollouts.apply()  # engines not ready yet: still drafts
    assert set(Rollout.objects.values_list("state", flat=True)) == {"draft"}
    for worker in EngineWorker.objects.all():
        engine_ready(worker.model_version)
    analyse_live_rollouts.apply()
    assert dict(Rollout.objects.values_list("alias_name", "state")) == {
        "adder": "running", "adder-slow-demo": "running", "adder-broken-demo": "gating"}
    assert alias_get(name="adder").candidate_weight == 0.25  # type: ignore[union-attr]
    started = Rollout.objects.get(alias_name="adder").events.order_by("seq").last()
    assert started is not None and (started.kind, started.actor) == ("started", "system")


def test_without_the_demo_models_nothing_is_seeded() -> None:
    lines: list[str] = []
    state = demo_ensure(log=lines.append)
    assert not state.ready and "build_demo_models" in lines[0]
    assert not Rollout.objects.exists()


def test_a_generated_demo_key_is_kept_across_runs(demo_versions: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, settings: Any) -> None:
    monkeypatch.delenv("PLATFORM_DEMO_GATEWAY_KEY", raising=False)
    settings.VAR_DIR = tmp_path
    first = demo_ensure(log=lambda line: None)
    second = demo_ensure(log=lambda line: None)
    assert first.key_generated and not second.key_generated
    assert first.gateway_key == second.gateway_key and first.gateway_key.startswith("gw_")
    assert (tmp_path / "secrets" / "demo_gateway_key").exists()
