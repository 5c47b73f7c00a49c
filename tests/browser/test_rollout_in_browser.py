"""A release manager's rollout in a real browser: create a canary, watch it advance without reloading,
have it approved, see it roll back by itself on a TPOT regression with the timeline and the red
guardrail saying why; a viewer sees no buttons and a forged POST is refused.

The analysis is driven from the test: synthetic request records (written the way the gateway writes
them) and `rollout_analyse` called directly, so no engine is needed."""

from __future__ import annotations

import re
import time
import zoneinfo
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout, RolloutEvent
from tests.browser.conftest import LAPTOP, PHONE
from tests.rollouts.helpers import both_arms, step_back, version

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Long enough for a 2 s poll on a busy 2-core machine; a wait, never a measurement.
LIVE = 20_000
BROWSER_TZ = "Asia/Tokyo"


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def login(browser: Any, base_url: str, member: Any, *, viewport: dict[str, int] = LAPTOP) -> Any:
    context = browser.new_context(
        viewport=viewport, timezone_id=BROWSER_TZ, locale="en-GB", base_url=base_url
    )
    page = context.new_page()
    page.goto("/login/")
    page.get_by_label("Username").fill(member.user.username)
    page.get_by_label("Password").fill(f"{member.user.username}-password-1")
    page.get_by_role("button", name="Log in").click()
    _expect()(page.get_by_role("heading", name="Rollouts", exact=True)).to_be_visible()
    return page


def analyse(rollout: Rollout) -> str:
    look = rollout_analyse(rollout_id=rollout.pk)
    assert look is not None
    return look.decision


def fresh(rollout: Rollout) -> Rollout:
    return Rollout.objects.select_related("baseline", "candidate").get(pk=rollout.pk)


def into_window(rollout: Rollout) -> Rollout:
    """Wait until the current step's analysis window has begun (2 s after the step started, see
    rollouts.analysis.ROUTE_SETTLE), so that records written now count for this step and the previous
    step's do not."""
    rollout = fresh(rollout)
    assert rollout.step_started_at is not None
    wait = (rollout.step_started_at + timedelta(seconds=2.5) - timezone.now()).total_seconds()
    if wait > 0:
        time.sleep(wait)
    return rollout


def shoot(page: Any, path: Path, viewport: dict[str, int]) -> None:
    page.set_viewport_size(viewport)
    page.wait_for_timeout(300)  # let the charts redraw at the new width
    page.screenshot(path=str(path), full_page=True)


def fill_canary(page: Any) -> None:
    page.locator("#id_alias").fill("adder")
    page.locator("#id_name").fill("adder v2 canary")
    page.locator("#id_baseline").select_option("adder-v1")
    page.locator("#id_candidate").select_option("adder-v2")
    page.locator("#id_strategy").select_option("canary")
    rows = [
        # Minimum requests left blank: each step's floor.
        ("10%", "60", "", False),
        ("25%", "60", "", False),
        ("50%", "60", "", True),
        ("100%", "60", "", False),
    ]
    for i, (weight, duration, requests, approval) in enumerate(rows):
        page.locator(f"#id_step_{i}_weight").fill(weight)
        page.locator(f"#id_step_{i}_min_duration_s").fill(duration)
        page.locator(f"#id_step_{i}_min_candidate_requests").fill(requests)
        page.locator(f"#id_step_{i}_requires_approval").set_checked(approval)
    page.locator("#id_guardrails").fill("tpot_mean_ms 10%")


def test_a_canary_advances_live_is_approved_and_rolls_back_on_a_tpot_regression(
    browser: Any, live_server: Any, owner: Any, approver: Any, viewer: Any, screenshots: Path
) -> None:
    expect = _expect()
    version("adder-v1")
    version("adder-v2")

    # --- the release manager creates a canary, first checking the estimate ---------------------------
    page = login(browser, live_server.url, owner)
    page.get_by_role("link", name="New rollout").click()
    fill_canary(page)
    page.locator("#id_step_1_weight").fill("5%")  # weights must increase: the one validator says so
    page.get_by_role("button", name="Check and estimate").click()
    expect(page.locator("#id_step_1_weight_errors")).to_contain_text("weights must increase")
    expect(page.get_by_role("alert").first).to_contain_text("1 problem")

    page.locator("#id_step_1_weight").fill("25%")
    page.get_by_role("button", name="Check and estimate").click()
    expect(page.get_by_role("heading", name=re.compile("The plan is valid"))).to_be_visible()
    expect(page.locator("table.estimate tbody tr")).to_have_count(4)
    page.get_by_role("button", name="Create draft").click()

    expect(page.locator("#rollout-status .state")).to_have_text("draft")
    expect(page.get_by_role("heading", name="Before you start: requests each step needs")).to_be_visible()
    page.get_by_role("button", name="Start…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("step 1 of 4: 10 % of the users of adder go to adder-v2")
    dialog.get_by_label("Reason").fill("release 2.0")
    dialog.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator(".messages")).to_contain_text("Start: done")
    expect(page.locator("#rollout-status .state")).to_have_text("running")
    rollout = fresh(Rollout.objects.get(alias_name="adder"))
    assert (rollout.state, rollout.step_index, rollout.created_by_id) == ("running", 0, owner.user.pk)

    # --- it advances while the page is open: no reload --------------------------------------------
    step_back(rollout, 61)
    both_arms(rollout, total=600, weight=0.1, seed=11)
    assert analyse(rollout) == "advance"
    status = page.locator("#rollout-status")
    expect(status).to_contain_text("2 of 4", timeout=LIVE)
    expect(status).to_contain_text("25 % candidate")
    expect(page.locator("#rollout-history .timeline")).to_contain_text("Step started", timeout=LIVE)
    # The charts got the new look on the same poll.
    page.wait_for_function(
        "() => { const c = Chart.getChart(document.querySelector('canvas[data-arm-chart=\"rps\"]'));"
        " return c && c.data.labels.length >= 1; }",
        timeout=LIVE,
    )

    rollout = into_window(rollout)
    both_arms(rollout, total=400, weight=0.25, seed=12)
    step_back(rollout, 61)  # its minimum minute, without waiting it
    assert analyse(rollout) == "await_approval"
    expect(page.locator("#rollout-status .state")).to_have_text("awaiting approval", timeout=LIVE)
    # Four-eyes: the creator is not offered the approval.
    expect(page.get_by_role("button", name=re.compile("^Approve"))).to_have_count(0)

    page.goto("/")
    expect(page.get_by_role("heading", name="Waiting for an approval")).to_be_visible()
    shoot(page, screenshots / "dashboard-laptop.png", LAPTOP)
    shoot(page, screenshots / "dashboard-phone.png", PHONE)
    page.set_viewport_size(LAPTOP)
    page.get_by_role("link", name="adder", exact=True).click()

    # --- an approver approves step 3 ---------------------------------------------------------------
    approver_page = login(browser, live_server.url, approver)
    approver_page.goto(f"/rollouts/{rollout.pk}")
    approver_page.get_by_role("button", name="Approve step 3…").click()
    dialog = approver_page.get_by_role("dialog")
    expect(dialog).to_contain_text("You approve step 3 of 4: 50 % of the users of adder go to adder-v2")
    dialog.get_by_role("button", name="Approve step 3", exact=True).click()
    expect(approver_page.locator(".messages")).to_contain_text("Approve: done")
    expect(approver_page.locator("#rollout-status")).to_contain_text("3 of 4")
    expect(page.locator("#rollout-status")).to_contain_text("3 of 4", timeout=LIVE)
    approval = RolloutEvent.objects.filter(rollout=rollout, kind="approved").get()
    assert (approval.actor, approval.via) == ("approver", "ui")

    # --- a TPOT regression: the analysis rolls back by itself ------------------------------------
    rollout = into_window(rollout)
    both_arms(rollout, total=400, weight=0.5, seed=13, tpot=(20.0, 2.0), candidate_tpot=(40.0, 3.0))
    assert analyse(rollout) == "rollback"
    expect(page.locator("#rollout-status .state")).to_have_text("rolled back", timeout=LIVE)
    first_event = page.locator("#rollout-history .tl-item").first
    expect(first_event).to_contain_text("Rolled back")
    expect(first_event).to_contain_text("by analysis")
    expect(first_event).to_contain_text("guardrail breached: tpot_mean_ms")
    red = page.locator("#rollout-status tr.check-red").first
    expect(red).to_contain_text("tpot_mean_ms at most 10% worse")
    expect(red).to_contain_text("breach")
    expect(page.locator("#rollout-status tr.check-explain.check-red").first).to_contain_text(
        "beyond the margin of 10.0 %"
    )
    expect(page.locator("#rollout-status .health")).to_contain_text("tpot_mean_ms")
    # Times are in the browser's zone.
    event = RolloutEvent.objects.filter(rollout=rollout, kind="rolled_back").get()
    local = timezone.localtime(event.created_at, zoneinfo.ZoneInfo(BROWSER_TZ))
    expect(first_event.locator("time")).to_have_text(local.strftime("%b %-d, %H:%M:%S"))
    page.wait_for_function(
        "() => { const c = Chart.getChart(document.querySelector('canvas[data-check-chart^=\"tpot_mean_ms\"]'));"
        " return c && c.data.datasets[2].data.some(v => v !== null && v > 10); }",
        timeout=LIVE,
    )
    shoot(page, screenshots / "rollout-detail-laptop.png", LAPTOP)
    shoot(page, screenshots / "rollout-detail-phone.png", PHONE)
    page.goto("/")
    expect(page.locator(".recent")).to_contain_text("rolled back")
    shoot(page, screenshots / "dashboard-after-rollback-laptop.png", LAPTOP)

    # --- a viewer sees no buttons, and a forged POST is refused ----------------------------------
    viewer_page = login(browser, live_server.url, viewer)
    other = _second_rollout(owner)
    viewer_page.goto(f"/rollouts/{other.pk}")
    expect(viewer_page.locator("#rollout-status .state")).to_have_text("running")
    expect(viewer_page.locator("#rollout-status .actions")).to_have_count(0)
    expect(viewer_page.get_by_role("button", name=re.compile("Pause|Roll back|Abort|Approve"))).to_have_count(
        0
    )
    forged = viewer_page.request.post(f"/rollouts/{other.pk}/rollback", form={"reason": "forged"})
    assert forged.status == 403 and "security token" in forged.text()
    token = next(c["value"] for c in viewer_page.context.cookies() if c["name"] == "csrftoken")
    with_token = viewer_page.request.post(
        f"/rollouts/{other.pk}/rollback", form={"reason": "not my role", "csrfmiddlewaretoken": token},
        headers={"Referer": f"{live_server.url}/rollouts/{other.pk}"},
    )  # fmt: skip
    assert with_token.status == 403
    assert fresh(other).state == "running"

    for context in (page.context, approver_page.context, viewer_page.context):
        context.close()


def _second_rollout(owner: Any) -> Rollout:
    from rollouts.services import rollout_create

    version("chat-v1")
    version("chat-v2")
    plan = {
        "alias": "chat",
        "baseline": "chat-v1",
        "candidate": "chat-v2",
        "strategy": "canary",
        "steps": [{"weight": 0.2}],
    }
    return rollout_create(plan=plan, actor=owner.user, start=True).rollout
