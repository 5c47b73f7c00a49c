from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from config.celery import app as celery_app
from rollouts.models import Rollout, RolloutEvent
from rollouts.services import rollout_advance, rollout_create
from rollouts.slack.models import SlackIdentity
from tests.rollouts.helpers import canary_plan, version
from tests.rollouts.slack.helpers import SECRET, TEAM
from tests.support.slack_standin import SlackStandin, slack_standin


@pytest.fixture
def standin() -> Iterator[SlackStandin]:
    with slack_standin() as running:
        yield running


@pytest.fixture
def slack(settings: Any, standin: SlackStandin) -> SlackStandin:
    """Slack configured with a bot token, pointed at the stand-in."""
    settings.SLACK_SIGNING_SECRET = SECRET
    settings.SLACK_BOT_TOKEN = standin.token
    settings.SLACK_WEBHOOK_URL = None
    settings.SLACK_API_BASE_URL = standin.api_url
    settings.SLACK_DEFAULT_CHANNEL = "#rollouts"
    settings.SLACK_ALIAS_CHANNELS = {"adder": "#adder-rollouts"}
    settings.PUBLIC_URL = "https://ramp.example"
    return standin


@pytest.fixture
def eager() -> Iterator[None]:
    """Tasks enqueued with .delay() run here and now (for on-commit callbacks captured in a test)."""
    before = (celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates)
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = True, True
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = before


@pytest.fixture
def versions(db: None) -> None:
    version("adder-v1")
    version("adder-v2")


def link(member: Any, slack_user_id: str, *, team: str = TEAM) -> SlackIdentity:
    return SlackIdentity.objects.create(user=member.user, team_id=team, slack_user_id=slack_user_id,
                                        slack_username=member.user.get_username())  # fmt: skip


def awaiting_approval(owner: Any, **plan: Any) -> tuple[Rollout, RolloutEvent]:
    """A canary whose second step needs an approval, waiting for it (moved there by its owner)."""
    overrides: dict[str, Any] = {"steps": [{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}]}
    overrides.update(plan)
    rollout = rollout_create(plan=canary_plan(**overrides), actor=owner.user, start=True).rollout
    rollout = rollout_advance(rollout=rollout, actor=owner.user, reason="step 1 looks fine")
    assert rollout.state == "awaiting_approval"
    event = rollout.events.order_by("seq").last()
    assert event is not None and event.kind == "awaiting_approval"
    return rollout, event
