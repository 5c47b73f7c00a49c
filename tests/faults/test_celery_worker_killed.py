"""A Celery worker killed with SIGKILL in the middle of its work: every piece is done again by another
worker, and none of it twice.

- an analysis holding its rollout's lease, decided and about to apply: the lease runs out (60 s), the next
  look applies the decision once;
- an eval run with checkpoints stored: the sweeper hands it to another worker, which finishes it without
  running a stored item again (tests/evals/test_eval_engines.py has the same kill on its own; here it
  shares the worker with the analysis);
- a shadow mirror taken from the queue and not acknowledged: the broker delivers it again (Redis, after
  its visibility timeout) and exactly one shadow pair is stored for the request.

The workers are the project's own (tests/faults/paused_celery.py holds them at those points)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from django.utils import timezone

from evals.models import EvalRun
from evals.services import builtin_suites_ensure, eval_run_create
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.services import rollout_create
from rollouts.tasks import analyse_rollout
from serving.models import ShadowPair
from serving.tasks import shadow_mirror
from tests.faults.conftest import Adder, Platform, adder_static, broker_is_local_redis
from tests.rollouts.helpers import both_arms, kinds, quick_plan, step_back
from tests.support.demo import EnginePool
from tests.support.eval_runs import assert_resumed_without_redoing, stored_results
from tests.support.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.engines, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(900)]


def test_a_worker_killed_mid_analysis_and_mid_eval_run_leaves_both_done_once(
    owner: Any, demo_engines: EnginePool, platform: Platform
) -> None:
    adder = adder_static(demo_engines)
    rollout = rollout_create(plan=quick_plan(), actor=owner.user, start=True).rollout
    step_back(rollout, 61)
    both_arms(rollout, total=1000, weight=0.1, seed=92)
    seen = Rollout.objects.get(pk=rollout.pk).version
    suite = builtin_suites_ensure()[0]
    small_batches = {"EVAL_FLUSH_ITEMS": "5", "EVAL_FLUSH_S": "0.5", "EVAL_RUN_STALE_S": "3"}

    first = platform.worker("doomed", concurrency=2, pause=["analysis", "eval"], **small_batches)
    analyse_rollout.delay(rollout.pk)
    run = eval_run_create(suite=suite, model_version=adder.v1, scorers=["exact_match"], concurrency=1)
    wait_until(lambda: platform.paused("analysis") and platform.paused("eval"), timeout_s=180,
               what="the analysis and the eval run to be under way")
    first.kill()
    killed_at = timezone.now()

    # Killed holding the lease, before anything was applied; with ten or more items of the run stored.
    held = Rollout.objects.get(pk=rollout.pk)
    assert held.version == seen and held.analysis_lease_until is not None
    assert not RolloutAnalysis.objects.filter(rollout=rollout).exists()
    stored = stored_results(run)
    assert 10 <= len(stored) < run.total
    assert EvalRun.objects.get(pk=run.pk).state == "running"

    # Another worker, and beat looking every 2 s and sweeping stale runs.
    platform.worker("heir", **small_batches)
    platform.beat(EVAL_RUN_STALE_S="3")
    wait_until(lambda: Rollout.objects.get(pk=rollout.pk).step_index == 1, timeout_s=150,
               what="the next look after the lease ran out")
    wait_until(lambda: EvalRun.objects.get(pk=run.pk).state == "succeeded", timeout_s=300,
               what="the eval run to finish on the other worker")

    after = Rollout.objects.get(pk=rollout.pk)
    assert kinds(after) == ["created", "started", "step_started"]
    assert after.version == seen + 1
    applied = RolloutAnalysis.objects.filter(rollout=rollout, applied=True)
    assert applied.count() == 1 and applied.get().decision == "advance"
    # The lease, not luck: no look ran before the dead worker's lease ran out.
    first_look = RolloutAnalysis.objects.filter(rollout=rollout).order_by("created_at").first()
    assert first_look is not None and first_look.created_at >= held.analysis_lease_until

    assert_resumed_without_redoing(run, stored, killed_at)
    assert run.total == 200


def _mirror(adder: Adder, n: int) -> dict[str, Any]:
    """A shadow hand-off as the gateway makes it after serving a baseline request, for an alias that stores
    prompts (only then does the pair keep the candidate's answer, which the test checks)."""
    a, b = 10 + n, 20 + n
    return {
        "request_id": f"faults-{os.getpid()}-{time.monotonic_ns()}-{n}", "created_at": datetime.now(UTC).isoformat(),
        "alias": "adder", "rollout_id": None, "endpoint": "chat.completions", "store_prompts": True,
        "body": {"model": "adder", "messages": [{"role": "user", "content": f"{a}+{b}"}], "max_tokens": 8},
        "baseline_version_id": adder.v1.pk, "candidate_version_id": adder.v2.pk, "prompt_text": f"user: {a}+{b}",
        "baseline_output": str(a + b), "baseline_ttft_ms": 5.0, "baseline_e2e_ms": 9.0,
        "baseline_completion_tokens": 3,
    }  # fmt: skip


def test_a_worker_killed_mid_shadow_mirror_stores_its_pair_once_after_redelivery(
    demo_engines: EnginePool, platform: Platform
) -> None:
    if not broker_is_local_redis():
        pytest.skip(
            "needs the Redis broker (CI's CELERY_BROKER_URL): kombu's filesystem transport deletes a message when "
            "a worker takes it, so a mirror in flight on a killed worker is never delivered again"
        )
    adder = adder_static(demo_engines)
    mirrors = [_mirror(adder, n) for n in range(3)]
    redeliver = {"CELERY_VISIBILITY_TIMEOUT": "10"}  # the least the settings allow

    first = platform.worker("doomed-mirror", pause=["shadow"], **redeliver)
    for payload in mirrors:
        shadow_mirror.delay(payload)
    wait_until(lambda: platform.paused("shadow"), timeout_s=60, what="a mirror to be taken")
    first.kill()
    assert not ShadowPair.objects.exists()

    platform.worker("heir-mirror", **redeliver)
    ids = {m["request_id"] for m in mirrors}
    wait_until(lambda: ShadowPair.objects.filter(request_id__in=ids).count() == 3, timeout_s=180,
               what="every mirror, the killed one redelivered")
    pairs = list(ShadowPair.objects.all())
    assert sorted(p.request_id for p in pairs) == sorted(ids)
    assert all(p.candidate_outcome == "ok" and p.candidate_output and p.candidate_version_id == adder.v2.pk
               and p.texts_stored and p.baseline_replay_outcome == "ok" for p in pairs), [
        (p.candidate_outcome, p.candidate_error, p.candidate_output, p.baseline_replay_outcome) for p in pairs
    ]
