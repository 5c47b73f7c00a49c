"""Every page fits a phone's width and a laptop's, and the actions are reachable with the keyboard alone.
Screenshots of each page at both widths go to var/screenshots/pages/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evals.services import eval_suite_create
from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout
from rollouts.services import rollout_create
from serving.models import EngineWorker
from tests.browser.conftest import LAPTOP, PHONE
from tests.browser.test_rollout_in_browser import login
from tests.rollouts.helpers import both_arms, canary_plan, step_back, version

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SUITE = '{"id": "a", "prompt": "12+30=", "reference": "42", "tags": ["no-carry"]}\n{"id": "b", "prompt": "19+23=", "reference": "42", "tags": ["carry"]}\n'


def _world(owner: Any) -> dict[str, str]:
    version("adder-v1")
    version("adder-v2")
    canary = rollout_create(plan=canary_plan(), actor=owner.user, start=True).rollout
    step_back(canary, 61)
    both_arms(canary, total=400, weight=0.1, seed=31)
    rollout_analyse(rollout_id=canary.pk)
    version("chat-v1")
    version("chat-v2")
    ab = rollout_create(plan={
        "alias": "chat", "baseline": "chat-v1", "candidate": "chat-v2", "strategy": "ab", "primary_metric": "tpot_mean_ms",
        "ab": {"weight": 0.5, "min_duration_s": 3600},
    }, actor=owner.user, start=True).rollout  # fmt: skip
    step_back(ab, 61)
    both_arms(ab, total=300, weight=0.5, seed=32, candidate_tpot=(19.0, 2.0))
    rollout_analyse(rollout_id=ab.pk)
    suite = eval_suite_create(name="sums", jsonl_data=SUITE)
    engine = EngineWorker.objects.filter(model_version__name="adder").order_by("id").first()
    assert engine is not None
    EngineWorker.objects.filter(pk=engine.pk).update(
        restarts=1, last_health_ok=True, log_tail="INFO Started server process\nINFO Application startup complete.\n" * 5,
        metrics={"vllm:num_requests_running": 2.0, "vllm:num_requests_waiting": 0.0, "vllm:kv_cache_usage_perc": 0.12},
    )  # fmt: skip
    return {
        "dashboard": "/", "rollout": f"/rollouts/{canary.pk}", "new-rollout": "/rollouts/new",
        "new-rollout-paste": "/rollouts/new?mode=paste", "audit": "/audit", "models": "/models",
        "model": f"/models/{canary.candidate_id}", "engines": "/engines", "engine": f"/engines/{engine.pk}",
        "evals": "/evals", "suite": f"/evals/suites/{suite.pk}", "runs": "/evals/runs", "experiments": "/experiments",
        "experiment": f"/experiments/{ab.pk}",
    }  # fmt: skip


def test_every_page_fits_a_phone_and_a_laptop(
    browser: Any, live_server: Any, owner: Any, screenshots: Path
) -> None:
    pages = _world(owner)
    folder = screenshots / "pages"
    folder.mkdir(exist_ok=True)
    page = login(browser, live_server.url, owner)
    too_wide = {}
    for viewport, label in ((PHONE, "phone"), (LAPTOP, "laptop")):
        page.set_viewport_size(viewport)
        for name, path in pages.items():
            page.goto(path)
            page.wait_for_load_state("networkidle")
            width = page.evaluate("() => document.documentElement.scrollWidth")
            if width > viewport["width"]:
                too_wide[f"{name} ({label})"] = width
            page.screenshot(path=str(folder / f"{name}-{label}.png"), full_page=True)
    assert too_wide == {}, f"pages wider than the screen: {too_wide}"
    page.context.close()


def test_the_actions_are_reachable_with_the_keyboard(browser: Any, live_server: Any, owner: Any) -> None:
    from playwright.sync_api import expect

    version("adder-v1")
    version("adder-v2")
    rollout = rollout_create(plan=canary_plan(), actor=owner.user, start=True).rollout
    page = login(browser, live_server.url, owner)
    page.goto(f"/rollouts/{rollout.pk}")
    focused = ""
    for _ in range(60):
        page.keyboard.press("Tab")
        focused = page.evaluate("() => document.activeElement && document.activeElement.id")
        if focused == "action-pause":
            break
    assert focused == "action-pause", "Tab never reached the Pause button"
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused button shows no focus ring"
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("The split stays where it is")
    assert page.evaluate("() => document.activeElement.id") == "reason-pause"
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert page.evaluate("() => document.activeElement.id") == "action-pause"
    assert Rollout.objects.get(pk=rollout.pk).state == "running"  # Escape changed nothing

    page.keyboard.press("Enter")
    page.keyboard.type("checking something")
    page.keyboard.press("Tab")  # Cancel
    page.keyboard.press("Tab")  # Pause
    page.keyboard.press("Enter")
    expect(page.locator(".messages")).to_contain_text("Pause: done")
    paused = Rollout.objects.get(pk=rollout.pk)
    assert paused.state == "paused" and paused.events.order_by("-seq").first().reason == "checking something"  # type: ignore[union-attr]
    page.context.close()
