"""The broker (Redis) is stopped for 30 s in the middle of a canary on real engines.

The combined server (web, API, /readyz and the gateway), a Celery worker and beat run as they do in
production. While Redis is down: every request is answered on the gateway's route table, request records
keep reaching the database (they never go through the broker), /readyz answers 503 naming the broker,
no look happens, and the web server's watchdog pauses the canary at its weights once three analysis
intervals have passed without a look (rollouts.watchdog). Redis is started again exactly as the machine
starts it; the first look lifts the watchdog's pause, the canary advances and promotes, and each decision
is applied once.

Only on a local Redis (CI sets CELERY_BROKER_URL=redis://127.0.0.1:6379/15): stopping it stops the
machine's Redis for everyone for 30 s. On the embedded default (kombu's filesystem transport) there is
no broker server to stop, so the test is skipped and says why."""

from __future__ import annotations

import time

import pytest
from django.utils import timezone

from rollouts.actors import SYSTEM
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.services import rollout_create
from serving.models import RequestRecord
from tests.faults.conftest import (
    Platform,
    Traffic,
    adder_static,
    answered,
    broker_is_local_redis,
    records_for,
    redis_start,
    redis_stop,
    redis_up,
)
from tests.support.demo import EnginePool
from tests.support.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.engines, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(900)]

OUTAGE_S = 30.0


def test_with_the_broker_down_traffic_and_records_go_on_and_the_analysis_resumes_after(
    demo_engines: EnginePool, platform: Platform
) -> None:
    if not broker_is_local_redis():
        pytest.skip("needs the broker to be this machine's Redis (CI's CELERY_BROKER_URL); kombu's filesystem "
                    "transport has no server to stop")
    assert redis_up(), "Redis is not running before the test"
    adder = adder_static(demo_engines)
    plan = {
        "alias": "adder", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "canary",
        # The first step outlasts the outage: its decision can only come after the broker is back.
        # Minimum requests: each step's floor (about 150 candidate requests for this guardrail). No bake:
        # promotion ends the rollout.
        "steps": [{"weight": 0.3, "min_duration_s": 60}, {"weight": 0.6, "min_duration_s": 60}],
        "guardrails": [{"metric": "error_rate", "margin": 0.05}], "bake_s": 0,
    }  # fmt: skip
    server = platform.gateway(combined=True)
    platform.worker("analysis")
    platform.beat()
    rollout = rollout_create(plan=plan, actor=SYSTEM, start=True).rollout
    server.wait_for_routes()

    with Traffic(server.url, adder.key, ["adder"], clients=2, max_tokens=8, pause_s=0.1, limit_s=400) as traffic:
        wait_until(lambda: RolloutAnalysis.objects.filter(rollout=rollout).count() >= 2, timeout_s=90,
                   what="the analysis to look at the canary")
        assert server.get("/readyz").status_code == 200
        records_before = RequestRecord.objects.filter(alias="adder").count()
        try:
            redis_stop()
            down_at, down_when = time.monotonic(), timezone.now()
            time.sleep(3)
            readyz = server.get("/readyz")
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            # Still down: what reached the database meanwhile came straight from the gateway.
            records_during = RequestRecord.objects.filter(alias="adder").count() - records_before
            looks_during = RolloutAnalysis.objects.filter(rollout=rollout, created_at__gt=down_when).count()
            still_down = server.get("/readyz").status_code
        finally:
            redis_start()
        up_at, up_when = time.monotonic(), timezone.now()
        wait_until(lambda: server.get("/readyz").status_code == 200, timeout_s=30, what="/readyz to be ready again")
        wait_until(lambda: Rollout.objects.get(pk=rollout.pk).is_terminal, timeout_s=240,
                   what="the canary to finish once the broker is back")
    sent = traffic.snapshot()
    during = [s for s in sent if down_at <= s.started < up_at]

    assert readyz.status_code == 503 and still_down == 503
    body = readyz.json()
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"].startswith("down: ")
    assert body["reason"].startswith("broker down: ")

    # Served throughout, on both arms of the split the gateway had.
    assert len(during) >= 20 and all(s.status == 200 and s.completed for s in sent)
    assert {s.arm for s in during} == {"baseline", "candidate"}
    assert records_during >= len(during) // 2 > 0
    assert looks_during <= 1  # at most one look already under way when Redis stopped
    ids = answered(sent)
    assert records_for(ids) == ids

    ended = Rollout.objects.get(pk=rollout.pk)
    assert ended.state == "promoted", ended.state_reason
    assert list(ended.events.order_by("seq").values_list("kind", "actor")) == [
        ("created", "system"), ("started", "system"), ("paused", "watchdog"), ("resumed", "analysis"),
        ("step_started", "analysis"), ("promoted", "analysis"),
    ]  # fmt: skip
    paused_at = ended.events.get(kind="paused").created_at
    assert down_when < paused_at < up_when and ended.events.get(kind="resumed").created_at > up_when
    looks = RolloutAnalysis.objects.filter(rollout=rollout)
    assert looks.filter(created_at__gt=up_when).exists()
    applied = list(looks.filter(applied=True).order_by("created_at").values_list("decision", "step_index"))
    assert applied == [("advance", 0), ("promote", 1)]
    assert ended.events.get(kind="step_started").created_at > up_when
