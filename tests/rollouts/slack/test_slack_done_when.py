"""Issue 8's "done when": a step that needs approval posts a message with buttons; a signed Approve click
advances the rollout and the message is updated with who approved; a forged click is refused; a rollback
posts its reason with the breached metric. Once with the task functions run here, once through a real
Celery worker process on the broker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout, RolloutEvent
from rollouts.services import rollout_advance, rollout_create
from rollouts.tasks import notify_event
from tests.rollouts.helpers import both_arms, canary_plan, step_back, version
from tests.rollouts.slack.conftest import link
from tests.rollouts.slack.helpers import SECRET, block_texts, buttons, click_body, post, sign
from tests.support.processes import celery_worker
from tests.support.slack_standin import SlackStandin

PLAN = canary_plan(steps=[
    {"weight": 0.1},
    {"weight": 0.5, "requires_approval": True, "min_duration_s": 600},
])  # fmt: skip


def latest(rollout: Rollout) -> RolloutEvent:
    event = RolloutEvent.objects.filter(rollout_id=rollout.pk).order_by("seq").last()
    assert event is not None
    return event


def check_approval_message(standin: SlackStandin, rollout: Rollout) -> dict[str, Any]:
    (call,) = standin.calls_to("chat.postMessage")
    assert call.authorized
    text = block_texts(call.body["blocks"])
    assert f"Approval needed: adder rollout #{rollout.pk}" in text and "step 2 of 2: candidate weight 50%" in text
    approve = next(b for b in buttons(call.body["blocks"]) if b["action_id"] == "rollout_approve")
    assert approve["text"]["text"] == "Approve"
    return json.loads(approve["value"])


def check_approved(standin: SlackStandin, rollout: Rollout, updates: list[Any]) -> None:
    fresh = Rollout.objects.get(pk=rollout.pk)
    assert (fresh.state, fresh.step_index) == ("running", 1)
    (update,) = updates
    assert "*Approved* by <@U0APPROVER> (approver) at" in block_texts(update.body["blocks"])
    assert [b["action_id"] for b in buttons(update.body["blocks"])] == ["rollout_open"]


def regress(rollout: Rollout) -> None:
    """The approved step's candidate is slow: the analysis rolls back by itself."""
    step_back(rollout, 30)
    both_arms(rollout, total=400, weight=0.5, tpot=(20.0, 2.0), candidate_tpot=(30.0, 3.0), seed=5)
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None and analysis.decision == "rollback"


def check_rollback_message(call: Any, rollout: Rollout) -> None:
    text = block_texts(call.body["blocks"])
    assert f":rotating_light: Rolled back: adder rollout #{rollout.pk}" in text
    assert "*Reason:* guardrail breached: tpot_mean_ms is worse than the baseline" in text
    assert ":red_circle: guardrail *tpot_mean_ms at most 10% worse*: breach" in text


@pytest.mark.django_db
def test_done_when_with_the_task_functions(
    owner: Any, approver: Any, versions: None, slack: SlackStandin, eager: None, django_capture_on_commit_callbacks: Any
) -> None:
    link(approver, "U0APPROVER")
    rollout = rollout_create(plan=PLAN, actor=owner.user, start=True).rollout
    rollout = rollout_advance(rollout=rollout, actor=owner.user)
    notify_event.apply(args=[latest(rollout).pk])
    value = check_approval_message(slack, rollout)

    client = Client()
    forged = click_body(user="U0APPROVER", value=value)
    assert post(client, "/slack/interactions", forged, sign(forged, secret="guessed")).status_code == 401
    assert Rollout.objects.get(pk=rollout.pk).state == "awaiting_approval"

    with django_capture_on_commit_callbacks(execute=True):
        assert post(client, "/slack/interactions", click_body(user="U0APPROVER", value=value)).status_code == 200
    check_approved(slack, rollout, slack.calls_to("chat.update"))

    regress(rollout)
    notify_event.apply(args=[latest(rollout).pk])
    check_rollback_message(slack.calls_to("chat.postMessage")[-1], rollout)


@pytest.mark.django_db(transaction=True)
def test_done_when_through_a_real_worker(
    owner: Any, approver: Any, slack: SlackStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker process reads its Slack settings from the environment, like production.
    for name, setting in {
        "SLACK_SIGNING_SECRET": SECRET, "SLACK_BOT_TOKEN": slack.token, "SLACK_API_BASE_URL": slack.api_url,
        "SLACK_ALIAS_CHANNELS": "adder=#adder-rollouts", "PUBLIC_URL": "https://ramp.example",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, setting)
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    version("adder-v1")
    version("adder-v2")
    link(approver, "U0APPROVER")

    with celery_worker(name="slack"):
        rollout = rollout_create(plan=PLAN, actor=owner.user, start=True).rollout
        rollout = rollout_advance(rollout=rollout, actor=owner.user)  # on commit: notify_event on the broker
        assert slack.wait_for("chat.postMessage", 1), "the worker never posted the approval request"
        value = check_approval_message(slack, rollout)

        client = Client()
        forged = click_body(user="U0APPROVER", value=value)
        assert post(client, "/slack/interactions", forged, sign(forged, secret="guessed")).status_code == 401
        assert Rollout.objects.get(pk=rollout.pk).state == "awaiting_approval"

        assert post(client, "/slack/interactions", click_body(user="U0APPROVER", value=value)).status_code == 200
        check_approved(slack, rollout, slack.wait_for("chat.update", 1))

        regress(rollout)
        posts = slack.wait_for("chat.postMessage", 2)
        assert len(posts) == 2, "the worker never posted the rollback"
        check_rollback_message(posts[-1], rollout)
        assert posts[-1].body["channel"] == "#adder-rollouts"
