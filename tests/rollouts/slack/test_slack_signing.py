"""Only genuine, fresh, first-time requests from Slack are acted on. Each refused request below would
otherwise approve a rollout (a linked approver's valid click), so a hole in the check fails the test."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client

from rollouts.models import Rollout, RolloutEvent
from rollouts.slack.services import slack_event_post
from tests.rollouts.slack.conftest import awaiting_approval, link
from tests.rollouts.slack.helpers import SECRET, click_body, command_body, post, sign
from tests.support.slack_standin import SlackStandin

pytestmark = pytest.mark.django_db


@pytest.fixture
def click(owner: Any, approver: Any, versions: None, slack: SlackStandin) -> tuple[Rollout, bytes]:
    rollout, event = awaiting_approval(owner)
    slack_event_post(event_id=event.pk)
    link(approver, "U0APPROVER")
    return rollout, click_body(user="U0APPROVER", value={"rollout": rollout.pk, "step": 1, "version": rollout.version})


def state(rollout: Rollout) -> tuple[str, int, int]:
    fresh = Rollout.objects.get(pk=rollout.pk)
    return fresh.state, fresh.version, RolloutEvent.objects.filter(rollout=rollout).count()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda body: sign(body, secret="not-the-secret"), id="forged-with-another-secret"),
        pytest.param(lambda body: {**sign(body), "HTTP_X_SLACK_SIGNATURE": "v0=" + "0" * 64}, id="forged-signature"),
        pytest.param(lambda body: sign(body + b"&extra=1"), id="signature-of-another-body"),
        pytest.param(lambda body: sign(body, timestamp=int(time.time()) - 301), id="stale-timestamp"),
        pytest.param(lambda body: sign(body, timestamp=int(time.time()) + 310), id="timestamp-from-the-future"),
        pytest.param(lambda body: {"HTTP_X_SLACK_SIGNATURE": sign(body)["HTTP_X_SLACK_SIGNATURE"]}, id="no-timestamp"),
        pytest.param(lambda body: {"HTTP_X_SLACK_REQUEST_TIMESTAMP": str(int(time.time()))}, id="no-signature"),
        pytest.param(lambda body: {**sign(body), "HTTP_X_SLACK_REQUEST_TIMESTAMP": "soon"}, id="timestamp-not-a-number"),
        pytest.param(lambda body: {**sign(body), "HTTP_X_SLACK_SIGNATURE": sign(body)["HTTP_X_SLACK_SIGNATURE"][3:]}, id="no-v0-prefix"),
        pytest.param(lambda body: {}, id="unsigned"),
    ],
)
def test_forged_or_stale_requests_get_401_and_change_nothing(client: Client, click: tuple[Rollout, bytes], headers: Any) -> None:
    rollout, body = click
    before = state(rollout)
    response = post(client, "/slack/interactions", body, headers(body))
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert state(rollout) == before == ("awaiting_approval", before[1], before[2])
    # The slash command endpoint checks the same way.
    command = command_body(f"approve {rollout.pk}", user="U0APPROVER")
    assert post(client, "/slack/commands", command, headers(command)).status_code == 401
    assert state(rollout) == before


def test_a_request_signed_just_inside_the_window_is_accepted(client: Client, click: tuple[Rollout, bytes]) -> None:
    rollout, body = click
    response = post(client, "/slack/interactions", body, sign(body, timestamp=int(time.time()) - 290))
    assert response.status_code == 200
    assert state(rollout)[0] == "running"


def test_a_replayed_request_is_refused_even_inside_the_window(client: Client, click: tuple[Rollout, bytes]) -> None:
    rollout, body = click
    headers = sign(body)
    assert post(client, "/slack/interactions", body, headers).status_code == 200
    after_first = state(rollout)
    assert after_first[0] == "running"

    replay = post(client, "/slack/interactions", body, headers)
    assert replay.status_code == 401 and "replayed" in replay.json()["detail"]
    assert state(rollout) == after_first

    command = command_body(f"rollback {rollout.pk}", user="U0APPROVER")
    command_headers = sign(command)
    assert post(client, "/slack/commands", command, command_headers).status_code == 200
    rolled_back = state(rollout)
    assert rolled_back[0] == "rolled_back"
    assert post(client, "/slack/commands", command, command_headers).status_code == 401
    assert state(rollout) == rolled_back


def test_without_a_signing_secret_nothing_from_slack_is_trusted(
    client: Client, click: tuple[Rollout, bytes], settings: Any
) -> None:
    rollout, body = click
    settings.SLACK_SIGNING_SECRET = None
    before = state(rollout)
    response = post(client, "/slack/interactions", body)
    assert response.status_code == 503 and "SLACK_SIGNING_SECRET" in response.json()["detail"]
    assert state(rollout) == before


def test_only_post_is_served(client: Client, db: None, settings: Any) -> None:
    settings.SLACK_SIGNING_SECRET = SECRET
    assert client.get("/slack/interactions").status_code == 405
    assert client.get("/slack/commands").status_code == 405
