"""The dead-man's switch of the analysis (rollouts.watchdog): a live rollout whose analysis has stopped is
paused at its weights (or rolled back, per plan), with an alert in Slack's path and on /metrics, and the
page says so; the first look that completes after the analysis returns lifts the pause. (The same with a
real worker, beat and web server: tests/faults/test_analysis_stopped.py.)"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from rollouts import notifications
from rollouts.models import Notification, Rollout, RolloutEvent
from rollouts.notifications import dispatcher_register
from rollouts.plans import PlanInvalid, plan_normalise
from rollouts.services import rollout_create, rollout_pause
from rollouts.tasks import analyse_rollout
from rollouts.watchdog import rollout_staleness, rollouts_watchdog_pass, stale_after_s
from serving.models import Alias
from tests.rollouts.helpers import canary_plan, kinds, version

pytestmark = pytest.mark.django_db

STEPS = [
    {"weight": 0.1, "min_duration_s": 300, "min_candidate_requests": 1100},
    {"weight": 0.5, "min_duration_s": 300, "min_candidate_requests": 2000},
]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    monkeypatch.setattr(notifications, "_DISPATCHERS", {})
    calls: list[tuple[str, str, int]] = []
    dispatcher_register("test", lambda event: calls.append((event.kind, event.actor, event.rollout_id)))
    return calls


def running(owner: Any, **plan: Any) -> Rollout:
    version("adder-v1")
    version("adder-v2")
    return rollout_create(plan=canary_plan(steps=STEPS, **plan), actor=owner.user, start=True).rollout


def analysed_ago(rollout: Rollout, seconds: float) -> datetime:
    """The rollout's last look (and last transition) `seconds` ago; returns now."""
    now = timezone.now()
    Rollout.objects.filter(pk=rollout.pk).update(
        last_analysed_at=now - timedelta(seconds=seconds), updated_at=now - timedelta(seconds=seconds)
    )
    return now


def metric(client: Client, name: str) -> float:
    for line in client.get("/metrics").content.decode().splitlines():
        head, _, value = line.rpartition(" ")
        if head == name:
            return float(value)
    raise AssertionError(f"{name} is not in /metrics")


def test_a_rollout_with_no_look_for_three_intervals_is_paused_and_the_next_look_resumes_it_where_it_was(
    owner: Any, viewer: Any, sent: list[tuple[str, str, int]]
) -> None:
    rollout = running(owner)
    before = Rollout.objects.get(pk=rollout.pk)
    limit = stale_after_s()
    assert limit == 3 * 10.0

    # Within the limit: nothing happens.
    now = analysed_ago(rollout, limit - 1)
    report = rollouts_watchdog_pass(now=now)
    assert report.stale == [] and Rollout.objects.get(pk=rollout.pk).state == "running"

    now = analysed_ago(rollout, limit + 5)
    report = rollouts_watchdog_pass(now=now)
    assert report.paused == [rollout.pk] and report.stale == [rollout.pk]
    paused = Rollout.objects.get(pk=rollout.pk)
    assert (paused.state, paused.paused_from, paused.step_index) == ("paused", "running", 0)
    assert paused.step_started_at == before.step_started_at
    # Paused at its weights: the candidate keeps its 10 %, no more and no less.
    assert Alias.objects.get(name="adder").candidate_weight == pytest.approx(0.1)
    event = paused.events.order_by("-seq").first()
    assert event is not None and (event.kind, event.actor, event.via) == ("paused", "watchdog", "system")
    assert "no analysis for 35 s" in event.reason and "paused at 10%" in event.reason
    assert event.evidence["stale_analysis"]["limit_s"] == limit
    # The alert went out from the watchdog itself, with no Celery worker to send it.
    assert sent == [("paused", "watchdog", rollout.pk)]
    assert Notification.objects.get(event=event).status == "sent"

    client = Client()
    client.force_login(viewer.user)
    assert metric(client, "platform_rollouts_stale_analysis") == 1.0
    assert metric(client, "platform_rollouts_analysis_age_seconds") >= limit
    assert metric(client, 'platform_rollouts_stale_actions_total{action="pause"}') >= 1.0
    page = client.get(reverse("rollout-detail", args=[rollout.pk])).content.decode()
    assert 'id="stale-analysis"' in page and "paused by the watchdog" in page
    api = Client(HTTP_AUTHORIZATION=f"Bearer {viewer.token}").get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert api["analysis_staleness"]["paused_by_watchdog"] is True and api["analysis_staleness"]["stale"] is True

    # A second pass (or a second web process) does nothing more.
    assert rollouts_watchdog_pass(now=now + timedelta(seconds=1)).paused == []

    # The workers are back: the first look that completes lifts the pause, in the same step.
    assert analyse_rollout(rollout.pk).endswith("resumed after the stale-analysis pause")
    resumed = Rollout.objects.get(pk=rollout.pk)
    assert (resumed.state, resumed.step_index, resumed.step_started_at) == ("running", 0, before.step_started_at)
    assert kinds(resumed)[-2:] == ["paused", "resumed"]
    assert resumed.events.order_by("-seq").first().actor == "analysis"  # type: ignore[union-attr]
    page = client.get(reverse("rollout-detail", args=[rollout.pk])).content.decode()
    assert 'id="stale-analysis"' not in page
    assert rollouts_watchdog_pass().stale == []
    assert metric(client, "platform_rollouts_stale_analysis") == 0.0


def test_a_pause_by_a_person_is_not_lifted_by_the_analysis(owner: Any) -> None:
    rollout = running(owner)
    rollout_pause(rollout=rollout, actor=owner.user, reason="looking into it")
    analyse_rollout(rollout.pk)
    assert Rollout.objects.get(pk=rollout.pk).state == "paused"
    # Stale while paused by a person: reported, but the plan's default leaves the pause as it is.
    now = analysed_ago(rollout, stale_after_s() + 1)
    report = rollouts_watchdog_pass(now=now)
    assert report.stale == [rollout.pk] and report.paused == report.rolled_back == []
    staleness = rollout_staleness(rollout=Rollout.objects.get(pk=rollout.pk), now=now)
    assert staleness is not None and staleness.stale and not staleness.paused_by_watchdog


def test_on_stale_analysis_rollback_sends_every_user_back_to_the_baseline(owner: Any, sent: Any) -> None:
    rollout = running(owner, on_stale_analysis="rollback")
    assert rollout.plan["on_stale_analysis"] == "rollback"
    report = rollouts_watchdog_pass(now=analysed_ago(rollout, stale_after_s() + 1))
    assert report.rolled_back == [rollout.pk]
    ended = Rollout.objects.get(pk=rollout.pk)
    assert ended.state == "rolled_back" and "rolled back (the plan's on_stale_analysis)" in ended.state_reason
    alias = Alias.objects.get(name="adder")
    assert (alias.candidate_id, alias.candidate_weight) == (None, 0.0)
    assert sent == [("rolled_back", "watchdog", rollout.pk)]


def test_a_watchdog_that_just_started_gives_each_rollout_three_intervals_of_its_own(owner: Any) -> None:
    rollout = running(owner)
    now = analysed_ago(rollout, 3600)  # the whole platform was down for an hour
    report = rollouts_watchdog_pass(now=now, watching_since=now - timedelta(seconds=5))
    assert report.stale == [rollout.pk] and report.paused == []
    report = rollouts_watchdog_pass(now=now + timedelta(seconds=stale_after_s()), watching_since=now - timedelta(seconds=5))
    assert report.paused == [rollout.pk]


def test_a_gating_rollout_and_a_draft_are_not_paused(owner: Any) -> None:
    version("adder-v1")
    version("adder-v2")
    draft = rollout_create(plan=canary_plan(steps=STEPS), actor=owner.user).rollout
    Rollout.objects.filter(pk=draft.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    assert rollout_staleness(rollout=Rollout.objects.get(pk=draft.pk)) is None
    assert rollouts_watchdog_pass().stale == []
    assert Rollout.objects.get(pk=draft.pk).state == "draft" and not RolloutEvent.objects.filter(kind="paused").exists()


def test_a_look_that_fails_does_not_count_as_one(owner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from rollouts.analysis import apply

    rollout = running(owner)
    long_ago = timezone.now() - timedelta(hours=1)
    Rollout.objects.filter(pk=rollout.pk).update(last_analysed_at=long_ago)

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("a bug in the look")

    monkeypatch.setattr(apply, "rollout_look", broken)
    with pytest.raises(RuntimeError):
        analyse_rollout(rollout.pk)
    after = Rollout.objects.get(pk=rollout.pk)
    assert after.last_analysed_at == long_ago and after.analysis_lease_until is None


def test_on_stale_analysis_is_pause_or_rollback() -> None:
    plan = canary_plan(steps=STEPS)
    assert plan_normalise(plan).to_dict()["on_stale_analysis"] == "pause"
    with pytest.raises(PlanInvalid) as raised:
        plan_normalise({**plan, "on_stale_analysis": "ignore"})
    assert list(raised.value.errors) == ["on_stale_analysis"]
    assert "pause, rollback" in raised.value.errors["on_stale_analysis"][0]


def test_a_stale_rollouts_live_status_does_not_change_at_every_poll(owner: Any, viewer: Any) -> None:
    """A running age in the status region would swap it at every poll: an open Pause dialog would vanish."""
    import re
    import time

    rollout = running(owner)
    analysed_ago(rollout, stale_after_s() + 5)
    client = Client()
    client.force_login(viewer.user)
    url = reverse("rollout-status", args=[rollout.pk])
    first = client.get(url).content.decode()
    assert "Analysis stale: </span>no analysis since" in first and "pauses it at its current weights" in first
    time.sleep(1.1)
    digest = re.search(r'data-live-digest="(\w+)"', first)
    assert digest is not None
    assert client.get(url, {"h": digest.group(1)}).status_code == 204


@pytest.mark.parametrize("on_stale", ["pause", "rollback"])
def test_a_baking_promotion_holds_without_looks_or_rolls_back_per_plan(owner: Any, on_stale: str) -> None:
    from rollouts.services import rollout_promote

    rollout = running(owner, on_stale_analysis=on_stale)
    rollout_promote(rollout=rollout, actor=owner.user, reason="looks good")
    assert Rollout.objects.get(pk=rollout.pk).state == "baking"
    report = rollouts_watchdog_pass(now=analysed_ago(rollout, stale_after_s() + 1))
    assert report.stale == [rollout.pk]
    after = Rollout.objects.get(pk=rollout.pk)
    if on_stale == "pause":
        # It cannot be paused, and needs not be: the bake ends only on a look.
        assert report.paused == report.rolled_back == [] and after.state == "baking"
    else:
        assert report.rolled_back == [rollout.pk] and after.state == "rolled_back"
        assert Alias.objects.get(name="adder").baseline.label == "adder-v1"


def test_the_number_of_intervals_is_a_setting(owner: Any, settings: Any) -> None:
    settings.ROLLOUT_STALE_INTERVALS = 6
    assert stale_after_s() == 60.0
    rollout = running(owner)
    assert rollouts_watchdog_pass(now=analysed_ago(rollout, 45)).paused == []
    assert rollouts_watchdog_pass(now=analysed_ago(rollout, 61)).paused == [rollout.pk]
    assert "the limit is 6 intervals, 60 s" in Rollout.objects.get(pk=rollout.pk).state_reason


def test_a_look_under_way_is_not_a_stopped_analysis(owner: Any, viewer: Any) -> None:
    """The last look completed long ago but a look holds the lease (one that builds a window's rollup from a day
    of records: minutes at 100 million records a day): the watchdog leaves the rollout alone, the page and the API say a
    look is running. Once the lease has run out (its worker died), the watchdog pauses as before."""
    rollout = running(owner)
    now = analysed_ago(rollout, stale_after_s() + 120)
    Rollout.objects.filter(pk=rollout.pk).update(analysis_lease_until=now + timedelta(seconds=40))
    report = rollouts_watchdog_pass(now=now)
    assert report.stale == report.paused == [] and Rollout.objects.get(pk=rollout.pk).state == "running"
    staleness = rollout_staleness(rollout=Rollout.objects.get(pk=rollout.pk), now=now)
    assert staleness is not None and (staleness.stale, staleness.looking) == (False, True)
    client = Client()
    client.force_login(viewer.user)
    page = client.get(reverse("rollout-detail", args=[rollout.pk])).content.decode()
    assert 'id="look-running"' in page and 'id="stale-analysis"' not in page
    api = Client(HTTP_AUTHORIZATION=f"Bearer {viewer.token}").get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert api["analysis_staleness"]["looking"] is True and api["analysis_staleness"]["stale"] is False

    report = rollouts_watchdog_pass(now=now + timedelta(seconds=41))
    assert report.paused == [rollout.pk] and Rollout.objects.get(pk=rollout.pk).state == "paused"


@pytest.mark.django_db(transaction=True)
def test_a_long_look_renews_its_lease_and_keeps_the_watchdog_and_other_looks_off(
    owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look that runs three times as long as its lease: the lease is renewed while it runs, so a second
    worker's claim is refused and a watchdog pass does nothing, though the last completed look is an hour
    old; after it, the lease is let go and the look counts as one."""
    import time

    from rollouts.analysis import apply
    from rollouts.services import rollout_analysis_claim

    rollout = running(owner)
    analysed_ago(rollout, 3600)
    lease_s = 0.6
    monkeypatch.setattr(apply, "LEASE_S", lease_s)
    real_look = apply.rollout_look
    seen: dict[str, Any] = {}

    def long_look(**kwargs: Any) -> Any:
        claimed = Rollout.objects.get(pk=rollout.pk).analysis_lease_until
        time.sleep(3 * lease_s)
        seen["renewed"] = Rollout.objects.get(pk=rollout.pk).analysis_lease_until > claimed
        seen["claim"] = rollout_analysis_claim(rollout_id=rollout.pk, lease_s=lease_s)
        seen["watchdog"] = rollouts_watchdog_pass()
        return real_look(**kwargs)

    monkeypatch.setattr(apply, "rollout_look", long_look)
    assert analyse_rollout(rollout.pk) == "hold"
    assert seen["renewed"] and seen["claim"] is None
    assert seen["watchdog"].stale == seen["watchdog"].paused == []
    after = Rollout.objects.get(pk=rollout.pk)
    assert after.state == "running" and after.analysis_lease_until is None
    assert after.last_analysed_at is not None and timezone.now() - after.last_analysed_at < timedelta(seconds=30)


@pytest.mark.django_db(transaction=True)
def test_a_look_past_the_longest_a_look_may_take_lets_its_lease_run_out(
    owner: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """A look stuck past ROLLOUT_LOOK_MAX_S stops renewing: its lease runs out, another worker may claim the
    rollout and the watchdog acts on it."""
    import time

    from rollouts.analysis import apply

    rollout = running(owner)
    analysed_ago(rollout, 3600)
    lease_s = 0.6
    monkeypatch.setattr(apply, "LEASE_S", lease_s)
    settings.ROLLOUT_LOOK_MAX_S = 0.5
    seen: dict[str, Any] = {}

    def stuck_look(**kwargs: Any) -> Any:
        time.sleep(0.5 + 2 * lease_s)
        seen["watchdog"] = rollouts_watchdog_pass()
        raise RuntimeError("stuck, then failed")

    monkeypatch.setattr(apply, "rollout_look", stuck_look)
    with pytest.raises(RuntimeError):
        analyse_rollout(rollout.pk)
    assert seen["watchdog"].paused == [rollout.pk]


def test_a_look_that_lost_its_lease_leaves_the_next_holders_lease_alone(owner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A look whose lease ran out (stuck past ROLLOUT_LOOK_MAX_S) and was claimed by another look: when the
    first one ends, it lets go of nothing but its own lease, so no third look starts beside the second."""
    from rollouts.analysis import apply

    rollout = running(owner)
    theirs = timezone.now() + timedelta(seconds=45)
    real_look = apply.rollout_look

    def overtaken(**kwargs: Any) -> Any:
        Rollout.objects.filter(pk=rollout.pk).update(analysis_lease_until=theirs)  # another worker's claim
        return real_look(**kwargs)

    monkeypatch.setattr(apply, "rollout_look", overtaken)
    assert analyse_rollout(rollout.pk) == "hold"
    after = Rollout.objects.get(pk=rollout.pk)
    assert after.analysis_lease_until == theirs and after.last_analysed_at is not None
