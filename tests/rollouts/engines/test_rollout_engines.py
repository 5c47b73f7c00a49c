"""Rollouts on real engines, end to end: vLLM engines serving the demo models, the gateway as its own
process, a real Celery worker and beat running the analysis every 2 s, and `manage.py demo_load` sending
traffic. Nobody touches the rollout after it starts: it must decide by itself.

- a canary from adder-v1 to adder-v2 promotes through all its steps;
- a canary from adder-v1 to adder-v2-slow (the same answers from a model many times the size) rolls back
  on its TPOT guardrail, and the gateway stops sending users to it (marked `pool_last`: it runs after
  every other engine test, so adder-v2-slow does not push out an engine they share).

Engines come from the session's pool (tests/support/demo.py): adder-v1 and one candidate per test, each
holding a machine-wide slot."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings

from rollouts.actors import SYSTEM
from rollouts.models import Rollout
from rollouts.services import rollout_create
from serving.models import ModelVersion, RequestRecord
from serving.selectors import alias_get
from serving.services import gateway_key_create
from tests.support.demo import EnginePool, static_worker_ready, version_register
from tests.support.engines import free_port
from tests.support.processes import SERVER_FLAGS, VENV_BIN, celery_queues, child_env, child_process

# Engines start slowly on a busy machine and may wait for a free slot.
pytestmark = [pytest.mark.engines, pytest.mark.django_db(transaction=True), pytest.mark.timeout(2400)]

LOG_DIR = Path(settings.VAR_DIR) / "test-logs"
AGENT = "rollout-engine-tests"
DECIDE_WITHIN_S = 600
# Three steps of at least a minute each, each bounded by its planned sample, and a minute's bake.
PROMOTE_WITHIN_S = 900

def registered(label: str, pool: EnginePool) -> ModelVersion:
    """The version, and a static engine worker marked READY the way the engine agent does it."""
    model_version = version_register(pool.model(label))
    static_worker_ready(model_version, pool.get(label).base_url, agent=AGENT)
    return model_version


class Platform:
    """The gateway, a Celery worker and beat, and the demo load, as child processes of this test."""

    def __init__(self, stack: ExitStack, key: str) -> None:
        self.stack = stack
        self.key = key
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        env = {"ROLLOUT_ANALYSIS_INTERVAL_S": "2"}
        stack.enter_context(child_process(
            [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--host", "127.0.0.1", "--port", str(port),
             *SERVER_FLAGS],
            log_path=LOG_DIR / f"rollout-engines-gateway-{port}.log", env=child_env(**env),
            ready="Application startup complete", timeout_s=90,
        ))  # fmt: skip
        stack.enter_context(child_process(
            [str(VENV_BIN / "celery"), "-A", "config", "worker", "--loglevel", "INFO", "--concurrency", "1",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"rollout-engines-{port}@%h",
             "-Q", celery_queues()],
            log_path=LOG_DIR / "rollout-engines-worker.log", env=child_env(**env), ready="ready.", timeout_s=90,
        ))  # fmt: skip
        stack.enter_context(child_process(
            [str(VENV_BIN / "celery"), "-A", "config", "beat", "--loglevel", "INFO",
             "-s", str(LOG_DIR / f"rollout-engines-beat-{port}")],
            log_path=LOG_DIR / "rollout-engines-beat.log", env=child_env(**env),
        ))  # fmt: skip

    def load(self, alias: str, *, rate: float) -> None:
        self.stack.enter_context(child_process(
            [sys.executable, "manage.py", "demo_load", "--url", self.gateway_url, "--alias", alias, "--rate", str(rate),
             "--users", "20000", "--concurrency", "6"],
            log_path=LOG_DIR / f"rollout-engines-load-{alias}.log", env=child_env(PLATFORM_DEMO_GATEWAY_KEY=self.key),
        ))  # fmt: skip


@pytest.fixture
def platform() -> Iterator[Platform]:
    with ExitStack() as stack:
        yield Platform(stack, gateway_key_create(name="rollout-engine-tests").raw)


def until_ended(rollout: Rollout, timeout_s: float = DECIDE_WITHIN_S) -> Rollout:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = Rollout.objects.select_related("baseline", "candidate").get(pk=rollout.pk)
        if current.is_terminal:
            return current
        time.sleep(1.0)
    current = Rollout.objects.get(pk=rollout.pk)
    looks = list(current.analyses.order_by("-id").values_list("decision", "reason")[:5])
    raise AssertionError(f"rollout still {current.state} (step {current.step_index}) after {timeout_s} s; last looks: {looks}")


def test_a_canary_to_adder_v2_promotes_through_all_its_steps(demo_engines: EnginePool, platform: Platform) -> None:
    registered("adder-v1", demo_engines)
    registered("adder-v2", demo_engines)
    plan = {
        "alias": "adder-good", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "canary",
        # Each step ends once its guardrail is shown safe after a minute and its floor of requests; then the
        # promotion bakes for a minute against a 5 % holdout. Two engines, the gateway, the worker and the load
        # share two cores, so TPOT is noisy: the first step takes half the traffic and the margin is wide, so
        # that the first step (where the evidence starts from nothing) ends in minutes even on a busy machine
        # (at 20 % and a 50 % margin it once took 12 of them). The later steps pool the evidence so far.
        "steps": [
            {"weight": "50%", "min_duration_s": 60},
            {"weight": "80%", "min_duration_s": 60},
            {"weight": "100%", "min_duration_s": 60},
        ],
        "guardrails": [{"metric": "tpot_gmean_ms", "margin": "100%"}],
        # The test follows the flow through real engines; on a shared CPU a step may not show the margin
        # within the test's time, so one left undecided at its planned sample goes on rather than pausing.
        "on_inconclusive": "advance",
        "bake_s": 60,
    }  # fmt: skip
    rollout = rollout_create(plan=plan, actor=SYSTEM, start=True).rollout
    # At 8 requests/s the first step's candidate gets about 4 a second; each step is bounded by its planned sample
    # (on_inconclusive: advance), so the flow ends within minutes of its four minimum minutes.
    platform.load("adder-good", rate=8)

    ended = until_ended(rollout, timeout_s=PROMOTE_WITHIN_S)
    assert ended.state == "promoted", ended.state_reason
    kinds = list(ended.events.order_by("seq").values_list("kind", "actor"))
    assert kinds == [
        ("created", "system"), ("started", "system"), ("step_started", "analysis"), ("step_started", "analysis"),
        ("promoted", "analysis"), ("baked", "analysis"),
    ]  # fmt: skip
    steps_seen = set(ended.analyses.values_list("step_index", flat=True))
    assert steps_seen == {0, 1, 2}
    alias = alias_get(name="adder-good")
    assert alias is not None and alias.baseline.label == "adder-v2" and alias.candidate is None
    served = RequestRecord.objects.filter(alias="adder-good", rollout_id=rollout.pk)
    assert served.filter(arm="candidate", outcome="ok").count() >= 80


@pytest.mark.pool_last
def test_a_canary_to_the_slow_model_rolls_back_on_its_tpot_guardrail_by_itself(
    demo_engines: EnginePool, platform: Platform
) -> None:
    registered("adder-v1", demo_engines)
    registered("adder-v2-slow", demo_engines)
    plan = {
        "alias": "adder-slow", "baseline": "adder-v1", "candidate": "adder-v2-slow", "strategy": "canary",
        "steps": [
            # Held long enough that only a breach can end this step.
            {"weight": "30%", "min_duration_s": 1800},
            {"weight": "100%", "min_duration_s": 60},
        ],
        "guardrails": [{"metric": "tpot_mean_ms", "margin": "10%"}, {"metric": "error_rate", "margin": 0.05}],
    }  # fmt: skip
    rollout = rollout_create(plan=plan, actor=SYSTEM, start=True).rollout
    platform.load("adder-slow", rate=5)

    ended = until_ended(rollout)
    assert ended.state == "rolled_back", ended.state_reason
    event = ended.events.order_by("seq").last()
    assert event is not None and (event.kind, event.actor) == ("rolled_back", "analysis")
    assert "tpot_mean_ms" in event.reason
    tpot = next(c for c in event.evidence["checks"] if c["metric"] == "tpot_mean_ms")
    assert tpot["decision"] == "breach" and tpot["low"] > 0.10
    arms = event.evidence["arms"]
    assert arms["candidate"]["tpot_mean_ms"] > 1.1 * arms["baseline"]["tpot_mean_ms"]
    alias = alias_get(name="adder-slow")
    assert alias is not None and alias.candidate is None and alias.baseline.label == "adder-v1"

    # Within a second every gateway routes everyone to the baseline again.
    settled = ended.ended_at
    assert settled is not None
    time.sleep(6)
    after = RequestRecord.objects.filter(alias="adder-slow", created_at__gt=settled + timedelta(seconds=1))
    assert after.exists() and set(after.values_list("arm", flat=True)) == {"baseline"}
