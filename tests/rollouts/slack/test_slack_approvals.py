"""Approvals as Slack shows them, spoken through the Slack stand-in: a 2-of-N request whose message is updated
as each approval arrives, a button whose rollout moved on meanwhile, and a request that expired."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.roles import Role
from accounts.services import user_create
from rollouts.actors import ANALYSIS
from rollouts.models import Rollout, RolloutEvent
from rollouts.services import rollout_pause, rollout_resume
from rollouts.slack.models import SlackMessage
from rollouts.slack.services import approval_messages_expire, slack_event_post
from rollouts.tasks import notify_event
from tests.conftest import Member
from tests.rollouts.slack.conftest import awaiting_approval, link
from tests.rollouts.slack.helpers import block_texts, buttons, click_body, post
from tests.support.slack_standin import SlackStandin

pytestmark = pytest.mark.django_db

URL = "/slack/interactions"


def approve_value(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return json.loads(next(b for b in buttons(blocks) if b["action_id"] == "rollout_approve")["value"])


def posted(rollout: Rollout, standin: SlackStandin) -> tuple[SlackMessage, list[dict[str, Any]]]:
    event = RolloutEvent.objects.filter(rollout=rollout, kind="awaiting_approval").order_by("-seq").first()
    assert event is not None and slack_event_post(event_id=event.pk) == "posted"
    message = SlackMessage.objects.get(key=f"event:{event.pk}")
    return message, standin.calls_to("chat.postMessage")[-1].body["blocks"]


def click(client: Client, standin: SlackStandin, user: str, value: dict[str, Any], message: SlackMessage,
          on_commit: Any) -> str:  # fmt: skip
    """A signed click; returns the private reply the clicker got through response_url ("" when none: a
    click that worked changes the message instead)."""
    before = len(standin.calls_to("hook"))
    with on_commit(execute=True):
        response = post(client, URL, click_body(user=user, value=value, channel=message.channel, ts=message.ts,
                                                response_url=standin.response_url(user)))  # fmt: skip
    assert response.status_code == 200
    replies = standin.calls_to("hook")[before:]
    return replies[-1].body["text"] if replies else ""


def test_two_of_n_the_message_shows_who_approved_and_who_is_still_needed(
    client: Client, owner: Any, approver: Any, versions: None, slack: SlackStandin, eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    second = Member(user=user_create(username="second", password="second-password-1", roles=[Role.APPROVER]), token="")
    link(approver, "U0APPROVER")
    link(second, "U0SECOND")
    rollout, _ = awaiting_approval(owner, approvals_required=2)
    message, blocks = posted(rollout, slack)
    assert "*Approvals:* 0 of 2 approvals for step 2 of 2; 2 more from role approver (approver, second)" in block_texts(blocks)
    value = approve_value(blocks)

    assert click(client, slack, "U0APPROVER", value, message, django_capture_on_commit_callbacks) == ""
    assert Rollout.objects.get(pk=rollout.pk).state == "awaiting_approval"
    # The approval's event reaches Slack through the notification outbox, which updates the message in place.
    added = RolloutEvent.objects.get(rollout=rollout, kind="approval_added")
    notify_event(added.pk)
    (update,) = slack.calls_to("chat.update")
    assert (update.body["channel"], update.body["ts"]) == (message.channel, message.ts)
    text = block_texts(update.body["blocks"])
    assert "*Approvals:* 1 of 2 approvals for step 2 of 2: approver; 1 more from role approver (second)" in text
    assert approve_value(update.body["blocks"])["version"] == Rollout.objects.get(pk=rollout.pk).version

    # The same person again counts once.
    again = click(client, slack, "U0APPROVER", approve_value(update.body["blocks"]), message,
                  django_capture_on_commit_callbacks)
    assert "each approver counts once" in again and Rollout.objects.get(pk=rollout.pk).state == "awaiting_approval"

    # The second approver clicks the button of the first message (version from before the first approval):
    # only approvals happened since, so it counts, and the step goes ahead.
    assert click(client, slack, "U0SECOND", value, message, django_capture_on_commit_callbacks) == ""
    fresh = Rollout.objects.get(pk=rollout.pk)
    assert (fresh.state, fresh.step_index) == ("running", 1)
    final = block_texts(slack.calls_to("chat.update")[-1].body["blocks"])
    assert "*Approved* by <@U0APPROVER> (approver), <@U0SECOND> (second) at" in final
    assert [b["action_id"] for b in buttons(slack.calls_to("chat.update")[-1].body["blocks"])] == ["rollout_open"]


def test_a_stale_button_is_refused_saying_what_changed(
    client: Client, owner: Any, approver: Any, versions: None, slack: SlackStandin, eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    link(approver, "U0APPROVER")
    rollout, _ = awaiting_approval(owner)
    message, blocks = posted(rollout, slack)
    value = approve_value(blocks)
    # Someone paused and resumed it since the message was posted: the same question, but not what was seen.
    rollout_pause(rollout=rollout.pk, actor=ANALYSIS, reason="every baseline engine is down")
    rollout_resume(rollout=rollout.pk, actor=owner.user, reason="engines back")
    before = Rollout.objects.get(pk=rollout.pk).version
    reply = click(client, slack, "U0APPROVER", value, message, django_capture_on_commit_callbacks)
    assert reply.startswith(
        f":information_source: Nothing changed: rollout {rollout.pk} changed since it was read: expected version "
        f"{value['version']}, found {before}: it is still awaiting approval of step 2 since you looked: paused by "
        "analysis (every baseline engine is down); resumed by owner via api (engines back)"
    ), reply
    fresh = Rollout.objects.get(pk=rollout.pk)
    assert (fresh.state, fresh.version) == ("awaiting_approval", before)


def test_a_click_on_an_expired_request_says_it_expired_and_a_new_request_gets_a_new_message(
    client: Client, owner: Any, approver: Any, versions: None, slack: SlackStandin, eager: None,
    django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    link(approver, "U0APPROVER")
    rollout, _ = awaiting_approval(owner, approval_ttl_s=600)
    message, blocks = posted(rollout, slack)
    later = timezone.now() + timedelta(hours=1)
    monkeypatch.setattr(timezone, "now", lambda: later)

    reply = click(client, slack, "U0APPROVER", approve_value(blocks), message, django_capture_on_commit_callbacks)
    assert reply.startswith(":hourglass: This approval request for step 2 of 2: candidate weight 50% (now 10%) expired at ")
    assert "Nothing changed. A release manager asks again" in reply
    assert Rollout.objects.get(pk=rollout.pk).state == "awaiting_approval"
    # Its message loses its buttons and says it expired.
    update = slack.calls_to("chat.update")[-1]
    assert update.body["ts"] == message.ts and ":hourglass: *Expired* at" in block_texts(update.body["blocks"])
    assert [b["action_id"] for b in buttons(update.body["blocks"])] == ["rollout_open"]
    assert approval_messages_expire() == 0  # already closed: the beat has nothing to do

    # Asked again: a new request, posted as a new message with live buttons.
    from rollouts.services import rollout_approval_request

    rollout_approval_request(rollout=rollout.pk, actor=owner.user, expected_version=Rollout.objects.get(pk=rollout.pk).version)
    new_message, new_blocks = posted(rollout, slack)
    assert new_message.pk != message.pk and new_message.ts != message.ts
    assert "*Approvals:* 0 of 1 approval for step 2 of 2" in block_texts(new_blocks)
    assert click(client, slack, "U0APPROVER", approve_value(new_blocks), new_message,
                 django_capture_on_commit_callbacks) == ""
    assert Rollout.objects.get(pk=rollout.pk).state == "running"


def test_the_beat_closes_expired_requests_nobody_clicked(
    owner: Any, versions: None, slack: SlackStandin, eager: None, monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    rollout, _ = awaiting_approval(owner, approval_ttl_s=600)
    message, _blocks = posted(rollout, slack)
    assert approval_messages_expire() == 0  # still open
    later = timezone.now() + timedelta(hours=1)
    monkeypatch.setattr(timezone, "now", lambda: later)
    with django_capture_on_commit_callbacks(execute=True):
        assert approval_messages_expire() == 1
    message.refresh_from_db()
    assert (message.outcome, message.outcome_shown) == ("expired", True)
    assert ":hourglass: *Expired* at" in block_texts(slack.calls_to("chat.update")[-1].body["blocks"])
