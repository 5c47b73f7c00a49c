"""The Slack part of a person's profile: get a code, type it in Slack, see the link, unlink it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from rollouts.slack.models import SlackIdentity
from tests.rollouts.slack.conftest import link
from tests.rollouts.slack.helpers import command_body, post
from tests.support.slack_standin import SlackStandin

pytestmark = pytest.mark.django_db


def logged_in(member: Any) -> Client:
    client = Client()
    assert client.login(username=member.user.get_username(), password=f"{member.user.get_username()}-password-1")
    return client


def test_the_page_needs_a_login(client: Client, db: None) -> None:
    response = client.get("/account/slack")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_a_person_links_their_slack_user_from_the_page_and_unlinks_it(approver: Any, slack: SlackStandin) -> None:
    browser = logged_in(approver)
    page = browser.get("/account/slack").content.decode()
    assert "No Slack user is linked to your account." in page

    page = browser.post("/account/slack", {"action": "code"}).content.decode()
    found = re.search(r"/rollout link ([A-Z0-9]{8})", page)
    assert found is not None and "within 10 minutes" in page

    # Typed in Slack: Slack's signed command says which Slack user it is.
    answer = post(Client(), "/slack/commands", command_body(f"link {found.group(1)}", user="U0ANN", username="ann")).json()
    assert "acts as *approver*" in answer["text"]

    page = browser.get("/account/slack").content.decode()
    assert "@ann" in page and "<code>U0ANN</code>" in page and "<code>T0RAMP01</code>" in page
    identity = SlackIdentity.objects.get(user=approver.user)
    response = browser.post("/account/slack", {"action": "unlink", "identity": identity.pk}, follow=True)
    assert "Slack user unlinked." in response.content.decode()
    assert not SlackIdentity.objects.filter(user=approver.user).exists()


def test_nobody_can_unlink_someone_elses_slack_user(approver: Any, viewer: Any, slack: SlackStandin) -> None:
    identity = link(approver, "U0APPROVER")
    response = logged_in(viewer).post("/account/slack", {"action": "unlink", "identity": identity.pk}, follow=True)
    assert "no such Slack link on your account" in response.content.decode()
    assert SlackIdentity.objects.filter(pk=identity.pk).exists()
    response = logged_in(viewer).post("/account/slack", {"action": "link", "team_id": "T0RAMP01", "slack_user_id": "U0APPROVER"}, follow=True)
    assert "action: expected code or unlink" in response.content.decode()
    assert SlackIdentity.objects.get(slack_user_id="U0APPROVER").user_id == approver.user.pk


def test_admins_manage_links_in_the_django_admin(approver: Any, db: None) -> None:
    admin = get_user_model().objects.create_superuser("root", password="root-password-1")
    identity = link(approver, "U0APPROVER")
    client = Client()
    client.force_login(admin)
    listing = client.get("/admin/rollouts/slackidentity/")
    assert listing.status_code == 200 and "U0APPROVER" in listing.content.decode()
    response = client.post("/admin/rollouts/slackidentity/add/", {
        "user": approver.user.pk, "team_id": "T0OTHER", "slack_user_id": "U0ELSEWHERE", "slack_username": "ann",
        "created_at_0": "2025-01-01", "created_at_1": "00:00:00",
    })  # fmt: skip
    assert response.status_code == 302
    assert set(SlackIdentity.objects.filter(user=approver.user).values_list("team_id", flat=True)) == {"T0RAMP01", "T0OTHER"}
    assert SlackIdentity.objects.filter(pk=identity.pk).exists()
