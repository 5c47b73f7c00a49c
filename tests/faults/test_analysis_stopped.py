"""The analysis stops (the Celery worker and beat both stopped): the web server's watchdog pauses the running
canary at its weights within three analysis intervals, says so in Slack (a stand-in of Slack's Web API), on
/metrics and on the rollout's page, and the rollout resumes where it left off once a worker and beat are
back. The processes are the platform's own (web server with the gateway, worker, beat); the two versions'
engines are registered ready and never called (no traffic is needed to judge whether looks happen)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from rollouts.actors import SYSTEM
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.services import rollout_create
from serving.models import Alias
from tests.faults.conftest import Platform
from tests.rollouts.helpers import version
from tests.support.processes import wait_until
from tests.support.slack_standin import slack_standin

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]

# Longer than the fault suite's 2 s: on the embedded default (SQLite, kombu's filesystem broker) on a busy
# machine looks 2 s apart are late by more than two intervals now and then, and the watchdog would be right.
INTERVAL_S = 5.0
LIMIT_S = 3 * INTERVAL_S
SLOWER = {"ROLLOUT_ANALYSIS_INTERVAL_S": str(INTERVAL_S)}


def test_with_the_worker_and_beat_stopped_the_canary_pauses_within_three_intervals_and_resumes_after(
    platform: Platform, viewer: Any
) -> None:
    version("adder-v1")
    version("adder-v2")
    plan = {
        "alias": "adder", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "canary",
        # A first step far longer than the test: the rollout holds at 25 % until something else moves it.
        "steps": [{"weight": 0.25, "min_duration_s": 3600, "min_candidate_requests": 10000},
                  {"weight": 0.5, "min_duration_s": 3600, "min_candidate_requests": 10000}],
        "guardrails": [{"metric": "error_rate", "margin": 0.02}],
    }  # fmt: skip
    with slack_standin() as slack:
        server = platform.gateway(combined=True, SLACK_BOT_TOKEN=slack.token, SLACK_API_BASE_URL=slack.api_url,
                                  **SLOWER)
        worker = platform.worker("analysis", **SLOWER)
        beat = platform.beat(**SLOWER)
        rollout = rollout_create(plan=plan, actor=SYSTEM, start=True).rollout
        started = Rollout.objects.get(pk=rollout.pk)
        wait_until(lambda: RolloutAnalysis.objects.filter(rollout=rollout).count() >= 2, timeout_s=120,
                   what="the analysis to look at the canary")
        time.sleep(LIMIT_S)
        # While the analysis runs, the watchdog stays out of it.
        assert Rollout.objects.get(pk=rollout.pk).state == "running" and not slack.calls_to("chat.postMessage")

        beat.stop()
        worker.stop()
        stopped = time.monotonic()
        last_look = Rollout.objects.get(pk=rollout.pk).last_analysed_at
        assert last_look is not None
        wait_until(lambda: Rollout.objects.get(pk=rollout.pk).state == "paused", timeout_s=60,
                   what="the watchdog to pause the canary")
        paused = Rollout.objects.get(pk=rollout.pk)
        pause = paused.events.order_by("-seq").first()
        assert pause is not None and (pause.kind, pause.actor) == ("paused", "watchdog")
        after_last_look_s = (pause.created_at - last_look).total_seconds()
        print(f"paused {after_last_look_s:.1f} s after the last look (limit {LIMIT_S:g} s, interval {INTERVAL_S:g} s), "
              f"{time.monotonic() - stopped:.1f} s after the worker and beat stopped")
        # Past three intervals without a look, and within one more pass of the watchdog (plus a loaded machine's
        # slack of one interval).
        assert LIMIT_S < after_last_look_s <= LIMIT_S + 2 * INTERVAL_S + 1.0
        assert (paused.paused_from, paused.step_index, paused.step_started_at) == ("running", 0, started.step_started_at)
        assert Alias.objects.get(name="adder").candidate_weight == pytest.approx(0.25)  # held at its weight

        # The alert, sent by the web process itself: no worker runs to send it.
        post = slack.wait_for("chat.postMessage", timeout_s=30)[0]
        assert "Paused: adder rollout" in post.body["text"] and "no analysis for" in post.body["text"]
        assert "watchdog" in str(post.body["blocks"])
        wait_until(lambda: server.metric("platform_rollouts_stale_analysis") == 1.0, timeout_s=10,
                   what="/metrics to count the stale rollout")
        assert server.metric("platform_rollouts_stale_actions_total", action="pause") == 1.0
        client = Client()
        client.force_login(viewer.user)
        page = client.get(reverse("rollout-detail", args=[rollout.pk])).content.decode()
        assert "paused by the watchdog" in page

        # Nothing more while the workers stay away: one pause, not a pause per pass.
        time.sleep(2 * INTERVAL_S)
        assert [e.kind for e in Rollout.objects.get(pk=rollout.pk).events.order_by("seq")] == [
            "created", "started", "paused"]

        platform.worker("analysis-again", **SLOWER)
        platform.beat(**SLOWER)
        back = time.monotonic()
        wait_until(lambda: Rollout.objects.get(pk=rollout.pk).state == "running", timeout_s=120,
                   what="the analysis to resume the canary")
        print(f"resumed {time.monotonic() - back:.1f} s after a worker and beat started again")
        resumed = Rollout.objects.get(pk=rollout.pk)
        assert list(resumed.events.order_by("seq").values_list("kind", "actor")) == [
            ("created", "system"), ("started", "system"), ("paused", "watchdog"), ("resumed", "analysis"),
        ]  # fmt: skip
        assert (resumed.step_index, resumed.step_started_at) == (0, started.step_started_at)
        assert Alias.objects.get(name="adder").candidate_weight == pytest.approx(0.25)
        wait_until(lambda: RolloutAnalysis.objects.filter(rollout=rollout, state="running",
                                                          rollout_version=resumed.version).exists(),
                   timeout_s=60, what="a look at the resumed canary")
        wait_until(lambda: server.metric("platform_rollouts_stale_analysis") == 0.0, timeout_s=30,
                   what="/metrics to count no stale rollout")
        page = client.get(reverse("rollout-detail", args=[rollout.pk])).content.decode()
        assert "paused by the watchdog" not in page and 'id="stale-analysis"' not in page
        assert len(slack.calls_to("chat.postMessage")) == 1
