"""The rollouts REST API as a CI pipeline uses it, and every endpoint refusing the roles it must refuse."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout
from tests.rollouts.helpers import both_arms, canary_plan, step_back, version

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions() -> None:
    version("adder-v1")
    version("adder-v2")


def create(member: Any, plan: dict[str, Any] | None = None, **params: Any) -> Any:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return member.api().post(f"/api/v1/rollouts{'?' + query if query else ''}", plan or canary_plan(), format="json")


def act(member: Any, rollout_id: int, action: str, body: dict[str, Any] | None = None, **headers: Any) -> Any:
    """An action as a careful client sends it: with the version it just read."""
    version = Rollout.objects.get(pk=rollout_id).version
    return member.api().post(
        f"/api/v1/rollouts/{rollout_id}/{action}", {"expected_version": version, **(body or {})}, format="json", **headers
    )


def test_create_start_and_follow_a_rollout(owner: Any, versions: None) -> None:
    created = create(owner, start="true")
    assert created.status_code == 201, created.json()
    body = created.json()
    assert created["Location"] == f"/api/v1/rollouts/{body['id']}"
    assert (body["state"], body["alias"], body["baseline"], body["candidate"]) == ("running", "adder", "adder-v1", "adder-v2")
    assert body["weights"] == {"baseline": 0.9, "candidate": 0.1, "shadow": 0.0}
    assert body["current_step"]["index"] == 0 and body["step_count"] == 2
    assert body["plan"]["guardrails"][0] == {"metric": "tpot_mean_ms", "margin": 0.1, "relative": True}
    assert body["latest_analysis"] is None and body["health"]["status"] == "unknown"
    assert set(body["actions"]) == {"pause", "advance", "rollback", "abort", "promote"}

    rollout = Rollout.objects.get(pk=body["id"])
    step_back(rollout, 61)
    # The step's floor is 922 candidate requests (the error-rate guardrail's at alpha 0.025: two guardrails,
    # whose checks on the bake alone take half of their breach sides, no share; 1,077 when they did): 1,200 at 10 %.
    both_arms(rollout, total=12_000, weight=0.1, seed=21)
    rollout_analyse(rollout_id=rollout.pk)
    detail = owner.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert detail["step_index"] == 1 and detail["weights"]["candidate"] == 0.5, detail["latest_analysis"]["reason"]
    assert detail["latest_analysis"]["decision"] == "advance" and detail["latest_analysis"]["arms"]["candidate"]["n"] == 1200

    events = owner.api().get(f"/api/v1/rollouts/{rollout.pk}/events").json()
    assert [e["kind"] for e in events] == ["created", "started", "step_started"]
    assert events[-1]["actor"] == "analysis" and events[-1]["evidence"]["arms"]["baseline"]["n"] == 10_800
    assert owner.api().get(f"/api/v1/rollouts/{rollout.pk}/events?after=2").json()[0]["seq"] == 3

    series = owner.api().get(f"/api/v1/rollouts/{rollout.pk}/series").json()
    assert len(series) == 1 and series[0]["decision"] == "advance" and series[0]["checks"][0]["metric"] == "tpot_mean_ms"

    rolled = act(owner, rollout.pk, "rollback", {"reason": "CI smoke test failed"})
    assert rolled.status_code == 200 and rolled.json()["state"] == "rolled_back"
    assert rolled.json()["weights"] == {"baseline": 1.0, "candidate": 0.0, "shadow": 0.0}
    assert owner.api().get("/api/v1/rollouts?state=rolled_back").json()["count"] == 1


def test_a_yaml_plan_is_accepted(owner: Any, versions: None) -> None:
    text = yaml.safe_dump(canary_plan())
    response = owner.api().post("/api/v1/rollouts", data=text, content_type="application/yaml")
    assert response.status_code == 201, response.json()
    assert response.json()["state"] == "draft"


def test_a_bad_plan_is_a_400_naming_every_field(owner: Any, versions: None) -> None:
    plan = canary_plan(
        candidate="adder-v9",
        steps=[{"weight": 0.1}, {"weight": 0.5}, {"weight": 0.2}],
        slos=["latency_p99 <= 3"],
    )
    response = create(owner, plan)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert body["detail"] == "steps[2].weight: weights must increase (the step before has 0.5)"
    assert "steps[2].weight" in body["errors"] and "slos[0].metric" in body["errors"]
    assert not Rollout.objects.exists()

    unknown = create(owner, canary_plan(candidate="adder-v9"))
    assert unknown.json()["errors"] == {"candidate": ["no model version 'adder-v9' is registered"]}
    broken_yaml = owner.api().post("/api/v1/rollouts", data="alias: [unclosed", content_type="application/yaml")
    assert broken_yaml.status_code == 400 and broken_yaml.json()["detail"].startswith("plan: not valid YAML")


def test_starting_without_a_ready_candidate_is_a_400_on_the_candidate(owner: Any) -> None:
    version("adder-v1")
    version("adder-v2", ready=False)
    response = create(owner, start="true")
    assert response.status_code == 400
    assert response.json()["errors"] == {"candidate": ["no ready engine for adder-v2"]}


def test_a_second_live_rollout_on_an_alias_is_a_409(owner: Any, versions: None) -> None:
    version("adder-v3")
    assert create(owner).status_code == 201
    second = create(owner, canary_plan(candidate="adder-v3"))
    assert second.status_code == 409 and second.json()["errors"] == {"alias": [second.json()["detail"]]}


def test_an_idempotency_key_replays_the_first_rollout(owner: Any, versions: None) -> None:
    client = owner.api()
    headers = {"HTTP_IDEMPOTENCY_KEY": "ci-run-1234"}
    first = client.post("/api/v1/rollouts?start=true", canary_plan(), format="json", **headers)
    again = client.post("/api/v1/rollouts?start=true", canary_plan(), format="json", **headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again["Idempotent-Replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert Rollout.objects.count() == 1

    different = client.post("/api/v1/rollouts?start=true", canary_plan(name="other"), format="json", **headers)
    assert different.status_code == 422 and different.json()["code"] == "idempotency_key_reused"
    bad_key = client.post("/api/v1/rollouts", canary_plan(), format="json", HTTP_IDEMPOTENCY_KEY="has spaces in it")
    assert bad_key.status_code == 400 and "Idempotency-Key" in bad_key.json()["errors"]


def test_the_same_key_from_another_user_is_another_rollout(owner: Any, platform_admin: Any, versions: None) -> None:
    version("adder-v3")
    headers = {"HTTP_IDEMPOTENCY_KEY": "shared-key"}
    assert owner.api().post("/api/v1/rollouts", canary_plan(), format="json", **headers).status_code == 201
    other = platform_admin.api().post("/api/v1/rollouts", canary_plan(alias="b"), format="json", **headers)
    assert other.status_code == 201 and Rollout.objects.count() == 2


def test_a_wrong_state_action_is_a_409_with_what_was_expected(owner: Any, versions: None) -> None:
    rollout_id = create(owner).json()["id"]
    response = act(owner, rollout_id, "advance")
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"cannot advance rollout {rollout_id}: expected state running, found draft",
        "code": "conflict",
        "errors": {"state": [f"cannot advance rollout {rollout_id}: expected state running, found draft"]},
    }
    assert owner.api().post("/api/v1/rollouts/999999/start", {"expected_version": 1}, format="json").status_code == 404


def test_an_action_body_that_is_not_an_object_is_a_400_and_does_nothing(owner: Any, versions: None) -> None:
    rollout_id = create(owner).json()["id"]
    for body in ('"abort"', "[1]", "3"):
        response = owner.api().post(f"/api/v1/rollouts/{rollout_id}/abort", body, content_type="application/json")
        assert response.status_code == 400, body
        assert response.json()["errors"] == {"non_field_errors": ["the body must be a JSON object, or empty"]}
    assert owner.api().get(f"/api/v1/rollouts/{rollout_id}").json()["state"] == "draft"
    # No body at all is a 400 too: an action says which version of the rollout it acts on.
    missing = owner.api().post(f"/api/v1/rollouts/{rollout_id}/abort")
    assert missing.status_code == 400 and set(missing.json()["errors"]) == {"expected_version"}
    assert missing.json()["detail"].startswith("expected_version: required: the rollout's `version` as you last read it")
    assert act(owner, rollout_id, "abort").json()["state"] == "aborted"


def test_approval_through_the_api_with_four_eyes(owner: Any, approver: Any, platform_admin: Any, versions: None) -> None:
    plan = canary_plan(steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}])
    rollout_id = create(platform_admin, plan, start="true").json()["id"]
    assert act(platform_admin, rollout_id, "advance").json()["state"] == "awaiting_approval"
    detail = approver.api().get(f"/api/v1/rollouts/{rollout_id}").json()
    assert detail["pending_approval_step"] == 1 and "approve" in detail["actions"]
    assert "approve" not in platform_admin.api().get(f"/api/v1/rollouts/{rollout_id}").json()["actions"]

    assert detail["approval"]["text"] == "0 of 1 approval for step 2 of 2; 1 more from role approver (approver)"
    assert detail["approval"]["excluded"] == {"platform-admin": "created the rollout"}

    own = act(platform_admin, rollout_id, "approve")
    assert own.status_code == 403 and "four-eyes" in own.json()["detail"]
    stale = act(approver, rollout_id, "approve", {"step_index": 0})
    assert stale.status_code == 409
    done = act(approver, rollout_id, "approve", {"step_index": 1, "reason": "ok"})
    assert done.status_code == 200 and done.json()["step_index"] == 1 and done.json()["approval"] is None
    twice = act(approver, rollout_id, "approve", {"step_index": 1})
    assert twice.status_code == 409 and "already approved by approver" in twice.json()["detail"]


def test_validate_returns_the_normalised_plan_and_sample_sizes(owner: Any, versions: None) -> None:
    response = owner.api().post("/api/v1/rollouts/validate", canary_plan(), format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["plan"]["steps"][0]["weight"] == 0.1
    first = body["estimates"]["steps"][0]
    assert first["candidate_n"] > 0 and {c["metric"] for c in first["checks"]} == {"tpot_mean_ms", "error_rate"}
    # A narrower margin needs more requests.
    narrow = owner.api().post(
        "/api/v1/rollouts/validate", canary_plan(guardrails=[{"metric": "tpot_mean_ms", "margin": "2%"}]), format="json"
    ).json()
    assert narrow["estimates"]["steps"][0]["candidate_n"] > first["checks"][0]["candidate_n"]
    assert not Rollout.objects.exists()


# --- every endpoint x the role that must be refused -------------------------------------------------

READS = ["/api/v1/rollouts", "/api/v1/rollouts/{id}", "/api/v1/rollouts/{id}/events", "/api/v1/rollouts/{id}/series"]
MANAGER_ONLY = ["start", "resume", "advance", "promote", "abort", "request-approval"]
APPROVER_ONLY = ["approve", "reject"]
STOPPERS = ["pause", "rollback"]


@pytest.fixture
def rollout_id(owner: Any, versions: None) -> int:
    return int(create(owner).json()["id"])


@pytest.mark.parametrize("path", READS)
def test_reads_refuse_anonymous_and_users_without_a_role(path: str, rollout_id: int, anonymous: Any, outsider: Any, viewer: Any) -> None:
    url = path.format(id=rollout_id)
    assert anonymous.get(url).status_code == 401
    assert outsider.api().get(url).status_code == 403
    assert viewer.api().get(url).status_code == 200


@pytest.mark.parametrize("action", MANAGER_ONLY + APPROVER_ONLY + STOPPERS)
def test_actions_refuse_viewers_and_anonymous(action: str, rollout_id: int, anonymous: Any, viewer: Any) -> None:
    url = f"/api/v1/rollouts/{rollout_id}/{action}"
    assert anonymous.post(url, {}, format="json").status_code == 401
    refused = viewer.api().post(url, {}, format="json")
    assert refused.status_code == 403
    assert Rollout.objects.get(pk=rollout_id).version == 1


@pytest.mark.parametrize("action", MANAGER_ONLY)
def test_moving_traffic_forward_refuses_approvers(action: str, rollout_id: int, approver: Any) -> None:
    assert approver.api().post(f"/api/v1/rollouts/{rollout_id}/{action}", {}, format="json").status_code == 403
    assert Rollout.objects.get(pk=rollout_id).state == "draft"


@pytest.mark.parametrize("action", APPROVER_ONLY)
def test_approving_refuses_release_managers(action: str, rollout_id: int, owner: Any) -> None:
    assert owner.api().post(f"/api/v1/rollouts/{rollout_id}/{action}", {}, format="json").status_code == 403


@pytest.mark.parametrize("action", STOPPERS)
def test_stopping_harm_is_open_to_approvers(action: str, owner: Any, approver: Any, versions: None) -> None:
    rollout_id = create(owner, start="true").json()["id"]
    assert act(approver, rollout_id, action).status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/rollouts", "/api/v1/rollouts/validate"])
def test_creating_and_validating_refuse_viewers_and_approvers(path: str, viewer: Any, approver: Any, anonymous: Any, versions: None) -> None:
    body = json.dumps(canary_plan())
    assert anonymous.post(path, body, content_type="application/json").status_code == 401
    assert viewer.api().post(path, body, content_type="application/json").status_code == 403
    assert approver.api().post(path, body, content_type="application/json").status_code == 403
    assert not Rollout.objects.exists()


def test_the_schema_documents_every_rollout_endpoint(client: Any) -> None:
    schema = yaml.safe_load(client.get("/api/schema/").content)
    paths = schema["paths"]
    for path in ("/api/v1/rollouts", "/api/v1/rollouts/validate", "/api/v1/rollouts/{rollout_id}",
                 "/api/v1/rollouts/{rollout_id}/events", "/api/v1/rollouts/{rollout_id}/series", "/api/v1/events"):  # fmt: skip
        assert path in paths
    for action in MANAGER_ONLY + APPROVER_ONLY + STOPPERS:
        assert f"/api/v1/rollouts/{{rollout_id}}/{action}" in paths
    create_body = paths["/api/v1/rollouts"]["post"]["requestBody"]["content"]
    assert set(create_body) == {"application/json", "application/yaml"}
    assert "steps" in create_body["application/json"]["schema"]["properties"]


def test_a_rollout_the_platform_created_reads_with_no_creator(viewer: Any, versions: None) -> None:
    from rollouts.actors import SYSTEM
    from rollouts.services import rollout_create

    rollout = rollout_create(plan=canary_plan(), actor=SYSTEM, start_when_ready=True).rollout
    body = viewer.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert (body["created_by"], body["start_when_ready"], body["state"]) == (None, True, "draft")
    assert body["actions"] == []  # a viewer may do nothing
