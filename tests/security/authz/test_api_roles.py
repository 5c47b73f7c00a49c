"""Every REST API endpoint x every kind of caller, with the status each must get.

The table is the whole API: a (method, path) the schema or the URL resolver knows and the table does not is
a failure, so a new endpoint cannot ship without someone deciding who may call it. A refused write must
change nothing; an allowed one is made well-formed, so its precise status is asserted too.

Rules, from accounts/permissions.py, rollouts.services.ACTION_ROLES and each app's api.py: reads need any
role; writes a release manager or an admin (asking again for an expired approval included); approve/reject an
approver or an admin; pause and rollback
(stopping harm) are open to approvers too; outcome events take an application's gateway key or a release
manager's token; /api/v1/me answers any signed-in user. A browser session must send its CSRF token."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from experiments.models import OutcomeEvent
from rollouts.models import Rollout
from rollouts.slack.models import SlackIdentity
from serving.services import gateway_key_create, gateway_key_revoke
from tests.rollouts.helpers import records
from tests.rollouts.slack.helpers import SECRET, TEAM, click_body, command_body, sign
from tests.security.authz.world import CALLERS, SUITE_JSONL, World, caller_client, snapshot, url_routes

pytestmark = pytest.mark.django_db

State = Rollout.State


@dataclass(frozen=True)
class Call:
    path: str
    body: dict[str, Any] | None = None
    writes: bool = True  # whether an allowed call changes something (validate and reads do not)


Prepare = Callable[[World], Call]


def _action(state: str, action: str, body: dict[str, Any] | None = None) -> Prepare:
    def prepare(world: World) -> Call:
        rollout = world.rollout_expired_approval() if state == "expired" else world.rollout(state)
        return Call(
            f"/api/v1/rollouts/{rollout.pk}/{action}",
            {"reason": "authz", **(body or {}), "expected_version": rollout.version},
        )

    return prepare


def _running(suffix: str) -> Prepare:
    return lambda world: Call(f"/api/v1/rollouts/{world.rollout(State.RUNNING).pk}{suffix}", writes=False)


# How to make a well-formed request to each endpoint, keyed like the schema.
REQUESTS: dict[tuple[str, str], Prepare] = {
    ("GET", "/api/v1/me"): lambda world: Call("/api/v1/me", writes=False),
    ("GET", "/api/v1/model-versions"): lambda world: Call("/api/v1/model-versions", writes=False),
    ("POST", "/api/v1/model-versions"): lambda world: Call(
        "/api/v1/model-versions", {"name": "adder", "version": "v9", "artifact": "/nonexistent/adder-v9"}),
    ("GET", "/api/v1/model-versions/{ref}"): lambda world: Call(f"/api/v1/model-versions/{world.baseline.label}", writes=False),
    ("GET", "/api/v1/engines"): lambda world: Call("/api/v1/engines", writes=False),
    ("POST", "/api/v1/engines"): lambda world: Call(
        "/api/v1/engines", {"model_version": world.baseline.label, "driver": "static", "base_url": "http://127.0.0.1:9"}),
    ("GET", "/api/v1/engines/{worker_id}"): lambda world: Call(f"/api/v1/engines/{world.engine.pk}", writes=False),
    ("POST", "/api/v1/engines/{worker_id}/desired-state"): lambda world: Call(
        f"/api/v1/engines/{world.engine.pk}/desired-state", {"desired_state": "stopped"}),
    ("GET", "/api/v1/eval-suites"): lambda world: Call("/api/v1/eval-suites", writes=False),
    ("POST", "/api/v1/eval-suites"): lambda world: Call("/api/v1/eval-suites", {"name": "uploaded", "jsonl": SUITE_JSONL}),
    ("GET", "/api/v1/eval-suites/{suite_id}"): lambda world: Call(f"/api/v1/eval-suites/{world.suite.pk}", writes=False),
    ("GET", "/api/v1/eval-suites/{suite_id}/items"): lambda world: Call(
        f"/api/v1/eval-suites/{world.suite.pk}/items", writes=False),
    ("GET", "/api/v1/eval-runs"): lambda world: Call("/api/v1/eval-runs", writes=False),
    ("POST", "/api/v1/eval-runs"): lambda world: Call(
        "/api/v1/eval-runs", {"suite": world.suite.name, "model_version": world.candidate.label, "scorers": ["exact_match"]}),
    ("GET", "/api/v1/eval-runs/{run_id}"): lambda world: Call(f"/api/v1/eval-runs/{world.run.pk}", writes=False),
    ("GET", "/api/v1/eval-runs/{run_id}/results"): lambda world: Call(f"/api/v1/eval-runs/{world.run.pk}/results", writes=False),
    ("POST", "/api/v1/eval-runs/{run_id}/cancel"): lambda world: Call(f"/api/v1/eval-runs/{world.run.pk}/cancel", {}),
    ("GET", "/api/v1/eval-comparisons"): lambda world: Call(
        f"/api/v1/eval-comparisons?baseline={world.baseline_run.pk}&candidate={world.run.pk}", writes=False),
    ("POST", "/api/v1/events"): lambda world: Call(
        "/api/v1/events", {"events": [{"session_id": "user-42", "kind": "thumbs", "value": "up"}]}),
    ("GET", "/api/v1/rollouts"): lambda world: Call("/api/v1/rollouts", writes=False),
    ("POST", "/api/v1/rollouts"): lambda world: Call("/api/v1/rollouts", world.plan()),
    ("POST", "/api/v1/rollouts/validate"): lambda world: Call("/api/v1/rollouts/validate", world.plan(), writes=False),
    ("GET", "/api/v1/rollouts/{rollout_id}"): _running(""),
    ("GET", "/api/v1/rollouts/{rollout_id}/events"): _running("/events"),
    ("GET", "/api/v1/rollouts/{rollout_id}/series"): _running("/series"),
    ("POST", "/api/v1/rollouts/{rollout_id}/start"): _action(State.DRAFT, "start"),
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): _action(State.RUNNING, "pause"),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): _action(State.PAUSED, "resume"),
    ("POST", "/api/v1/rollouts/{rollout_id}/approve"): _action(State.AWAITING_APPROVAL, "approve", {"step_index": 1}),
    ("POST", "/api/v1/rollouts/{rollout_id}/reject"): _action(State.AWAITING_APPROVAL, "reject"),
    ("POST", "/api/v1/rollouts/{rollout_id}/request-approval"): _action("expired", "request-approval"),
    ("POST", "/api/v1/rollouts/{rollout_id}/advance"): _action(State.RUNNING, "advance"),
    ("POST", "/api/v1/rollouts/{rollout_id}/rollback"): _action(State.RUNNING, "rollback"),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): _action(State.RUNNING, "abort"),
    ("POST", "/api/v1/rollouts/{rollout_id}/promote"): _action(State.RUNNING, "promote"),
}  # fmt: skip

# The expected status of every cell. Columns: CALLERS in tests/security/authz/world.py.
# admin_session is the admin's logged-in browser without a CSRF token: reads pass, every write is a 403.
#                                                         anon forged revoked deact gwkey outsider viewer approver manager admin session
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/api/v1/me"):                                   (401, 401, 401, 401, 401, 200, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/model-versions"):                       (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/model-versions"):                      (401, 401, 401, 401, 401, 403, 403, 403, 201, 201, 403),
    ("GET", "/api/v1/model-versions/{ref}"):                 (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/engines"):                              (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/engines"):                             (401, 401, 401, 401, 401, 403, 403, 403, 201, 201, 403),
    ("GET", "/api/v1/engines/{worker_id}"):                  (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/engines/{worker_id}/desired-state"):   (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
    ("GET", "/api/v1/eval-suites"):                          (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/eval-suites"):                         (401, 401, 401, 401, 401, 403, 403, 403, 201, 201, 403),
    ("GET", "/api/v1/eval-suites/{suite_id}"):               (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/eval-suites/{suite_id}/items"):         (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/eval-runs"):                            (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/eval-runs"):                           (401, 401, 401, 401, 401, 403, 403, 403, 201, 201, 403),
    ("GET", "/api/v1/eval-runs/{run_id}"):                   (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/eval-runs/{run_id}/results"):           (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/eval-runs/{run_id}/cancel"):           (401, 401, 401, 401, 401, 403, 403, 403, 202, 202, 403),
    ("GET", "/api/v1/eval-comparisons"):                     (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/events"):                              (401, 401, 401, 401, 202, 403, 403, 403, 202, 202, 403),
    ("GET", "/api/v1/rollouts"):                             (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/rollouts"):                            (401, 401, 401, 401, 401, 403, 403, 403, 201, 201, 403),
    ("POST", "/api/v1/rollouts/validate"):                   (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
    ("GET", "/api/v1/rollouts/{rollout_id}"):                (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/rollouts/{rollout_id}/events"):         (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/rollouts/{rollout_id}/series"):         (401, 401, 401, 401, 401, 403, 200, 200, 200, 200, 200),
    ("POST", "/api/v1/rollouts/{rollout_id}/start"):         (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"):         (401, 401, 401, 401, 401, 403, 403, 200, 200, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"):        (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/approve"):       (401, 401, 401, 401, 401, 403, 403, 200, 403, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/reject"):        (401, 401, 401, 401, 401, 403, 403, 200, 403, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/request-approval"): (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/advance"):       (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/rollback"):      (401, 401, 401, 401, 401, 403, 403, 200, 200, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"):         (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/promote"):       (401, 401, 401, 401, 401, 403, 403, 403, 200, 200, 403),
}  # fmt: skip


def _send(client: APIClient, method: str, call: Call) -> Any:
    body = "" if call.body is None else json.dumps(call.body)
    return client.generic(method, call.path, body, content_type="application/json")


CELLS = [(endpoint, caller, expected) for endpoint, row in MATRIX.items() for caller, expected in zip(CALLERS, row, strict=True)]


@pytest.mark.parametrize(
    ("endpoint", "caller", "expected"), CELLS, ids=[f"{m} {p} as {c}" for (m, p), c, _ in CELLS]
)
def test_each_caller_gets_the_status_the_table_gives(
    endpoint: tuple[str, str], caller: str, expected: int, request: pytest.FixtureRequest
) -> None:
    method, _ = endpoint
    client = caller_client(request, caller)
    call = REQUESTS[endpoint](World())
    before = snapshot()
    response = _send(client, method, call)
    assert response.status_code == expected, f"{caller}: {response.status_code} {response.content[:300]!r}"
    body = response.json()
    if expected in (401, 403):
        assert body["detail"], body  # a JSON reason, not an HTML page
        if caller == "admin_session":
            assert "CSRF" in body["detail"], body
        assert snapshot() == before, f"a refused {method} changed something"
    elif call.writes:
        assert snapshot() != before, "an allowed write changed nothing: the refusals above would prove nothing"
    else:
        assert snapshot() == before, f"a {method} that only reads changed something"


# --- the table is the whole API ------------------------------------------------------------------------

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _api_operations() -> set[tuple[str, str]]:
    """What the URL resolver routes under /api/v1/: each DRF view's path and the methods it implements."""
    operations = set()
    for path, view in url_routes():
        if path.startswith("/api/v1/"):
            view_class = view.cls  # every route there must be a DRF view, whose permissions the table checks
            operations |= {(m, path) for m in METHODS if hasattr(view_class, m.lower())}
    return operations


def test_the_table_has_every_operation_of_the_schema_and_of_the_url_resolver(client: Client) -> None:
    schema = client.get("/api/schema/?format=json").json()
    documented = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    assert documented == set(MATRIX), "every endpoint in the schema needs a row in MATRIX (and only those)"
    assert _api_operations() == set(MATRIX), "a route under /api/v1/ is missing from the schema or the table"
    assert set(REQUESTS) == set(MATRIX)


@pytest.mark.parametrize("path", sorted({path for _, path in MATRIX}))
def test_methods_outside_the_table_are_refused_even_to_an_admin(path: str, platform_admin: Any) -> None:
    allowed = {method for method, template in MATRIX if template == path}
    call = REQUESTS[(sorted(allowed)[0], path)](World())
    client = platform_admin.api()
    before = snapshot()
    for method in sorted(set(METHODS) - allowed):
        response = client.generic(method, call.path, json.dumps(call.body or {}), content_type="application/json")
        assert response.status_code == 405, f"{method} {path}: {response.status_code}"
    assert snapshot() == before


def test_a_revoked_gateway_key_cannot_report_outcomes() -> None:
    issued = gateway_key_create(name="a retired application")
    gateway_key_revoke(key=issued.key)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    call = REQUESTS[("POST", "/api/v1/events")](World())
    before = snapshot()
    assert _send(client, "POST", call).status_code == 401
    assert snapshot() == before


def test_a_gateway_key_reports_outcomes_only_for_the_aliases_it_may_call() -> None:
    """A key limited to alias "chat" must not be able to score the "adder" rollout's arms (thumbs down on
    its candidate's requests would push the rollout towards a rollback)."""
    rollout = World().rollout(State.RUNNING)
    [served] = records(rollout, arm="candidate", n=1, model_version=rollout.candidate, alias="adder")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {gateway_key_create(name='the chat app', aliases=['chat']).raw}")
    response = client.post("/api/v1/events", {"events": [{"request_id": served.request_id, "kind": "thumbs", "value": "down"}]},
                           format="json")  # fmt: skip
    assert response.status_code == 202 and response.json()["resolved"] == 0
    assert not OutcomeEvent.objects.filter(rollout_id=rollout.pk).exists()
    # The same event from a key that may call "adder" joins the candidate's arm.
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {gateway_key_create(name='the adder app', aliases=['adder']).raw}")
    response = client.post("/api/v1/events", {"events": [{"request_id": served.request_id, "kind": "thumbs", "value": "down"}]},
                           format="json")  # fmt: skip
    assert response.status_code == 202 and response.json()["resolved"] == 1
    assert OutcomeEvent.objects.filter(rollout_id=rollout.pk, arm="candidate").count() == 1


# --- Slack: only Slack's signature counts, whatever else the request carries ---------------------------


@pytest.fixture
def slack_world(settings: Any, platform_admin: Any) -> dict[str, tuple[bytes, Rollout, str]]:
    """A click approving an awaiting rollout and a command rolling back a running one, both from the
    admin's linked Slack user: each would act if Slack had signed it."""
    settings.SLACK_SIGNING_SECRET = SECRET
    settings.SLACK_BOT_TOKEN = settings.SLACK_WEBHOOK_URL = None
    SlackIdentity.objects.create(user=platform_admin.user, team_id=TEAM, slack_user_id="U0ADMIN")
    world = World()
    awaiting, running = world.rollout(State.AWAITING_APPROVAL), world.rollout_on_alias(State.RUNNING, alias="other")
    click = click_body(user="U0ADMIN", value={"rollout": awaiting.pk, "step": 1, "version": awaiting.version})
    return {
        "/slack/interactions": (click, awaiting, State.RUNNING),
        "/slack/commands": (command_body(f"rollback {running.pk}", user="U0ADMIN"), running, State.ROLLED_BACK),
    }


@pytest.mark.parametrize("path", ["/slack/interactions", "/slack/commands"])
@pytest.mark.parametrize("caller", CALLERS)
def test_an_unsigned_slack_request_is_refused_whoever_sends_it(
    path: str, caller: str, slack_world: dict[str, tuple[bytes, Rollout, str]], request: pytest.FixtureRequest
) -> None:
    body, _, _ = slack_world[path]
    client = caller_client(request, caller)
    before = snapshot()
    response = client.generic("POST", path, body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 401, response.content[:300]
    assert snapshot() == before


@pytest.mark.parametrize("path", ["/slack/interactions", "/slack/commands"])
def test_the_same_slack_request_signed_acts(path: str, slack_world: dict[str, tuple[bytes, Rollout, str]]) -> None:
    body, rollout, acted = slack_world[path]
    response = APIClient().generic("POST", path, body, content_type="application/x-www-form-urlencoded", **sign(body))
    assert response.status_code == 200, response.content[:300]
    rollout.refresh_from_db()
    assert rollout.state == acted, rollout.state_reason
