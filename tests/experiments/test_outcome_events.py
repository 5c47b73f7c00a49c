"""Outcome events: validated per item, all or nothing, joined to the arm that served the request."""

from __future__ import annotations

from typing import Any

import pytest

from experiments.models import OutcomeEvent
from experiments.services import outcome_events_resolve, session_hash
from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout
from rollouts.services import rollout_create
from tests.rollouts.helpers import records, step_back, version

pytestmark = pytest.mark.django_db


@pytest.fixture
def rollout(owner: Any) -> Rollout:
    version("adder-v1")
    version("adder-v2")
    plan = {
        "alias": "adder", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "ab",
        "ab": {"weight": 0.5, "min_duration_s": 60, "min_candidate_requests": 100},
        "primary_metric": {"metric": "thumbs_up_rate"}, "guardrails": [],
    }  # fmt: skip
    return rollout_create(plan=plan, actor=owner.user, start=True).rollout


def post(member: Any, events: list[dict[str, Any]]) -> Any:
    return member.api().post("/api/v1/events", {"events": events}, format="json")


def test_events_join_the_arm_of_their_request(owner: Any, rollout: Rollout) -> None:
    served = records(rollout, arm="candidate", n=2, model_version=rollout.candidate)
    response = post(owner, [
        {"request_id": served[0].request_id, "kind": "thumbs", "value": "up", "id": "e1"},
        {"request_id": served[1].request_id, "kind": "success", "value": False},
        {"request_id": "not-recorded-yet", "kind": "value", "value": 12.5, "name": "basket"},
    ])  # fmt: skip
    assert response.status_code == 202, response.json()
    assert response.json() == {"accepted": 3, "duplicates": 0, "resolved": 2}
    thumbs = OutcomeEvent.objects.get(event_id="e1")
    assert (thumbs.value, thumbs.arm, thumbs.rollout_id) == (1.0, "candidate", rollout.pk)
    assert OutcomeEvent.objects.get(kind="success").value == 0.0

    # The late request record lands; the next pass joins its outcome.
    late = records(rollout, arm="baseline", n=1, model_version=rollout.baseline)[0]
    from serving.models import RequestRecord

    RequestRecord.objects.filter(pk=late.pk).update(request_id="not-recorded-yet")
    assert outcome_events_resolve() == 1
    assert OutcomeEvent.objects.get(kind="value").arm == "baseline"


def test_a_session_outcome_joins_the_sessions_latest_request(owner: Any, rollout: Rollout) -> None:
    from serving.models import RequestRecord

    served = records(rollout, arm="candidate", n=1, model_version=rollout.candidate)[0]
    RequestRecord.objects.filter(pk=served.pk).update(session_hash=session_hash("user-42"))
    assert post(owner, [{"session_id": "user-42", "kind": "thumbs", "value": "down"}]).json()["resolved"] == 1
    assert OutcomeEvent.objects.get().arm == "candidate"


def test_a_retried_batch_is_not_counted_twice(owner: Any, rollout: Rollout) -> None:
    batch = [{"request_id": "r1", "kind": "thumbs", "value": "up", "id": "evt-1"}]
    assert post(owner, batch).json()["accepted"] == 1
    assert post(owner, batch).json() == {"accepted": 0, "duplicates": 1, "resolved": 0}
    assert OutcomeEvent.objects.count() == 1


def test_a_bad_item_is_reported_by_index_and_nothing_is_written(owner: Any, rollout: Rollout) -> None:
    response = post(owner, [
        {"request_id": "r1", "kind": "thumbs", "value": "up"},
        {"request_id": "r2", "kind": "thumbs", "value": "sideways"},
        {"kind": "value", "value": 1},
        {"request_id": "r3", "kind": "value", "value": "12"},
        {"request_id": "r4", "kind": "stars", "value": 5},
    ])  # fmt: skip
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert set(errors) == {"events[1].value", "events[2].request_id", "events[3].value", "events[4].kind"}
    assert not OutcomeEvent.objects.exists()


def test_batch_limits_and_shape(owner: Any) -> None:
    assert post(owner, []).status_code == 400
    too_many = [{"request_id": f"r{i}", "kind": "success", "value": True} for i in range(1001)]
    assert post(owner, too_many).json()["errors"] == {"events": ["at most 1000 events per call, got 1001"]}
    assert owner.api().post("/api/v1/events", [1, 2], format="json").status_code == 400


def test_outcome_events_refuse_viewers_and_anonymous(viewer: Any, anonymous: Any) -> None:
    batch = {"events": [{"request_id": "r1", "kind": "thumbs", "value": "up"}]}
    assert anonymous.post("/api/v1/events", batch, format="json").status_code == 401
    assert viewer.api().post("/api/v1/events", batch, format="json").status_code == 403
    assert not OutcomeEvent.objects.exists()


def test_an_ab_test_is_decided_by_its_outcome_metric(owner: Any, rollout: Rollout) -> None:
    step_back(rollout, 61)
    baseline = records(rollout, arm="baseline", n=400, model_version=rollout.baseline, seed=41)
    candidate = records(rollout, arm="candidate", n=400, model_version=rollout.candidate, seed=42)
    # Thumbs up on 50 % of the baseline's answers and 80 % of the candidate's.
    events = [{"request_id": r.request_id, "kind": "thumbs", "value": "up" if i % 2 else "down"} for i, r in enumerate(baseline)]
    events += [{"request_id": r.request_id, "kind": "thumbs", "value": "down" if i % 5 == 0 else "up"} for i, r in enumerate(candidate)]
    assert post(owner, events).json()["resolved"] == 800
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None
    primary = next(c for c in analysis.checks if c["type"] == "primary")
    assert primary["decision"] == "win" and abs(primary["effect"] - 0.3) < 1e-9
    # Promoted into its bake: 5 % of sessions stay on the baseline for the bake period.
    assert analysis.decision == "promote" and Rollout.objects.get(pk=rollout.pk).state == "baking"


def test_the_session_hash_is_the_gateways() -> None:
    """Outcome events name sessions as the application knows them; the join needs the gateway's hash."""
    from types import SimpleNamespace

    from serving.gateway.app import Gateway, GatewayConfig

    gateway_like = SimpleNamespace(config=GatewayConfig.from_settings())
    assert session_hash("user-42") == Gateway._session_hash(gateway_like, "user-42")  # type: ignore[arg-type]


def test_an_application_reports_outcomes_with_its_gateway_key(rollout: Rollout) -> None:
    from rest_framework.test import APIClient

    from serving.services import gateway_key_create, gateway_key_revoke

    issued = gateway_key_create(name="shop-frontend")
    served = records(rollout, arm="candidate", n=1, model_version=rollout.candidate)[0]
    app = APIClient()
    app.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    batch = {"events": [{"request_id": served.request_id, "kind": "thumbs", "value": "up"}]}
    response = app.post("/api/v1/events", batch, format="json")
    assert response.status_code == 202, response.json()
    assert OutcomeEvent.objects.get().arm == "candidate"
    # The key opens only this endpoint, and a revoked key nothing.
    assert app.get("/api/v1/rollouts").status_code in (401, 403)
    gateway_key_revoke(key=issued.key)
    assert app.post("/api/v1/events", batch, format="json").status_code == 401
