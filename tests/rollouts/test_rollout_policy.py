"""The policy that never ships on silence: a step ends on evidence, its planned sample reached undecided
applies the plan's on_inconclusive, and promotion bakes against a holdout of the baseline.

Traffic is written as the gateway writes it from sticky users (`helpers.sticky_traffic`: heavy-tailed
requests per user, a per-user latency factor, a heavy tail); the analysis is the real one."""

from __future__ import annotations

import html
import io
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from config.errors import Conflict
from rolloutctl.cli import _print_status
from rollouts import selectors
from rollouts.analysis import rollout_analyse
from rollouts.models import Notification, Rollout, RolloutAnalysis
from rollouts.services import rollout_create, rollout_resume, rollout_rollback
from serving.selectors import alias_get
from tests.rollouts.helpers import (
    canary_plan,
    fresh,
    kinds,
    look,
    quick_plan,
    step_back,
    sticky_traffic,
    version,
)
from tests.ui.conftest import logged_in

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions() -> None:
    version("adder-v1")
    version("adder-v2")


def started(owner: Any, plan: dict[str, Any]) -> Rollout:
    return rollout_create(plan=plan, actor=owner.user, start=True).rollout


def test_a_step_whose_checks_are_all_undecided_does_not_advance(owner: Any, versions: None) -> None:
    """The step's minimums are met and nothing breached, but neither guardrail is shown safe: a candidate
    exactly 10 % slower per token against a 10 % margin, and errors at 2 % in both arms against a margin of
    one point. The old policy advanced here ("no breach yet"); this one holds and says what each check needs."""
    rollout = started(owner, canary_plan(guardrails=[
        {"metric": "tpot_gmean_ms", "margin": "10%"}, {"metric": "error_rate", "margin": 0.01},
    ]))  # fmt: skip
    step_back(rollout, 120)
    written = sticky_traffic(rollout, users=3000, weight=0.1, seed=101, tpot_factor=1.10, error_rate=0.02)
    need = int(fresh(rollout).steps[0]["min_candidate_requests"])
    assert written["candidate"] >= need, (written, need)

    analysis = look(rollout)
    assert (analysis.decision, analysis.applied) == ("hold", False), analysis.reason
    guardrails = [c for c in analysis.checks if c["type"] == "guardrail"]
    assert [c["decision"] for c in guardrails] == ["undecided", "undecided"]
    assert all(c["holds"] for c in guardrails)
    assert "held until shown safe by tpot_gmean_ms at most 10% worse" in analysis.reason
    assert "error_rate at most 0.01 worse" in analysis.reason
    assert "of the planned sample (then: pause)" in analysis.reason
    rollout = fresh(rollout)
    assert (rollout.state, rollout.step_index) == ("running", 0)
    assert kinds(rollout) == ["created", "started"]

    # The API, the page and `rolloutctl status` say which checks hold the step and what each still needs.
    detail = owner.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    progress = detail["progress"]
    assert [c["name"] for c in progress["holding"]] == ["tpot_gmean_ms at most 10% worse", "error_rate at most 0.01 worse"]
    assert progress["candidate_n"] == written["candidate"] and progress["planned_n"] == rollout.planned_samples["0"]
    assert progress["on_inconclusive"] == "pause" and progress["bake"] is None
    needs = selectors.rollout_holding_text(progress)
    page = logged_in(owner).get(f"/rollouts/{rollout.pk}").content.decode()
    assert "Held until shown safe by:" in page and all(html.escape(line) in page for line in needs)
    assert f"{written['candidate']} of the step's planned {progress['planned_n']} candidate requests" in page
    assert page.count("holds the step") == 2
    out = io.StringIO()
    _print_status(detail, out)
    text = out.getvalue()
    assert "  held by (not yet shown safe):" in text and all(f"    {line}" in text for line in needs)
    assert f"  planned sample: {written['candidate']}/{progress['planned_n']} candidate requests (reached undecided: pause)" in text


def _reach_the_planned_sample(rollout: Rollout, seed: int) -> RolloutAnalysis:
    """Candidate exactly at the TPOT margin (undecided however long it runs): traffic until the step's
    candidate requests pass its planned sample, looking after each batch, as the beat does."""
    step_back(rollout, 120)
    sticky_traffic(rollout, users=600, weight=0.1, seed=seed, tpot_factor=1.10)
    first = look(rollout)
    planned = int(fresh(rollout).planned_samples["0"])
    assert first.decision == "hold" and f"/{planned} candidate requests of the planned sample" in first.reason, first.reason
    candidate_n = int(first.arms["candidate"]["n"])
    batch = 0
    while candidate_n < planned:
        batch += 1
        assert batch < 40, "the planned sample was never reached"
        sticky_traffic(rollout, users=1500, weight=0.1, seed=seed + batch, tpot_factor=1.10)
        analysis = look(rollout)
        candidate_n = int(analysis.arms["candidate"]["n"])
        if candidate_n < planned:
            assert analysis.decision == "hold", analysis.reason
    return analysis


@pytest.mark.parametrize("rule", ["pause", "advance", "rollback"])
def test_the_planned_sample_reached_undecided_applies_on_inconclusive(
    rule: str, owner: Any, approver: Any, versions: None
) -> None:
    rollout = started(owner, quick_plan(on_inconclusive=rule))
    analysis = _reach_the_planned_sample(rollout, seed=200)
    tpot = next(c for c in analysis.checks if c["metric"] == "tpot_gmean_ms")
    assert tpot["decision"] == "undecided", tpot
    assert "the planned sample" in analysis.reason and "tpot_gmean_ms at most 10% worse undecided" in analysis.reason
    assert f"on_inconclusive: {rule}" in analysis.reason and analysis.applied
    rollout = fresh(rollout)
    event = rollout.events.order_by("seq").last()
    assert event is not None and event.actor == "analysis"
    assert event.evidence["inconclusive"]["rule"] == rule
    assert event.evidence["inconclusive"]["holding"] == ["tpot_gmean_ms at most 10% worse"]
    if rule == "pause":
        assert (rollout.state, rollout.paused_from, event.kind) == ("paused", "running", "paused")
        # A person hears of it as of an approval request (the outbox row of a notable event).
        assert Notification.objects.filter(event=event).exists()
        # Resumed, the step collects another planned sample before the rule applies again.
        rollout_resume(rollout=rollout, actor=owner.user, reason="give it more time")
        again = look(fresh(rollout))
        planned = int(fresh(rollout).planned_samples["0"])
        assert again.decision == "hold" and f"/{2 * planned} candidate requests of the planned sample" in again.reason
    elif rule == "advance":
        assert (rollout.state, rollout.step_index, event.kind) == ("running", 1, "step_started")
        assert alias_get(name="adder").candidate_weight == 0.5  # type: ignore[union-attr]
    else:
        assert (rollout.state, event.kind) == ("rolled_back", "rolled_back")
        alias = alias_get(name="adder")
        assert alias is not None and (alias.candidate, alias.candidate_weight) == (None, 0.0)


def _baking(owner: Any, **plan: Any) -> Rollout:
    """A one-step canary at 50 % shown safe and promoted by the analysis: into its bake."""
    rollout = started(owner, quick_plan(steps=[{"weight": 0.5}], **plan))
    step_back(rollout, 61)
    sticky_traffic(rollout, users=2000, weight=0.5, seed=300)
    analysis = look(rollout)
    assert analysis.decision == "promote", analysis.reason
    return fresh(rollout)


def test_promotion_keeps_a_holdout_and_a_breach_during_the_bake_rolls_back(
    owner: Any, versions: None, routes_settle_at_once: None
) -> None:
    rollout = _baking(owner)
    assert rollout.state == "baking" and rollout.bake_started_at is not None
    alias = alias_get(name="adder")
    assert alias is not None and alias.candidate is not None
    # 5 % of sessions stay on the baseline, still routed for the rollout (its records are its holdout).
    assert (alias.baseline.label, alias.candidate.label, alias.candidate_weight, alias.rollout_id) == (
        "adder-v1", "adder-v2", 0.95, rollout.pk)
    promoted = rollout.events.order_by("seq").last()
    assert promoted is not None and (promoted.kind, promoted.to_state) == ("promoted", "baking")
    bake = owner.api().get(f"/api/v1/rollouts/{rollout.pk}").json()["progress"]["bake"]
    assert (bake["holdout"], bake["bake_s"], bake["holdout_version"]) == (0.05, 600, "adder-v1")
    page = logged_in(owner).get(f"/rollouts/{rollout.pk}").content.decode()
    assert "promoted, baking" in page and "95 % of sessions on adder-v2, 5 % held out on adder-v1" in page

    # The bake compares with the holdout on the same checks: an A/A bake holds.
    sticky_traffic(rollout, users=1500, weight=0.95, seed=301)
    calm = look(rollout)
    assert calm.decision == "hold" and calm.reason.startswith("baking: "), calm.reason
    assert "/600 s with 5% of sessions held out on adder-v1; no breach" in calm.reason
    tpot = next(c for c in calm.checks if c["metric"] == "tpot_gmean_ms")
    assert tpot["steps"] == [0, 1] and tpot["decision"] != "breach"  # the step's and the bake's evidence

    # Then the candidate slows down under full load: the bake catches it and rolls back by itself.
    sticky_traffic(rollout, users=6000, weight=0.95, seed=302, tpot_factor=3.0)
    caught = look(rollout)
    assert (caught.decision, caught.applied) == ("rollback", True), caught.reason
    assert caught.reason.startswith("during the bake: guardrail breached: tpot_gmean_ms")
    rollout = fresh(rollout)
    assert rollout.state == "rolled_back"
    alias = alias_get(name="adder")
    assert alias is not None and (alias.baseline.label, alias.candidate, alias.candidate_weight) == ("adder-v1", None, 0.0)
    assert kinds(rollout)[-2:] == ["promoted", "rolled_back"]


def test_a_regression_that_appears_only_in_the_bake_is_caught_by_the_guardrail_on_the_bake_alone(
    owner: Any, versions: None, routes_settle_at_once: None
) -> None:
    """The step's good evidence dilutes a bake-only regression in the pooled check (its estimate stays under
    the margin); the same guardrail on the bake's evidence alone sees all of it and rolls back."""
    rollout = _baking(owner)
    sticky_traffic(rollout, users=300, weight=0.95, seed=311)
    calm = look(rollout)
    assert calm.decision == "hold", calm.reason
    alone = next(c for c in calm.checks if c["name"] == "tpot_gmean_ms at most 10% worse (bake alone)")
    assert alone["steps"] == [1] and alone["scope"] == "bake alone" and alone["decision"] != "breach"
    # The guardrail's share is the whole alpha, 0.05; this check has half of its breach side, the pooled check the other.
    assert alone["alpha"] == 0.025 and alone["holds"] is False
    pooled = next(c for c in calm.checks if c["name"] == "tpot_gmean_ms at most 10% worse")
    assert (pooled["alpha"], pooled["breach_alpha"]) == (0.05, 0.025)
    detail = owner.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    split = detail["alpha_split"]
    assert split["checks"] == ["tpot_gmean_ms at most 10% worse"] and (split["share"], split["breach_share"]) == (0.05, 0.025)
    assert split["bake_alone"] == ["tpot_gmean_ms at most 10% worse (bake alone)"]
    assert "breach side is split in half between its pooled check and its check on the bake alone" in split["text"]
    assert "tpot_gmean_ms at most 10% worse (bake alone)" in logged_in(owner).get(f"/rollouts/{rollout.pk}").content.decode()

    sticky_traffic(rollout, users=1500, weight=0.95, seed=312, tpot_factor=1.6)
    caught = look(rollout)
    pooled = next(c for c in caught.checks if c["name"] == "tpot_gmean_ms at most 10% worse")
    assert pooled["decision"] != "breach" and pooled["effect"] < 0.1, pooled
    assert (caught.decision, caught.applied) == ("rollback", True), caught.reason
    assert caught.reason.startswith(
        "during the bake: guardrail breached on the bake's evidence alone (tpot_gmean_ms at most 10% worse (bake alone), "
    ), caught.reason
    assert fresh(rollout).state == "rolled_back"


def test_a_bake_with_no_breach_promotes_for_good(owner: Any, versions: None) -> None:
    rollout = _baking(owner, bake_s=300)
    Rollout.objects.filter(pk=rollout.pk).update(bake_started_at=timezone.now() - timedelta(seconds=301))
    sticky_traffic(rollout, users=600, weight=0.95, seed=310)
    done = look(rollout)
    assert (done.decision, done.applied) == ("promote", True), done.reason
    assert done.reason.startswith("the bake passed: 300 s with 5% of sessions held out on adder-v1 and no breach")
    rollout = fresh(rollout)
    assert rollout.state == "promoted" and rollout.ended_at is not None
    alias = alias_get(name="adder")
    assert alias is not None and (alias.baseline.label, alias.candidate, alias.rollout_id) == ("adder-v2", None, None)
    assert kinds(rollout)[-2:] == ["promoted", "baked"]
    assert rollout_analyse(rollout_id=rollout.pk) is None  # no longer watched
    # After its bake a promoted rollout is not rolled back: a 409 that says when the bake ended.
    with pytest.raises(Conflict, match=r"its bake ended at .*can be rolled back only while it bakes") as refused:
        rollout_rollback(rollout=rollout, actor=owner.user, reason="too late")
    assert refused.value.status_code == 409 and fresh(rollout).state == "promoted"


def test_a_promoted_rollout_can_be_rolled_back_while_it_bakes_and_not_after(owner: Any, approver: Any, versions: None) -> None:
    rollout = _baking(owner)
    # Through the API, as on-call would: within the bake, a new route of the same alias, audited.
    response = approver.api().post(
        f"/api/v1/rollouts/{rollout.pk}/rollback", {"reason": "users complain", "expected_version": rollout.version},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["state"] == "rolled_back"
    alias = alias_get(name="adder")
    assert alias is not None and (alias.baseline.label, alias.candidate, alias.rollout_id) == ("adder-v1", None, None)
    event = fresh(rollout).events.order_by("seq").last()
    assert event is not None and (event.kind, event.from_state, event.actor, event.reason) == (
        "rolled_back", "baking", "approver", "users complain")

    # Another rollout whose bake has ended: a rollback is refused, saying why and what to do instead.
    version("adder-v3")
    later = started(owner, quick_plan(candidate="adder-v3", steps=[{"weight": 0.5}], bake_s=0))
    from rollouts.services import rollout_promote

    later = rollout_promote(rollout=later, actor=owner.user, reason="ship it")
    assert later.state == "promoted"
    refused = approver.api().post(
        f"/api/v1/rollouts/{later.pk}/rollback", {"reason": "too late?", "expected_version": later.version}, format="json"
    )
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "with no bake (bake_s: 0)" in detail and "can be rolled back only while it bakes" in detail
    assert "start a new rollout of adder to adder-v1" in detail
    assert fresh(later).state == "promoted" and alias_get(name="adder").baseline.label == "adder-v3"  # type: ignore[union-attr]
    with pytest.raises(Exception, match="can be rolled back only while it bakes"):
        rollout_rollback(rollout=later, actor=owner.user)
