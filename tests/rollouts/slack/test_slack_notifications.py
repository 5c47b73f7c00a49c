"""What Slack is told, and how reliably: approval requests with the evidence, rollbacks with the breached
metric, promotions, failed eval gates and engine crash loops, posted by the real Celery task functions
to the Slack stand-in over HTTP, with bounded retries on transient failures and never twice."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from config.celery import app as celery_app
from rollouts.analysis import rollout_analyse
from rollouts.models import Notification, Rollout, RolloutEvent
from rollouts.services import rollout_advance, rollout_create, rollout_eval_gate_decided, rollout_rollback
from rollouts.slack.models import SlackMessage
from rollouts.slack.tasks import slack_engine_failures_notify
from rollouts.tasks import notify_event
from serving.models import EngineWorker
from serving.services import engine_worker_create
from tests.rollouts.helpers import both_arms, canary_plan, step_back, version
from tests.rollouts.slack.conftest import awaiting_approval
from tests.rollouts.slack.helpers import block_texts, buttons
from tests.support.slack_standin import SlackStandin

pytestmark = pytest.mark.django_db


def last_event(rollout: Rollout) -> RolloutEvent:
    event = RolloutEvent.objects.filter(rollout=rollout).order_by("seq").last()
    assert event is not None
    return event


def notify(event: RolloutEvent) -> str:
    """The rollouts notification task, run here with its retries (apply() re-runs a retried task at once)."""
    notify_event.apply(args=[event.pk])
    return Notification.objects.get(event=event).status


def test_an_approval_request_shows_the_step_the_evidence_and_two_buttons(owner: Any, versions: None, slack: SlackStandin) -> None:
    rollout = rollout_create(plan=canary_plan(steps=[
        {"weight": 0.1, "min_duration_s": 60},
        {"weight": 0.5, "requires_approval": True},
    ]), actor=owner.user, start=True).rollout  # fmt: skip
    step_back(rollout, 61)
    both_arms(rollout, total=11_000, weight=0.1, seed=3)  # 1,100 candidate requests: over the step's floor (922)
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None and (analysis.decision, analysis.applied) == ("await_approval", True)
    event = last_event(rollout)
    assert event.kind == "awaiting_approval"

    assert notify(event) == "sent"

    (call,) = slack.calls_to("chat.postMessage")
    assert call.authorized and call.body["channel"] == "#adder-rollouts"  # the alias's own channel
    blocks = call.body["blocks"]
    assert blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": f"Approval needed: adder rollout #{rollout.pk}", "emoji": True}}
    text = block_texts(blocks)
    assert "*adder-v1* → *adder-v2* (canary) on alias `adder`" in text
    assert "*Waiting for:* step 2 of 2: candidate weight 50% (now 10%)" in text
    # Each guardrail with its decision, effect and interval, as the analysis recorded it.
    lines = {line.split("*")[1]: line for line in text.splitlines() if line.startswith(":") and " guardrail *" in line}
    assert set(lines) == {"tpot_mean_ms at most 10% worse", "error_rate at most 0.01 worse"}
    checks = {c["name"]: c for c in event.evidence["checks"]}
    tpot = checks["tpot_mean_ms at most 10% worse"]
    assert f"effect {tpot['effect'] * 100:+.3g}% [{tpot['low'] * 100:+.3g}%, {tpot['high'] * 100:+.3g}%]" in lines["tpot_mean_ms at most 10% worse"]
    assert f": {tpot['decision']} — " in lines["tpot_mean_ms at most 10% worse"]
    assert "n 9900 / 1100" in lines["tpot_mean_ms at most 10% worse"]
    assert "*sample ratio*: ok (p " in text and "9900 / 1100, expected about 9900 / 1100" in text
    assert "*Eval gate*: none in this plan" in text
    approve, reject, open_ = buttons(blocks)
    assert (approve["text"]["text"], reject["text"]["text"], open_["text"]["text"]) == ("Approve", "Reject", "Open rollout")
    value = {"rollout": rollout.pk, "step": 1, "version": event.seq}
    assert json.loads(approve["value"]) == json.loads(reject["value"]) == value
    assert open_["url"] == f"https://ramp.example/rollouts/{rollout.pk}"
    assert call.body["text"] == f"Approval needed: adder rollout #{rollout.pk}: step 2 of 2: candidate weight 50% (now 10%)"

    message = SlackMessage.objects.get(key=f"event:{event.pk}")
    assert (message.status, message.kind, message.step_index, message.via) == ("posted", "approval", 1, "bot")
    assert message.ts and message.channel.startswith("C")  # Slack's channel id, kept for chat.update


def test_a_rollback_posts_its_reason_with_the_breached_metric_and_its_numbers(
    owner: Any, versions: None, slack: SlackStandin
) -> None:
    rollout = rollout_create(plan=canary_plan(steps=[{"weight": 0.2, "min_duration_s": 600}]),
                             actor=owner.user, start=True).rollout  # fmt: skip
    step_back(rollout, 30)
    both_arms(rollout, total=500, weight=0.2, tpot=(20.0, 2.0), candidate_tpot=(30.0, 3.0), seed=2)
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None and analysis.decision == "rollback"
    event = last_event(rollout)

    assert notify(event) == "sent"

    (call,) = slack.calls_to("chat.postMessage")
    text = block_texts(call.body["blocks"])
    assert call.body["blocks"][0]["text"]["text"] == f":rotating_light: Rolled back: adder rollout #{rollout.pk}"
    assert f"*Reason:* {event.reason}" in text and "guardrail breached: tpot_mean_ms" in event.reason
    assert "*By:* the platform's analysis" in text
    assert "Every user of `adder` is back on adder-v1." in text
    tpot = next(c for c in event.evidence["checks"] if c["metric"] == "tpot_mean_ms")
    breached = text.split("*Breached*\n", 1)[1].splitlines()[0]
    assert breached.startswith(":red_circle: guardrail *tpot_mean_ms at most 10% worse*: breach — effect +")
    assert f"baseline {tpot['baseline']:.4g} vs candidate {tpot['candidate']:.4g}" in breached
    assert 19 < tpot["baseline"] < 21 and 29 < tpot["candidate"] < 31
    # The notification text (what a phone shows) names the metric and the numbers too.
    assert f"tpot_mean_ms: baseline {tpot['baseline']:.4g}, candidate {tpot['candidate']:.4g}" in call.body["text"]


def test_a_promotion_and_a_failed_eval_gate_are_announced(owner: Any, approver: Any, versions: None, slack: SlackStandin) -> None:
    rollout = rollout_create(plan=canary_plan(bake_s=0), actor=owner.user, start=True).rollout
    rollout_advance(rollout=rollout, actor=owner.user)
    rollout_advance(rollout=rollout, actor=owner.user, reason="all steps passed")
    assert notify(last_event(rollout)) == "sent"
    (promoted,) = slack.calls_to("chat.postMessage")
    assert promoted.body["blocks"][0]["text"]["text"] == ":tada: Promoted: adder now serves adder-v2"
    assert "*Reason:* all steps passed" in block_texts(promoted.body["blocks"])
    assert "*By:* owner (via api)" in block_texts(promoted.body["blocks"])

    # A rollout whose eval gate fails (put in gating directly: the evals app's gate is not under test here).
    gated = rollout_create(plan=canary_plan(baseline="adder-v2", candidate="adder-v1"), actor=owner.user).rollout
    Rollout.objects.filter(pk=gated.pk).update(state="gating", started_at=timezone.now())
    rollout_eval_gate_decided(
        rollout=gated.pk, passed=False, reason="eval gate failed: exact match 0.62 is below 0.90",
        evidence={"eval_gate": {"status": "failed", "reason": "exact match 0.62 is below 0.90 on adder-heldout"}},
    )  # fmt: skip
    assert notify(last_event(gated)) == "sent"
    failed = slack.calls_to("chat.postMessage")[-1]
    text = block_texts(failed.body["blocks"])
    assert failed.body["blocks"][0]["text"]["text"] == f":x: Eval gate failed: adder rollout #{gated.pk}"
    assert "*Reason:* eval gate failed: exact match 0.62 is below 0.90" in text
    assert "*Eval gate*: failed — exact match 0.62 is below 0.90 on adder-heldout" in text


@pytest.mark.parametrize(("status", "error"), [(429, "ratelimited"), (500, "")])
def test_transient_failures_are_retried_and_the_message_is_posted_once(
    owner: Any, versions: None, slack: SlackStandin, status: int, error: str
) -> None:
    _rollout, event = awaiting_approval(owner)
    slack.fail_next("chat.postMessage", status=status, error=error, times=2)
    assert notify(event) == "sent"
    calls = slack.calls_to("chat.postMessage")
    assert len(calls) == 3  # two failures, then the post
    message = SlackMessage.objects.get(key=f"event:{event.pk}")
    assert (message.status, message.attempts, message.last_error) == ("posted", 3, "")


def test_a_slack_that_keeps_failing_is_tried_a_bounded_number_of_times(owner: Any, versions: None, slack: SlackStandin) -> None:
    _rollout, event = awaiting_approval(owner)
    slack.fail_next("chat.postMessage", status=503, times=50)
    assert notify(event) == "failed"
    assert len(slack.calls_to("chat.postMessage")) == 5
    message = SlackMessage.objects.get(key=f"event:{event.pk}")
    assert message.status == "failed" and "HTTP 503" in message.last_error
    # Nothing tries again later: a failed message is never claimed again.
    notify_event.apply(args=[event.pk])
    assert len(slack.calls_to("chat.postMessage")) == 5


def test_a_permanent_error_is_not_retried(owner: Any, versions: None, slack: SlackStandin, settings: Any) -> None:
    settings.SLACK_BOT_TOKEN = "xoxb-revoked"
    _rollout, event = awaiting_approval(owner)
    notify(event)
    (call,) = slack.calls_to("chat.postMessage")
    assert not call.authorized
    message = SlackMessage.objects.get(key=f"event:{event.pk}")
    assert message.status == "failed" and "invalid_auth" in message.last_error


def test_a_notification_task_that_runs_twice_posts_once(owner: Any, versions: None, slack: SlackStandin) -> None:
    _rollout, event = awaiting_approval(owner)
    assert notify(event) == "sent"
    notify_event.apply(args=[event.pk])
    # Even when the hook's own delivery record is lost (a crash right after the post), Slack's row holds.
    Notification.objects.filter(event=event).update(status="pending", deliveries={})
    assert notify(event) == "sent"
    assert len(slack.calls_to("chat.postMessage")) == 1


def test_slack_being_down_never_blocks_a_transition(
    owner: Any, approver: Any, versions: None, slack: SlackStandin, settings: Any, eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    settings.SLACK_API_BASE_URL = "http://127.0.0.1:9/api/"  # nothing listens on the discard port
    celery_app.conf.task_eager_propagates = False  # retries run as on a worker, not raised into the test
    rollout = rollout_create(plan=canary_plan(), actor=owner.user, start=True).rollout
    with django_capture_on_commit_callbacks(execute=True):
        rollout = rollout_rollback(rollout=rollout, actor=approver.user, reason="latency looks off")
    assert Rollout.objects.get(pk=rollout.pk).state == "rolled_back"
    notification = Notification.objects.get(event=last_event(rollout))
    assert notification.status == "failed" and "chat.postMessage" in notification.last_error


def test_notify_only_mode_posts_through_the_webhook_without_buttons(
    owner: Any, versions: None, slack: SlackStandin, settings: Any
) -> None:
    settings.SLACK_BOT_TOKEN = None
    settings.SLACK_WEBHOOK_URL = slack.webhook_url
    rollout, event = awaiting_approval(owner)
    assert notify(event) == "sent"
    assert slack.calls_to("chat.postMessage") == []
    (call,) = slack.calls_to("hook:webhook")
    text = block_texts(call.body["blocks"])
    assert f"Approval needed: adder rollout #{rollout.pk}" in text
    assert "Approve or reject it in the web UI" in text
    assert [b["action_id"] for b in buttons(call.body["blocks"])] == ["rollout_open"]
    assert SlackMessage.objects.get(key=f"event:{event.pk}").via == "webhook"


def test_without_slack_configured_nothing_is_sent(owner: Any, versions: None, slack: SlackStandin, settings: Any) -> None:
    settings.SLACK_BOT_TOKEN = None
    settings.SLACK_WEBHOOK_URL = None
    _rollout, event = awaiting_approval(owner)
    assert notify(event) == "sent"  # the hook's delivery is done; Slack had nothing to do
    assert slack.calls == [] and not SlackMessage.objects.exists()


def test_other_aliases_go_to_the_default_channel(owner: Any, db: None, slack: SlackStandin) -> None:
    version("chat-v1")
    version("chat-v2")
    plan = canary_plan(alias="chat", baseline="chat-v1", candidate="chat-v2",
                       steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}])  # fmt: skip
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    rollout_advance(rollout=rollout, actor=owner.user)
    notify(last_event(rollout))
    (call,) = slack.calls_to("chat.postMessage")
    assert call.body["channel"] == "#rollouts"


def failed_engine(label: str, *, at: Any) -> EngineWorker:
    worker = engine_worker_create(model_version=version(label, ready=False), host_name="gpu-7")
    EngineWorker.objects.filter(pk=worker.pk).update(
        state=EngineWorker.State.FAILED, state_changed_at=at, restarts=5, consecutive_failures=5,
        state_reason="exited with code 1 five times in a row", log_tail="loading weights\nRuntimeError: CUDA out of memory",
    )  # fmt: skip
    return worker


def test_an_engine_crash_loop_is_announced_once_per_episode(db: None, slack: SlackStandin) -> None:
    worker = failed_engine("adder-v3", at=timezone.now() - timedelta(seconds=20))
    assert slack_engine_failures_notify() == 1
    assert slack_engine_failures_notify() == 0  # the next beat: same episode, nothing new
    (call,) = slack.calls_to("chat.postMessage")
    assert call.body["channel"] == "#rollouts"
    assert call.body["blocks"][0]["text"]["text"] == f":boom: Engine failed: adder-v3 (engine #{worker.pk} on gpu-7)"
    text = block_texts(call.body["blocks"])
    assert "gave up after 5 restarts" in text and "*Reason:* exited with code 1 five times in a row" in text
    assert "RuntimeError: CUDA out of memory" in text

    # Retried by a person, it fails again: a new episode, a new message.
    EngineWorker.objects.filter(pk=worker.pk).update(state_changed_at=timezone.now())
    assert slack_engine_failures_notify() == 1
    assert len(slack.calls_to("chat.postMessage")) == 2


def test_an_engine_alert_that_hits_a_rate_limit_waits_and_is_sent_later(db: None, slack: SlackStandin) -> None:
    from rollouts.slack.services import slack_engine_failures_notify as notify_engines

    failed_engine("adder-v3", at=timezone.now())
    slack.fail_next("chat.postMessage", status=429, retry_after=30)
    assert notify_engines() == 0
    message = SlackMessage.objects.get(kind="engine_failed")
    assert message.status == "pending" and message.next_attempt_at is not None
    assert message.next_attempt_at >= timezone.now() + timedelta(seconds=25)  # Slack's Retry-After is honoured
    assert notify_engines() == 0 and len(slack.calls_to("chat.postMessage")) == 1  # not due yet
    assert notify_engines(now=timezone.now() + timedelta(seconds=31)) == 1
    assert SlackMessage.objects.get(pk=message.pk).status == "posted"
