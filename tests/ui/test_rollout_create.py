"""Creating a rollout from the form or a pasted plan: the plan validator's errors beside their fields, the
estimate before starting, a draft that starts only when someone presses Start."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.urls import reverse

from rollouts.models import Rollout
from tests.ui.conftest import logged_in

pytestmark = pytest.mark.django_db

URL = "/rollouts/new"


def form_data(**overrides: str) -> dict[str, str]:
    data = {
        "mode": "form", "alias": "adder", "name": "v2 canary", "baseline": "adder-v1", "candidate": "adder-v2",
        "strategy": "canary", "guardrails": "tpot_mean_ms 10%\nerror_rate 0.01", "slos": "ttft_p99_ms <= 800",
        "step_0_weight": "10%", "step_0_min_duration_s": "60", "step_0_min_candidate_requests": "",
        "step_1_weight": "50%", "step_1_min_duration_s": "120", "step_1_min_candidate_requests": "3000",
        "step_1_requires_approval": "on",
    }  # fmt: skip
    data.update(overrides)
    return data


def errors_of(html: str, field_id: str) -> str:
    found = re.search(rf'<ul class="errorlist" id="{field_id}_errors">(.*?)</ul>', html, re.S)
    return found.group(1) if found else ""


def test_the_form_is_for_release_managers(viewer: Any, versions: None) -> None:
    assert logged_in(viewer).get(URL).status_code == 403
    assert logged_in(viewer).post(URL, form_data(intent="create")).status_code == 403
    assert not Rollout.objects.exists()


def test_validation_errors_are_shown_beside_their_fields(owner: Any, versions: None) -> None:
    client = logged_in(owner)
    data = form_data(step_1_weight="5%", guardrails="tpot_p99_ms 20\nerror_rate 0.01", alpha="2")
    response = client.post(URL, {**data, "intent": "create"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "weights must increase (the step before has 0.1)" in errors_of(html, "id_step_1_weight")
    assert "line 1: tpot_p99_ms is compared as a ratio of the arms" in errors_of(html, "id_guardrails")
    assert "must be a number above 0 and at most 0.5" in errors_of(html, "id_alpha")
    assert 'aria-invalid="true"' in html
    assert "The plan has 3 problems" in html
    assert 'value="5%"' in html  # what was typed stays in the form

    html = client.post(URL, {**form_data(step_0_min_duration_s="soon"), "intent": "create"}).content.decode()
    assert "must be a whole number" in errors_of(html, "id_step_0_min_duration_s")
    assert 'value="soon"' in html
    assert not Rollout.objects.exists()


def test_database_facts_are_checked_by_the_same_validator(owner: Any, versions: None) -> None:
    html = (
        logged_in(owner)
        .post(URL, {**form_data(candidate="", baseline="adder-v1"), "intent": "check"})
        .content.decode()
    )
    assert "required: a model version label" in errors_of(html, "id_candidate")
    # A candidate that is not registered: the choice list refuses nothing, the validator names the field.
    html = logged_in(owner).post(URL, {**form_data(candidate="adder-v9"), "intent": "check"}).content.decode()
    assert "no model version &#x27;adder-v9&#x27; is registered" in errors_of(html, "id_candidate")


def test_checking_a_valid_plan_shows_the_estimate_per_step_and_creates_nothing(
    owner: Any, versions: None
) -> None:
    response = logged_in(owner).post(URL, {**form_data(), "intent": "check"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "The plan is valid. Requests each step needs" in html
    estimate = html[html.index('class="stack estimate"') :]
    assert estimate.count('<td data-label="Step">') == 2
    assert (
        "tpot_mean_ms at most 10% worse:" in estimate and "(assumed coefficient of variation 0.5)" in estimate
    )
    # The normalised plan, every default written out: a step's minimum left blank is its floor.
    floor = re.search(r"min_candidate_requests: (\d+)", html)
    assert floor is not None and 1000 < int(floor.group(1)) < 3000, html
    assert not Rollout.objects.exists()


def test_creating_makes_a_draft_whose_page_shows_the_estimate_and_a_start_button(
    owner: Any, versions: None
) -> None:
    client = logged_in(owner)
    response = client.post(URL, {**form_data(), "intent": "create"})
    rollout = Rollout.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse(
        "rollout-detail", args=[rollout.pk]
    )
    assert (rollout.state, rollout.created_by_id, len(rollout.steps)) == ("draft", owner.user.pk, 2)
    assert rollout.plan["steps"][1] == {
        "weight": 0.5, "shadow_rate": 0.0, "min_duration_s": 120, "min_candidate_requests": 3000, "requires_approval": True,
    }  # fmt: skip
    assert rollout.plan["slos"] == [{"metric": "ttft_p99_ms", "op": "<=", "threshold": 800.0}]
    page = client.get(response["Location"]).content.decode()
    assert "Before you start: requests each step needs" in page
    assert 'data-open-dialog="dialog-start"' in page
    assert "The rollout starts now: step 1 of 2: 10 % of the users of adder go to adder-v2." in page
    assert rollout.events.get().kind == "created"


def test_a_pasted_yaml_plan_is_validated_and_created(owner: Any, versions: None) -> None:
    client = logged_in(owner)
    plan = "alias: adder\nbaseline: adder-v1\ncandidate: adder-v2\nstrategy: canary\nsteps:\n  - weight: 0.2\n  - weight: 0.1\n"
    response = client.post(URL, {"mode": "paste", "plan": plan, "intent": "create"})
    assert response.status_code == 400
    assert "steps[1].weight: weights must increase" in response.content.decode()
    broken = client.post(URL, {"mode": "paste", "plan": "alias: [adder", "intent": "check"})
    assert broken.status_code == 400 and "not valid YAML" in broken.content.decode()
    json_plan = '{"alias": "adder", "candidate": "adder-v2", "baseline": "adder-v1", "strategy": "canary", "steps": [{"weight": 0.2}]}'
    created = client.post(URL, {"mode": "paste", "plan": json_plan, "intent": "create"})
    assert created.status_code == 302
    assert Rollout.objects.get().steps[0]["weight"] == 0.2


def test_an_alias_with_a_live_rollout_is_refused_beside_the_alias(owner: Any, canary: Rollout) -> None:
    response = logged_in(owner).post(URL, {**form_data(), "intent": "create"})
    assert response.status_code == 409
    assert "already has a live rollout" in errors_of(response.content.decode(), "id_alias")
    assert Rollout.objects.count() == 1


def test_the_start_button_starts_the_draft(owner: Any, versions: None) -> None:
    client = logged_in(owner)
    client.post(URL, {**form_data(), "intent": "create"})
    rollout = Rollout.objects.get()
    response = client.post(
        reverse("rollout-action", args=[rollout.pk, "start"]), {"reason": "go", "expected_version": rollout.version},
        follow=True,
    )
    assert "Start: done. The rollout is now running." in response.content.decode()
    rollout.refresh_from_db()
    assert (rollout.state, rollout.step_index) == ("running", 0)


def test_the_form_sets_the_approvals_and_says_what_is_wrong_beside_them(owner: Any, versions: None) -> None:
    client = logged_in(owner)
    html = client.post(URL, {**form_data(approvals_required="0", approval_ttl_s="soon"), "intent": "create"}).content.decode()
    assert "must be from 1 to 20, got 0" in html and "must be a whole number" in html
    assert not Rollout.objects.exists()
    client.post(URL, {**form_data(approvals_required="2", approval_ttl_s="3600"), "intent": "create"})
    rollout = Rollout.objects.get()
    assert (rollout.plan["approvals_required"], rollout.plan["approval_ttl_s"]) == (2, 3600)


def test_the_form_sets_on_inconclusive_and_the_bake_and_names_a_bad_one_beside_its_field(
    owner: Any, versions: None
) -> None:
    client = logged_in(owner)
    bad = client.post(URL, {**form_data(holdout="70%", bake_s="10"), "intent": "check"}).content.decode()
    assert "at most 0.5" in errors_of(bad, "id_holdout")
    assert "0 (no bake) or at least 60 s" in errors_of(bad, "id_bake_s")
    low = client.post(URL, {**form_data(step_0_min_duration_s="0"), "intent": "check"}).content.decode()
    assert "at least 60 s" in errors_of(low, "id_step_0_min_duration_s")
    response = client.post(URL, {**form_data(on_inconclusive="rollback", holdout="10%", bake_s="300"), "intent": "create"})
    assert response.status_code == 302
    plan = Rollout.objects.get().plan
    assert (plan["on_inconclusive"], plan["holdout"], plan["bake_s"]) == ("rollback", 0.1, 300)
