"""Button clicks from Slack: a linked approver's signed click decides through the rollouts services, and
every other click (unknown user, wrong role, four-eyes, a second click, a stale message, a malformed
payload) is refused with nothing changed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from rollouts.models import Rollout, RolloutApproval, RolloutEvent
from rollouts.slack.models import SlackMessage
from rollouts.slack.services import slack_event_post
from serving.selectors import alias_get
from tests.rollouts.slack.conftest import awaiting_approval, link
from tests.rollouts.slack.helpers import block_texts, buttons, click_body, post
from tests.support.slack_standin import SlackStandin

pytestmark = pytest.mark.django_db

URL = "/slack/interactions"


def snapshot(rollout: Rollout) -> tuple[Any, ...]:
    fresh = Rollout.objects.get(pk=rollout.pk)
    return (
        fresh.state, fresh.step_index, fresh.version, RolloutEvent.objects.filter(rollout=rollout).count(),
        RolloutApproval.objects.filter(rollout=rollout).count(), alias_get(name="adder").candidate_weight,  # type: ignore[union-attr]
    )  # fmt: skip


def posted_value(standin: SlackStandin) -> dict[str, Any]:
    (call,) = standin.calls_to("chat.postMessage")
    approve = next(b for b in buttons(call.body["blocks"]) if b["action_id"] == "rollout_approve")
    return json.loads(approve["value"])


@pytest.fixture
def waiting(owner: Any, versions: None, slack: SlackStandin) -> tuple[Rollout, SlackMessage]:
    """A rollout awaiting the approval of step 2, and its approval message posted to the stand-in."""
    rollout, event = awaiting_approval(owner)
    assert slack_event_post(event_id=event.pk) == "posted"
    return rollout, SlackMessage.objects.get(key=f"event:{event.pk}")


def test_a_linked_approvers_click_approves_and_the_message_shows_who(
    client: Client, approver: Any, waiting: tuple[Rollout, SlackMessage], slack: SlackStandin, eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    rollout, message = waiting
    link(approver, "U0APPROVER")
    value = posted_value(slack)
    assert value == {"rollout": rollout.pk, "step": 1, "version": rollout.version}

    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, URL, click_body(user="U0APPROVER", value=value, channel=message.channel, ts=message.ts,
                                                response_url=slack.response_url()))  # fmt: skip
    assert response.status_code == 200

    fresh = Rollout.objects.get(pk=rollout.pk)
    assert (fresh.state, fresh.step_index) == ("running", 1)
    assert alias_get(name="adder").candidate_weight == 0.5  # type: ignore[union-attr]
    event = fresh.events.order_by("seq").last()
    assert event is not None
    assert (event.kind, event.actor, event.via, event.actor_detail) == ("approved", "approver", "slack", "T0RAMP01/U0APPROVER")
    assert event.reason == "approved in Slack by <@U0APPROVER> (approver)"
    approval = RolloutApproval.objects.get(rollout=rollout, step_index=1)
    assert (approval.approved_by_id, approval.via) == (approver.user.pk, "slack")

    # The original message now says who approved and when, and has no buttons left to click.
    (update,) = slack.calls_to("chat.update")
    assert (update.body["channel"], update.body["ts"]) == (message.channel, message.ts)
    text = block_texts(update.body["blocks"])
    assert "*Approved* by <@U0APPROVER> (approver) at " in text
    assert [b["action_id"] for b in buttons(update.body["blocks"])] == ["rollout_open"]
    assert slack.calls_to("hook") == []  # a successful click needs no ephemeral reply


def test_a_second_click_says_who_decided_and_changes_nothing(
    client: Client, approver: Any, platform_admin: Any, waiting: tuple[Rollout, SlackMessage], slack: SlackStandin,
    eager: None, django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    rollout, _message = waiting
    link(approver, "U0APPROVER")
    link(platform_admin, "U0ADMIN")
    value = posted_value(slack)
    with django_capture_on_commit_callbacks(execute=True):
        assert post(client, URL, click_body(user="U0APPROVER", value=value)).status_code == 200
    before = snapshot(rollout)

    for who, action in (("U0ADMIN", "rollout_approve"), ("U0APPROVER", "rollout_approve"), ("U0ADMIN", "rollout_reject")):
        with django_capture_on_commit_callbacks(execute=True):
            response = post(client, URL, click_body(user=who, action_id=action, value=value,
                                                    response_url=slack.response_url(who)))  # fmt: skip
        assert response.status_code == 200
        assert snapshot(rollout) == before
        (reply,) = [c for c in slack.calls_to("hook") if c.method == f"hook:response/{who}"][-1:]
        assert reply.body["response_type"] == "ephemeral" and reply.body["replace_original"] is False
        assert "Already decided" in reply.body["text"] and "approved by <@U0APPROVER> (approver)" in reply.body["text"]
        assert "Nothing changed" in reply.body["text"]


@pytest.mark.parametrize("action", ["rollout_approve", "rollout_reject"])
def test_refused_clicks_change_nothing_and_say_why(
    client: Client, owner: Any, viewer: Any, outsider: Any, waiting: tuple[Rollout, SlackMessage], slack: SlackStandin,
    eager: None, django_capture_on_commit_callbacks: Any, action: str,
) -> None:  # fmt: skip
    rollout, _ = waiting
    link(viewer, "U0VIEWER")
    link(outsider, "U0OUTSIDER")
    link(owner, "U0OWNER")
    value = posted_value(slack)
    before = snapshot(rollout)
    cases = {
        "U0NOBODY": "is not linked to a platform account",  # unknown Slack user
        "U0VIEWER": "You cannot",  # a viewer holds no approving role
        "U0OUTSIDER": "You cannot",  # no role at all
        "U0OWNER": "You cannot",  # the release manager who created it is no approver either
    }
    for user, says in cases.items():
        with django_capture_on_commit_callbacks(execute=True):
            response = post(client, URL, click_body(user=user, action_id=action, value=value,
                                                    response_url=slack.response_url(user)))  # fmt: skip
        assert response.status_code == 200
        assert snapshot(rollout) == before, user
        (reply,) = [c for c in slack.calls_to("hook") if c.method == f"hook:response/{user}"]
        assert says in reply.body["text"] and reply.body["response_type"] == "ephemeral"
        if user == "U0NOBODY":
            assert "https://ramp.example/account/slack" in reply.body["text"]
    assert slack.calls_to("chat.update") == []


def test_four_eyes_the_creator_cannot_approve_their_own_rollout_from_slack(
    client: Client, platform_admin: Any, versions: None, slack: SlackStandin, eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    rollout, event = awaiting_approval(platform_admin)  # an admin holds the approver role, and created it
    slack_event_post(event_id=event.pk)
    link(platform_admin, "U0ADMIN")
    before = snapshot(rollout)
    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, URL, click_body(user="U0ADMIN", value=posted_value(slack), response_url=slack.response_url()))
    assert response.status_code == 200
    assert snapshot(rollout) == before
    (reply,) = slack.calls_to("hook")
    assert "four-eyes rule" in reply.body["text"]


def test_reject_rolls_back_and_the_message_shows_it(
    client: Client, approver: Any, waiting: tuple[Rollout, SlackMessage], slack: SlackStandin, eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    rollout, _message = waiting
    link(approver, "U0APPROVER")
    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, URL, click_body(user="U0APPROVER", action_id="rollout_reject", value=posted_value(slack)))
    assert response.status_code == 200
    fresh = Rollout.objects.get(pk=rollout.pk)
    assert fresh.state == "rolled_back"
    assert alias_get(name="adder").candidate is None  # type: ignore[union-attr]
    event = fresh.events.order_by("seq").last()
    assert event is not None and (event.kind, event.via) == ("rolled_back", "slack")
    assert event.reason == "rejected in Slack by <@U0APPROVER> (approver)"
    (update,) = slack.calls_to("chat.update")
    assert "*Rejected* by <@U0APPROVER> (approver)" in block_texts(update.body["blocks"])


def test_a_stale_reject_cannot_refuse_a_later_step(
    client: Client, owner: Any, approver: Any, versions: None, slack: SlackStandin, eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    """A message about step 2 stays in the channel after step 2 was approved in the UI; when step 3 then
    waits for its approval, a Reject click on the old message must not refuse step 3."""
    from rollouts.services import rollout_advance, rollout_approve

    rollout, event = awaiting_approval(owner, steps=[
        {"weight": 0.1}, {"weight": 0.3, "requires_approval": True}, {"weight": 0.6, "requires_approval": True},
    ])  # fmt: skip
    slack_event_post(event_id=event.pk)
    old_value = posted_value(slack)
    rollout_approve(rollout=rollout, actor=approver.user, step_index=1)
    rollout = rollout_advance(rollout=rollout, actor=owner.user)
    assert (rollout.state, rollout.step_index) == ("awaiting_approval", 1)
    link(approver, "U0APPROVER")
    before = snapshot(rollout)
    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, URL, click_body(user="U0APPROVER", action_id="rollout_reject", value=old_value,
                                                response_url=slack.response_url()))  # fmt: skip
    assert response.status_code == 200
    assert snapshot(rollout) == before
    (reply,) = slack.calls_to("hook")
    assert "Already decided" in reply.body["text"] and "approved by approver (via api)" in reply.body["text"]
    # And the old message loses its buttons, saying who approved it.
    (update,) = slack.calls_to("chat.update")
    assert "*Approved* by approver (via api)" in block_texts(update.body["blocks"])


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"payload=not-json", "payload: not JSON"),
        (b"nothing=here", "payload: missing"),
        (b"payload=%5B1%2C2%5D", "payload: expected an object"),
        ("view_submission", "payload.type"),
        ("no_user", "user.id"),
        ("no_actions", "actions"),
        ("unknown_action", "unknown action"),
        ("value_not_json", "value: not JSON"),
        ("value_missing_step", "value.step"),
        ("value_bool", "value.rollout"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_payloads_are_refused_with_nothing_changed(
    client: Client, approver: Any, waiting: tuple[Rollout, SlackMessage], slack: SlackStandin, body: bytes | str,
    says: str,
) -> None:  # fmt: skip
    from urllib.parse import urlencode

    from tests.rollouts.slack.helpers import click_payload

    rollout, _ = waiting
    link(approver, "U0APPROVER")
    good = {"rollout": rollout.pk, "step": 1, "version": rollout.version}
    if isinstance(body, str):
        payload = click_payload(user="U0APPROVER", value=good)
        if body == "view_submission":
            payload["type"] = "view_submission"
        elif body == "no_user":
            del payload["user"]
        elif body == "no_actions":
            payload["actions"] = []
        elif body == "unknown_action":
            payload["actions"][0]["action_id"] = "rollout_delete_everything"
        elif body == "value_not_json":
            payload["actions"][0]["value"] = "approve please"
        elif body == "value_missing_step":
            payload["actions"][0]["value"] = json.dumps({"rollout": rollout.pk, "version": 1})
        elif body == "value_bool":
            payload["actions"][0]["value"] = json.dumps({"rollout": True, "step": 1, "version": 1})
        raw = urlencode({"payload": json.dumps(payload)}).encode()
    else:
        raw = body
    before = snapshot(rollout)
    response = post(client, URL, raw)
    assert response.status_code == 400
    assert says in response.json()["detail"]
    assert snapshot(rollout) == before


def test_the_link_button_is_acknowledged_and_does_nothing(
    client: Client, waiting: tuple[Rollout, SlackMessage], slack: SlackStandin
) -> None:
    rollout, _ = waiting
    before = snapshot(rollout)
    response = post(client, URL, click_body(user="U0NOBODY", action_id="rollout_open", value="x"))
    assert response.status_code == 200 and response.content == b""
    assert snapshot(rollout) == before


def test_the_posted_buttons_carry_what_a_click_needs(waiting: tuple[Rollout, SlackMessage], slack: SlackStandin) -> None:
    rollout, _ = waiting
    (call,) = slack.calls_to("chat.postMessage")
    found = {b["action_id"]: b for b in buttons(call.body["blocks"])}
    assert set(found) == {"rollout_approve", "rollout_reject", "rollout_open"}
    assert (found["rollout_approve"]["text"]["text"], found["rollout_approve"]["style"]) == ("Approve", "primary")
    assert (found["rollout_reject"]["text"]["text"], found["rollout_reject"]["style"]) == ("Reject", "danger")
    assert found["rollout_reject"]["confirm"]["confirm"]["text"] == "Reject and roll back"
    assert found["rollout_open"]["url"] == f"https://ramp.example/rollouts/{rollout.pk}"
