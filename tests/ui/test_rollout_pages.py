"""The rollout pages with Django's test client: what each role sees, the actions and their refusals, live
updates, and the audit log."""

from __future__ import annotations

import csv
import io
import re
import zoneinfo
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from rollouts import services
from rollouts.actors import SYSTEM
from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout, RolloutEvent
from rollouts.plans import plan_from_stored
from rollouts.plans.alpha import alpha_split
from tests.conftest import Member
from tests.rollouts.helpers import both_arms, step_back
from tests.ui.conftest import awaiting, logged_in

pytestmark = pytest.mark.django_db

ACTION_BUTTON = re.compile(r'data-open-dialog="dialog-(\w+)"')


def buttons(html: str) -> list[str]:
    return ACTION_BUTTON.findall(html)


def status_html(client: Client, rollout: Rollout) -> str:
    return client.get(reverse("rollout-status", args=[rollout.pk])).content.decode()


def state_of(rollout: Rollout) -> str:
    return Rollout.objects.get(pk=rollout.pk).state


# --- what each role sees ------------------------------------------------------------------------------


def test_the_dashboard_lists_the_live_canary_with_its_step_split_and_slo_status(
    viewer: Any, canary: Rollout
) -> None:
    html = logged_in(viewer).get(reverse("dashboard")).content.decode()
    assert f'href="/rollouts/{canary.pk}"' in html
    assert "adder-v1 → <strong>adder-v2</strong>" in html
    assert "step 1 of 2" in html and "10 % candidate" in html
    # TPOT is already within its margin; the error rate cannot be told apart yet: amber, naming that check.
    assert (
        'health-amber"><span class="dot" aria-hidden="true"></span><span class="health-word">undecided'
        in html
    )
    assert '<span class="health-driver">error_rate at most 0.01 worse</span>' in html
    assert "New rollout" not in html  # a viewer cannot create one


def test_the_dashboard_reads_the_latest_stored_look_and_never_the_request_records(
    viewer: Any, canary: Rollout
) -> None:
    client = logged_in(viewer)
    with CaptureQueriesContext(connection) as queries:
        html = client.get(reverse("dashboard")).content.decode()
    assert "undecided" in html  # the stored look's health
    read = " ".join(q["sql"].lower() for q in queries.captured_queries)
    assert "rollouts_rolloutanalysis" in read
    assert "serving_requestrecord" not in read and "serving_shadowpair" not in read


def test_pending_approvals_come_first_on_the_dashboard(viewer: Any, canary: Rollout, owner: Any) -> None:
    from rollouts.services import rollout_create
    from tests.rollouts.helpers import version

    version("chat-v1")
    version("chat-v2")
    newer = rollout_create(
        plan={"alias": "chat", "baseline": "chat-v1", "candidate": "chat-v2", "strategy": "canary", "steps": [{"weight": 0.2}]},
        actor=owner.user, start=True,
    ).rollout  # fmt: skip
    awaiting(canary)
    html = logged_in(viewer).get(reverse("dashboard")).content.decode()
    assert "Waiting for an approval" in html
    assert "0 of 1 approval for step 2 of 2; 1 more from role approver (nobody with that role can approve it now)" in html
    table = html[html.index('class="stack rollouts-table"') :]
    assert table.index(f"/rollouts/{canary.pk}") < table.index(f"/rollouts/{newer.pk}")


def test_a_viewer_sees_the_evidence_but_no_action_buttons(viewer: Any, canary: Rollout) -> None:
    client = logged_in(viewer)
    page = client.get(reverse("rollout-detail", args=[canary.pk])).content.decode()
    assert "Guardrails and SLOs" in page and "tpot_mean_ms at most 10% worse" in page
    assert "Timeline" in page and "Started" in page
    assert buttons(page) == [] and "<dialog" not in page


def test_a_release_manager_gets_the_buttons_their_role_allows_each_saying_what_happens(
    owner: Any, canary: Rollout
) -> None:
    html = status_html(logged_in(owner), canary)
    assert buttons(html) == ["pause", "advance", "promote", "rollback", "abort"]
    assert "Every user of adder goes back to adder-v1 within a second" in html
    assert "Step 1 ends now, without waiting for its minimums; step 2 needs an approval" in html


def test_only_another_approver_is_offered_the_approval(owner: Any, approver: Any, canary: Rollout) -> None:
    rollout = awaiting(canary)
    assert "approve" not in buttons(status_html(logged_in(owner), rollout))  # four-eyes: the creator
    html = status_html(logged_in(approver), rollout)
    assert buttons(html) == ["pause", "approve", "reject", "rollback"]
    assert "Approve step 2…" in html
    assert "You approve step 2 of 2: 50 % of the users of adder go to adder-v2" in html
    assert 'name="step_index" value="1"' in html


# --- acting ---------------------------------------------------------------------------------------------


def seen(rollout: Rollout) -> str:
    """The version a freshly loaded page would post."""
    return str(Rollout.objects.get(pk=rollout.pk).version)


def test_an_approver_approves_through_the_page(approver: Any, canary: Rollout) -> None:
    rollout = awaiting(canary)
    client = logged_in(approver)
    response = client.post(
        reverse("rollout-action", args=[rollout.pk, "approve"]),
        {"reason": "looks fine", "step_index": "1", "expected_version": seen(rollout)},
        follow=True,
    )
    assert response.status_code == 200
    assert "Approve: done. The rollout is now running." in response.content.decode()
    fresh = Rollout.objects.get(pk=rollout.pk)
    assert (fresh.state, fresh.step_index) == ("running", 1)
    event = RolloutEvent.objects.filter(rollout=rollout).order_by("-seq").first()
    assert event is not None and (event.kind, event.actor, event.via, event.reason) == (
        "approved",
        "approver",
        "ui",
        "looks fine",
    )


def test_a_service_refusal_is_shown_as_a_message(approver: Any, owner: Any, canary: Rollout) -> None:
    rollout = awaiting(canary)
    page_version = seen(rollout)
    logged_in(approver).post(
        reverse("rollout-action", args=[rollout.pk, "approve"]), {"step_index": "1", "expected_version": page_version}
    )
    # A second approval of the same step (a stale page): 409 from the service, said on the page.
    response = logged_in(approver).post(
        reverse("rollout-action", args=[rollout.pk, "approve"]), {"step_index": "1", "expected_version": page_version},
        follow=True,
    )  # fmt: skip
    assert "Could not approve: step 2 was already approved by approver" in response.content.decode()
    # A form without the version it was made from does nothing.
    response = logged_in(owner).post(reverse("rollout-action", args=[rollout.pk, "pause"]), follow=True)
    assert "Could not pause: the form did not say which version of the rollout you saw" in response.content.decode()
    assert state_of(rollout) == "running"
    # And a state conflict: resuming a rollout that is not paused.
    response = logged_in(owner).post(
        reverse("rollout-action", args=[rollout.pk, "resume"]), {"expected_version": seen(rollout)}, follow=True
    )
    assert "Could not resume: cannot resume rollout" in response.content.decode()
    assert "expected state paused, found running" in response.content.decode()


def test_a_click_on_a_page_the_rollout_has_moved_on_from_is_refused(owner: Any, canary: Rollout) -> None:
    client = logged_in(owner)
    shown = re.search(r'name="expected_version" value="(\d+)"', status_html(client, canary))
    assert shown is not None and int(shown.group(1)) == canary.version
    # Meanwhile a colleague pauses and resumes it (to look at something): the click that was made on what
    # the page showed before is refused, though the state is running again.
    services.rollout_pause(rollout=canary.pk, actor=SYSTEM, reason="a look")
    services.rollout_resume(rollout=canary.pk, actor=SYSTEM, reason="fine")
    response = client.post(reverse("rollout-action", args=[canary.pk, "advance"]),
                           {"expected_version": shown.group(1)}, follow=True)  # fmt: skip
    assert (f"Could not advance now: rollout {canary.pk} changed since it was read: expected version "
            f"{canary.version}, found {canary.version + 2}") in response.content.decode()
    fresh = Rollout.objects.get(pk=canary.pk)
    assert (fresh.state, fresh.step_index, fresh.version) == ("running", canary.step_index, canary.version + 2)


def test_the_creator_cannot_approve_their_own_rollout_even_by_posting(owner: Any, canary: Rollout) -> None:
    """The owner is a release manager, not an approver: the role check refuses before the four-eyes rule."""
    rollout = awaiting(canary)
    response = logged_in(owner).post(
        reverse("rollout-action", args=[rollout.pk, "approve"]), {"step_index": "1"}
    )
    assert response.status_code == 403
    assert state_of(rollout) == "awaiting_approval"


def test_a_viewer_posting_an_action_is_refused(viewer: Any, canary: Rollout) -> None:
    client = logged_in(viewer)
    for action in ("pause", "rollback", "abort", "approve", "advance"):
        response = client.post(reverse("rollout-action", args=[canary.pk, action]), {"reason": "x"})
        assert response.status_code == 403, action
    assert state_of(canary) == "running"


def test_an_anonymous_post_is_refused(client: Client, canary: Rollout) -> None:
    assert client.post(reverse("rollout-action", args=[canary.pk, "rollback"])).status_code == 403
    assert state_of(canary) == "running"


def test_a_forged_post_without_the_csrf_token_is_refused(owner: Any, canary: Rollout) -> None:
    client = logged_in(owner, enforce_csrf_checks=True)
    response = client.post(reverse("rollout-action", args=[canary.pk, "rollback"]), {"reason": "forged"})
    assert response.status_code == 403
    assert "security token" in response.content.decode()
    assert state_of(canary) == "running"
    # The same person with the page's token is let through: the refusal was the token's.
    page = client.get(reverse("rollout-detail", args=[canary.pk])).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    response = client.post(
        reverse("rollout-action", args=[canary.pk, "rollback"]),
        {"reason": "real", "csrfmiddlewaretoken": token.group(1), "expected_version": seen(canary)},
    )
    assert response.status_code == 302 and state_of(canary) == "rolled_back"


def test_an_unknown_action_is_not_found(owner: Any, canary: Rollout) -> None:
    assert logged_in(owner).post(f"/rollouts/{canary.pk}/explode").status_code == 404


# --- live updates -----------------------------------------------------------------------------------------


def test_a_poll_gets_204_until_something_changes_then_the_new_partial(viewer: Any, canary: Rollout) -> None:
    client = logged_in(viewer)
    url = reverse("rollout-status", args=[canary.pk])
    first = client.get(url)
    assert first.status_code == 200
    digest = re.search(r'data-live-digest="(\w+)"', first.content.decode())
    assert digest is not None
    assert client.get(url, {"h": digest.group(1)}).status_code == 204

    awaiting(canary)  # the step passes: the rollout now waits for an approval
    changed = client.get(url, {"h": digest.group(1)})
    assert changed.status_code == 200
    assert "awaiting approval" in changed.content.decode()
    # The partial a poll gets is the one the page embeds.
    page = client.get(reverse("rollout-detail", args=[canary.pk])).content.decode()
    assert changed.content.decode() in page


def test_the_series_endpoint_gives_the_looks_for_the_charts(viewer: Any, canary: Rollout) -> None:
    client = logged_in(viewer)
    looks = client.get(reverse("rollout-series", args=[canary.pk])).json()["looks"]
    assert len(looks) == 1
    look = looks[0]
    assert look["step"] == 1 and look["arms"]["candidate"]["n"] == 30
    assert set(look["checks"]) == {"tpot_mean_ms at most 10% worse", "error_rate at most 0.01 worse"}
    later = client.get(reverse("rollout-series", args=[canary.pk]), {"since": look["t"]}).json()["looks"]
    assert later == []
    assert client.get(reverse("rollout-series", args=[canary.pk]), {"since": "yesterday"}).status_code == 400


def test_a_rollback_shows_the_red_guardrail_and_the_reason_in_the_timeline(
    viewer: Any, canary: Rollout
) -> None:
    step_back(canary, 60)
    both_arms(canary, total=500, weight=0.1, seed=10, candidate_tpot=(40.0, 3.0))
    analysis = rollout_analyse(rollout_id=canary.pk)
    assert analysis is not None and analysis.decision == "rollback"
    client = logged_in(viewer)
    status = status_html(client, canary)
    assert "rolled back" in status and "health-red" in status
    red = status[status.index('class="check check-red"') :]
    assert "tpot_mean_ms at most 10% worse" in red[:400] and "breach" in red[:1200]
    assert "beyond the margin of 10.0" in status
    history = client.get(reverse("rollout-history", args=[canary.pk])).content.decode()
    first = history[history.index('class="tl-item') :]
    assert "Rolled back" in first[:300] and "guardrail breached: tpot_mean_ms" in first[:1500]


def test_times_are_shown_in_the_browsers_time_zone(viewer: Any, canary: Rollout) -> None:
    client = logged_in(viewer)
    client.cookies["tz"] = "America/Sao_Paulo"
    event = RolloutEvent.objects.filter(rollout=canary).order_by("seq").first()
    assert event is not None
    local = timezone.localtime(event.created_at, zoneinfo.ZoneInfo("America/Sao_Paulo"))
    html = client.get(reverse("audit-log")).content.decode()
    assert local.strftime("%Y-%m-%d %H:%M:%S") in html
    assert local.isoformat(timespec="seconds")[:19] in html  # the machine-readable datetime too


# --- the audit log --------------------------------------------------------------------------------------


def test_the_audit_log_filters_by_rollout_actor_and_kind_and_exports_csv(
    viewer: Any, approver: Any, canary: Rollout
) -> None:
    rollout = awaiting(canary)
    logged_in(approver).post(
        reverse("rollout-action", args=[rollout.pk, "approve"]),
        {"step_index": "1", "reason": "=cmd()", "expected_version": seen(rollout)},
    )
    client = logged_in(viewer)
    html = client.get(reverse("audit-log"), {"actor": "approver"}).content.decode()
    assert "1 event match" in html and "Approved" in html and "Created" not in html
    html = client.get(reverse("audit-log"), {"kind": "created", "rollout": str(rollout.pk)}).content.decode()
    assert "1 event match" in html
    response = client.get(reverse("audit-log-csv"), {"rollout": "adder"})
    assert response["Content-Type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [r["kind"] for r in rows] == ["approved", "awaiting_approval", "started", "created"]
    approved = rows[0]
    assert (approved["actor"], approved["via"], approved["rollout"]) == ("approver", "ui", str(rollout.pk))
    assert approved["reason"] == "'=cmd()"  # not a formula when opened in a spreadsheet


def test_the_page_shows_who_approved_and_who_is_still_needed_and_asks_again_once_expired(
    owner: Any, approver: Any, versions: None, monkeypatch: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from accounts.roles import Role
    from accounts.services import user_create
    from rollouts.services import rollout_advance, rollout_create
    from tests.rollouts.helpers import canary_plan

    second = user_create(username="second", password="second-password-1", roles=[Role.APPROVER])
    plan = canary_plan(steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}], approvals_required=2,
                       approval_ttl_s=3600)  # fmt: skip
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    rollout = rollout_advance(rollout=rollout, actor=owner.user)
    client = logged_in(approver)
    response = client.post(
        reverse("rollout-action", args=[rollout.pk, "approve"]), {"step_index": "1", "expected_version": seen(rollout)},
        follow=True,
    )  # fmt: skip
    page = response.content.decode()
    assert "Approve: done. The rollout is now awaiting approval. 1 of 2 approvals for step 2 of 2: approver; 1 more " \
           "from role approver (second)." in page  # fmt: skip
    html = status_html(client, rollout)
    assert "Approvals: </span>1 of 2 approvals for step 2 of 2: approver; 1 more from role approver (second)." in html
    assert "May not approve (four-eyes): owner (created the rollout)." in html
    assert "approve" not in buttons(html)  # counted once: no second button for the same person
    assert "approve" in buttons(status_html(logged_in(Member(user=second, token="")), rollout))

    later = timezone.now() + timedelta(hours=2)
    monkeypatch.setattr(timezone, "now", lambda: later)
    html = status_html(logged_in(owner), rollout)
    assert "This request expired at" in html and "request_approval" in buttons(html)
    response = logged_in(owner).post(
        reverse("rollout-action", args=[rollout.pk, "request_approval"]), {"expected_version": seen(rollout)}, follow=True
    )
    assert "Ask again for approval: done. The rollout is now awaiting approval. 0 of 2 approvals for step 2 of 2; 2 " \
           "more from role approver (approver, second)." in response.content.decode()  # fmt: skip


def test_the_status_names_every_check_alpha_is_split_over_and_those_checked_on_the_bake_alone(
    viewer: Any, canary: Rollout
) -> None:
    split = alpha_split(plan_from_stored(canary.plan))
    assert split.bake_alone, "the canary fixture bakes against a holdout: its guardrails are also checked alone"
    html = status_html(logged_in(viewer), canary)
    line = html[html.index("Error control:") :]
    line = line[: line.index("</p>")]
    assert f"({'; '.join(split.checks)})" in line
    assert f"; and on the bake alone: {'; '.join(split.bake_alone)}." in line
    assert all("(bake alone)" in name for name in split.bake_alone)
