"""`/rollout` in Slack: status, approve, pause, rollback and link, with the same checks as the UI and API,
and usage text for anything else."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from rollouts.models import Rollout, RolloutEvent
from rollouts.services import rollout_create
from rollouts.slack.models import SlackIdentity
from rollouts.slack.services import slack_link_code_create
from tests.rollouts.helpers import canary_plan
from tests.rollouts.slack.conftest import awaiting_approval, link
from tests.rollouts.slack.helpers import command_body, post
from tests.support.slack_standin import SlackStandin

pytestmark = pytest.mark.django_db


def run(client: Client, text: str, user: str, **kwargs: Any) -> str:
    response = post(client, "/slack/commands", command_body(text, user=user, **kwargs))
    assert response.status_code == 200
    body = response.json()
    assert body["response_type"] == "ephemeral"  # only the person who typed it sees the answer
    return str(body["text"])


def state(rollout: Rollout) -> tuple[str, int, int]:
    fresh = Rollout.objects.get(pk=rollout.pk)
    return fresh.state, fresh.version, RolloutEvent.objects.filter(rollout=rollout).count()


def test_status_lists_live_rollouts_and_one_alias(client: Client, owner: Any, viewer: Any, versions: None, slack: SlackStandin) -> None:
    link(viewer, "U0VIEWER")
    assert run(client, "status", "U0VIEWER") == "No live rollouts."
    rollout = rollout_create(plan=canary_plan(), actor=owner.user, start=True).rollout
    text = run(client, "status", "U0VIEWER")
    assert f"*#{rollout.pk} adder*: adder-v1 → adder-v2 (canary) — *running*, step 1 of 2, candidate at 10%" in text
    assert f"<https://ramp.example/rollouts/{rollout.pk}|open rollout #{rollout.pk}>" in text
    assert run(client, "status adder", "U0VIEWER").startswith(f"*#{rollout.pk} adder*")
    assert run(client, "status nosuchalias", "U0VIEWER") == "No rollout of the alias `nosuchalias`."


def test_approve_pause_and_rollback_by_command(
    client: Client, owner: Any, approver: Any, versions: None, slack: SlackStandin
) -> None:
    link(approver, "U0APPROVER")
    link(owner, "U0OWNER")
    rollout, _ = awaiting_approval(owner)

    # A decision typed without the version it decides on shows the rollout and the exact command.
    version = state(rollout)[1]
    prompt = run(client, f"approve {rollout.pk} numbers look fine", "U0APPROVER")
    assert prompt.startswith(":information_source: Nothing changed yet.") and "0 of 1 approval for step 2 of 2" in prompt
    assert f"type `/rollout approve {rollout.pk}@{version} numbers look fine`" in prompt
    assert state(rollout)[1] == version
    text = run(client, f"approve {rollout.pk}@{version} numbers look fine", "U0APPROVER")
    assert text == f":white_check_mark: Approved rollout #{rollout.pk}: step 2 is live (candidate at 50%)."
    event = Rollout.objects.get(pk=rollout.pk).events.order_by("seq").last()
    assert event is not None and (event.kind, event.via, event.actor) == ("approved", "slack", "approver")
    assert event.reason == "approved in Slack by <@U0APPROVER> (approver): numbers look fine"

    assert run(client, f"pause #{rollout.pk}", "U0OWNER") == f":white_check_mark: Rollout #{rollout.pk} paused (adder)."
    assert state(rollout)[0] == "paused"
    text = run(client, f"rollback {rollout.pk} p99 is creeping up", "U0APPROVER")
    assert text == f":white_check_mark: Rollout #{rollout.pk} rolled back (adder)."
    event = Rollout.objects.get(pk=rollout.pk).events.order_by("seq").last()
    assert event is not None and event.reason == "rolled back in Slack by <@U0APPROVER> (approver): p99 is creeping up"


def test_commands_are_refused_for_the_wrong_person_with_nothing_changed(
    client: Client, owner: Any, viewer: Any, platform_admin: Any, versions: None, slack: SlackStandin
) -> None:
    link(viewer, "U0VIEWER")
    link(owner, "U0OWNER")
    rollout, _ = awaiting_approval(owner)
    before = state(rollout)
    assert "not linked to a platform account" in run(client, f"approve {rollout.pk}", "U0STRANGER")
    assert "not linked to a platform account" in run(client, "status", "U0STRANGER")
    assert run(client, f"approve {rollout.pk}", "U0VIEWER").startswith(":no_entry: You cannot approve this: approve needs the role approver")
    assert run(client, f"rollback {rollout.pk}", "U0VIEWER").startswith(":no_entry: You cannot roll back this")
    assert run(client, f"pause {rollout.pk}", "U0VIEWER").startswith(":no_entry: You cannot pause this")
    assert run(client, f"approve {rollout.pk}", "U0OWNER").startswith(":no_entry: You cannot approve this")
    # The same Slack user id in another workspace is someone else.
    assert "not linked" in run(client, f"rollback {rollout.pk}", "U0OWNER", team="T0OTHER")
    assert state(rollout) == before

    # Four-eyes: an admin who created a rollout cannot approve it from Slack either.
    link(platform_admin, "U0ADMIN")
    rollout.refresh_from_db()
    from rollouts.services import rollout_rollback

    rollout_rollback(rollout=rollout, actor=owner.user)
    own, _ = awaiting_approval(platform_admin)
    before_own = state(own)
    assert "four-eyes rule" in run(client, f"approve {own.pk}@{own.version}", "U0ADMIN")
    assert state(own) == before_own


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "*/rollout* commands:"),
        ("help", "*/rollout* commands:"),
        ("deploy 12", "Unknown command `deploy`"),
        ("approve", "`/rollout approve` needs a rollout id"),
        ("approve twelve", "`/rollout approve` needs a rollout id"),
        ("rollback -3", "`/rollout rollback` needs a rollout id"),
        ("status adder extra", "takes at most one alias"),
        ("link", "needs the code from your profile page"),
    ],
)
def test_bad_input_gets_usage_text(client: Client, viewer: Any, versions: None, slack: SlackStandin, text: str, says: str) -> None:
    link(viewer, "U0VIEWER")
    answer = run(client, text, "U0VIEWER")
    assert says in answer
    if text:
        assert "`/rollout status [alias]`" in answer


def test_unknown_rollouts_and_finished_ones_say_so(
    client: Client, owner: Any, approver: Any, versions: None, slack: SlackStandin
) -> None:
    link(approver, "U0APPROVER")
    assert run(client, "approve 999", "U0APPROVER") == ":grey_question: No rollout 999. Nothing changed."
    rollout, _ = awaiting_approval(owner)
    seen = state(rollout)[1]
    run(client, f"approve {rollout.pk}@{seen}", "U0APPROVER")
    before = state(rollout)
    again = run(client, f"approve {rollout.pk}@{seen}", "U0APPROVER")
    assert again.startswith(
        f":information_source: Nothing changed: rollout {rollout.pk} changed since it was read: expected version {seen}, "
        f"found {seen + 1}: it moved from awaiting approval of step 2 to step 2 of 2 since you looked: approved by "
        "approver via slack"
    ), again
    assert state(rollout) == before


def test_malformed_command_bodies_are_refused(client: Client, db: None, slack: SlackStandin) -> None:
    for body in (b"text=status", b"team_id=T0RAMP01&user_id=&text=status", b"team_id=../x&user_id=U1&text=status"):
        response = post(client, "/slack/commands", body)
        assert response.status_code == 400 and response.json()["code"] == "invalid"


def test_link_proves_the_slack_user_with_a_one_time_code(client: Client, approver: Any, owner: Any, slack: SlackStandin) -> None:
    code = slack_link_code_create(user=approver.user)
    text = run(client, f"link {code}", "U0NEWUSER", username="ann")
    assert text == ":link: Linked: <@U0NEWUSER> acts as *approver* on the platform."
    identity = SlackIdentity.objects.get(slack_user_id="U0NEWUSER")
    assert (identity.user_id, identity.team_id, identity.slack_username) == (approver.user.pk, "T0RAMP01", "ann")

    # A code works once; a made-up one never.
    assert "unknown or expired link code" in run(client, f"link {code}", "U0SOMEONE")
    assert "unknown or expired link code" in run(client, "link AAAAAAAA", "U0SOMEONE")
    # A Slack user already linked to someone else is not taken over by another account's code.
    other = slack_link_code_create(user=owner.user)
    assert "linked to approver already" in run(client, f"link {other}", "U0NEWUSER")
    assert SlackIdentity.objects.get(slack_user_id="U0NEWUSER").user_id == approver.user.pk
    # Linking again from another Slack user in the same workspace moves the link.
    again = slack_link_code_create(user=approver.user)
    run(client, f"link {again.lower()}", "U0SECOND")
    assert list(SlackIdentity.objects.filter(user=approver.user).values_list("slack_user_id", flat=True)) == ["U0SECOND"]
