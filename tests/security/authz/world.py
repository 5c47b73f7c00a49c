"""What the authorisation tests act on: the objects each endpoint needs (made only when asked for), the
callers of the role matrix, and a snapshot of everything a write could change."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiToken
from accounts.roles import Role
from accounts.services import TOKEN_PREFIX, user_create
from evals.models import EvalItem, EvalRun, EvalSuite
from evals.services import eval_run_create, eval_suite_create
from experiments.models import OutcomeEvent
from rollouts.models import Rollout, RolloutApproval, RolloutEvent
from rollouts.services import rollout_advance, rollout_create, rollout_pause
from rollouts.slack.models import SlackIdentity
from serving.models import EngineWorker, GatewayKey, ModelVersion
from serving.services import gateway_key_create
from tests.rollouts.helpers import canary_plan, engine_ready, version

SUITE_JSONL = (
    '{"id": "a", "prompt": "1+2=", "reference": "3", "tags": ["small"]}\n'
    '{"id": "b", "prompt": "2+2=", "reference": "4", "tags": ["small"]}\n'
)

# The columns of the matrix, in its order.
CALLERS = (
    "anonymous",  # no credentials at all
    "forged",  # a well-formed token nobody was ever given
    "revoked",  # the admin's own token, revoked
    "deactivated",  # the token of an admin whose account was deactivated
    "gateway_key",  # an application's gateway key (the credential of /api/v1/events only)
    "outsider",  # a valid token of a user holding no role
    "viewer",
    "approver",
    "manager",  # a release manager (the `owner` fixture)
    "admin",
    "admin_session",  # the admin's browser session, posting without a CSRF token
)

_MEMBER_FIXTURES = {
    "outsider": "outsider", "viewer": "viewer", "approver": "approver", "manager": "owner", "admin": "platform_admin",
}  # fmt: skip


def _bearer(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def caller_client(request: pytest.FixtureRequest, caller: str) -> APIClient:
    """A client presenting `caller`'s credentials, built from the shared cast in tests/conftest.py."""
    if caller == "anonymous":
        return APIClient()
    if caller == "forged":
        return _bearer(TOKEN_PREFIX + secrets.token_urlsafe(32))
    if caller == "gateway_key":
        return _bearer(gateway_key_create(name="an application").raw)
    if caller in _MEMBER_FIXTURES:
        return request.getfixturevalue(_MEMBER_FIXTURES[caller]).api()  # type: ignore[no-any-return]
    admin = request.getfixturevalue("platform_admin")
    if caller == "revoked":
        ApiToken.objects.filter(user=admin.user).update(revoked_at=timezone.now())
        return admin.api()  # type: ignore[no-any-return]
    if caller == "deactivated":
        type(admin.user).objects.filter(pk=admin.user.pk).update(is_active=False)
        return admin.api()  # type: ignore[no-any-return]
    if caller == "admin_session":
        client = APIClient(enforce_csrf_checks=True)
        client.force_login(admin.user)
        return client
    raise ValueError(f"caller: unknown column {caller!r}")


@dataclass
class World:
    """Objects made on first use, so each cell pays only for what its endpoint needs."""

    colleague: AbstractUser = field(
        default_factory=lambda: user_create(username="colleague", password=None, roles=[Role.RELEASE_MANAGER])
    )

    @cached_property
    def baseline(self) -> ModelVersion:
        return version("adder-v1")

    @cached_property
    def candidate(self) -> ModelVersion:
        return version("adder-v2")

    @cached_property
    def engine(self) -> EngineWorker:
        """A ready engine of the baseline that is desired to run."""
        return engine_ready(self.baseline)

    def plan(self) -> dict[str, Any]:
        """A canary plan of adder-v1 -> adder-v2, both with a ready engine."""
        assert self.baseline and self.candidate
        return canary_plan()

    def rollout(self, state: str) -> Rollout:
        """A rollout in `state`, created by a colleague (so four-eyes lets anyone else approve)."""
        return self.rollout_on_alias(state, alias="adder")

    def rollout_on_alias(self, state: str, *, alias: str) -> Rollout:
        plan = {**self.plan(), "alias": alias}
        if state == Rollout.State.AWAITING_APPROVAL:
            plan["steps"] = [{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}]
        rollout = rollout_create(plan=plan, actor=self.colleague, start=state != Rollout.State.DRAFT).rollout
        if state == Rollout.State.PAUSED:
            rollout = rollout_pause(rollout=rollout, actor=self.colleague)
        elif state == Rollout.State.AWAITING_APPROVAL:
            rollout = rollout_advance(rollout=rollout, actor=self.colleague)
        assert rollout.state == state, rollout.state_reason
        return rollout

    def rollout_expired_approval(self) -> Rollout:
        """A rollout whose approval request expired (asked two hours ago, usable for one minute)."""
        from datetime import timedelta
        from unittest import mock

        from django.utils import timezone

        plan = {**self.plan(), "steps": [{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}], "approval_ttl_s": 60}
        earlier = timezone.now() - timedelta(hours=2)
        with mock.patch.object(timezone, "now", return_value=earlier):
            rollout = rollout_create(plan=plan, actor=self.colleague, start=True).rollout
            rollout = rollout_advance(rollout=rollout, actor=self.colleague)
        assert rollout.state == Rollout.State.AWAITING_APPROVAL
        return rollout

    @cached_property
    def suite(self) -> EvalSuite:
        return eval_suite_create(name="tiny", jsonl_data=SUITE_JSONL)

    @cached_property
    def run(self) -> EvalRun:
        """A queued run of the candidate (nothing claims it: the test's transaction never commits)."""
        return eval_run_create(suite=self.suite, model_version=self.candidate, scorers=["exact_match"])

    @cached_property
    def baseline_run(self) -> EvalRun:
        return eval_run_create(suite=self.suite, model_version=self.baseline, scorers=["exact_match"])


WATCHED_MODELS = (ModelVersion, EngineWorker, EvalSuite, EvalItem, EvalRun, OutcomeEvent, Rollout, RolloutEvent,
                  RolloutApproval, GatewayKey, SlackIdentity)  # fmt: skip


def snapshot() -> dict[str, Any]:
    """Every row count and state a write through the API or a form could change."""
    return {
        "counts": {model.__name__: model.objects.count() for model in (*WATCHED_MODELS, get_user_model())},
        "rollouts": list(Rollout.objects.order_by("pk").values_list("pk", "state", "version", "step_index")),
        "engines": list(EngineWorker.objects.order_by("pk").values_list("pk", "state", "desired_state")),
        "runs": list(EvalRun.objects.order_by("pk").values_list("pk", "state", "cancel_requested")),
    }


def url_routes(patterns: list[URLPattern | URLResolver] | None = None, prefix: str = "") -> list[tuple[str, Any]]:
    """(path template as the schema writes it, view) for every route of the URLconf."""
    found: list[tuple[str, Any]] = []
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            found += url_routes(pattern.url_patterns, route)
        else:
            found.append(("/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route), pattern.callback))
    return found
