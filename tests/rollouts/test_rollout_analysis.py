"""The analysis loop deciding on synthetic request records written the way the gateway writes them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from rollouts.analysis import rollout_analyse, rollout_look
from rollouts.models import Notification, Rollout
from rollouts.services import rollout_advance, rollout_approve, rollout_create
from serving.selectors import alias_get
from tests.rollouts.helpers import (
    both_arms,
    canary_plan,
    engines_down,
    fresh,
    kinds,
    look,
    quick_plan,
    records,
    shadow_pairs,
    step_back,
    version,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions() -> None:
    version("adder-v1")
    version("adder-v2")


def started(owner: Any, **overrides: Any) -> Rollout:
    return rollout_create(plan=canary_plan(**overrides), actor=owner.user, start=True).rollout


def quick(owner: Any, **overrides: Any) -> Rollout:
    return rollout_create(plan=quick_plan(**overrides), actor=owner.user, start=True).rollout


def test_an_a_a_canary_holds_until_its_minimums_then_advances_once_shown_safe(owner: Any, versions: None) -> None:
    rollout = quick(owner, steps=[
        {"weight": 0.1, "min_duration_s": 60, "min_candidate_requests": 50},
        {"weight": 0.5, "min_duration_s": 60, "min_candidate_requests": 50},
    ])  # fmt: skip
    step_back(rollout, 10)
    both_arms(rollout, total=600, weight=0.1, seed=1, at=timezone.now() - timedelta(seconds=5))

    first = look(rollout)
    assert (first.decision, first.applied) == ("hold", False)
    assert "50/50 candidate requests" in first.reason and "/60 s" in first.reason
    assert first.arms["candidate"]["n"] == 60 and first.arms["baseline"]["n"] == 540
    assert [c["metric"] for c in first.checks] == ["tpot_gmean_ms"]
    assert first.checks[0]["decision"] == "safe" and first.checks[0]["holds"] is False
    assert fresh(rollout).step_index == 0

    step_back(rollout, 61)
    second = look(rollout)
    assert (second.decision, second.applied) == ("advance", True)
    assert "every check shown safe" in second.reason
    rollout = fresh(rollout)
    assert (rollout.state, rollout.step_index) == ("running", 1)
    assert alias_get(name="adder").candidate_weight == 0.5  # type: ignore[union-attr]
    event = rollout.events.order_by("seq").last()
    assert event is not None and (event.kind, event.actor) == ("step_started", "analysis")
    assert event.evidence["arms"]["candidate"]["n"] == 60
    assert event.evidence["checks"][0]["metric"] == "tpot_gmean_ms"

    # The new step's window starts empty: the old step's requests do not count for it.
    third = look(rollout)
    assert (third.decision, third.reason) == ("hold", "the step has just started")
    step_back(rollout, 5)
    fourth = look(rollout)
    assert fourth.decision == "hold" and fourth.arms["candidate"]["n"] == 0


def test_a_tpot_regression_rolls_back_by_itself_with_the_evidence(owner: Any, versions: None) -> None:
    rollout = started(owner, steps=[{"weight": 0.2, "min_duration_s": 600}])
    step_back(rollout, 30)
    both_arms(rollout, total=500, weight=0.2, tpot=(20.0, 2.0), candidate_tpot=(30.0, 3.0), seed=2)

    analysis = look(rollout)
    assert (analysis.decision, analysis.applied) == ("rollback", True)
    assert "tpot_mean_ms" in analysis.reason and "margin 10%" in analysis.reason
    rollout = fresh(rollout)
    assert rollout.state == "rolled_back"
    alias = alias_get(name="adder")
    assert alias is not None and (alias.candidate, alias.candidate_weight) == (None, 0.0)

    event = rollout.events.order_by("seq").last()
    assert event is not None and (event.kind, event.actor, event.to_state) == ("rolled_back", "analysis", "rolled_back")
    tpot = next(c for c in event.evidence["checks"] if c["metric"] == "tpot_mean_ms")
    assert tpot["decision"] == "breach"
    assert 0.4 < tpot["effect"] < 0.6 and tpot["low"] > 0.1
    assert event.evidence["arms"]["candidate"]["tpot_mean_ms"] > event.evidence["arms"]["baseline"]["tpot_mean_ms"]
    # People hear about it: an outbox row for the notification task.
    assert Notification.objects.filter(event=event, status="pending").exists()


def test_a_much_slower_candidate_is_caught_early_despite_heavy_tailed_latencies(owner: Any, versions: None) -> None:
    """Latencies on a shared CPU: mostly fast, now and then very slow (a lognormal with sd 3x its mean)."""
    rollout = started(owner, steps=[{"weight": 0.2, "min_duration_s": 600}])
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=400, model_version=rollout.baseline, seed=60,
            tpot=lambda rng: rng.lognormvariate(2.5, 1.5))  # fmt: skip
    records(rollout, arm="candidate", n=100, model_version=rollout.candidate, seed=61,
            tpot=lambda rng: 10 * rng.lognormvariate(2.5, 1.2))  # fmt: skip
    analysis = look(rollout)
    tpot = analysis.checks[0]
    assert (tpot["metric"], tpot["decision"]) == ("tpot_mean_ms", "breach"), tpot
    assert tpot["effect"] > 3 and tpot["low"] > 0.1 and analysis.decision == "rollback"


def test_an_a_a_with_heavy_tails_does_not_breach(owner: Any, versions: None) -> None:
    rollout = started(owner, steps=[{"weight": 0.2, "min_duration_s": 600}])
    step_back(rollout, 30)
    for arm, n, seed in (("baseline", 2000, 62), ("candidate", 500, 63)):
        records(rollout, arm=arm, n=n, model_version=rollout.baseline, seed=seed, tpot=lambda rng: rng.lognormvariate(2.5, 1.5))
    analysis = look(rollout)
    assert analysis.checks[0]["decision"] != "breach" and analysis.decision == "hold"


def test_an_slo_breach_on_errors_rolls_back(owner: Any, versions: None) -> None:
    rollout = started(owner, slos=["error_rate <= 0.01"], guardrails=[])
    step_back(rollout, 30)
    both_arms(rollout, total=1000, weight=0.1, candidate_error_rate=0.3, seed=3)
    analysis = look(rollout)
    assert analysis.decision == "rollback" and "SLO breached: error_rate <= 0.01" in analysis.reason
    assert fresh(rollout).state == "rolled_back"


def test_a_tail_slo_counts_requests_over_the_threshold(owner: Any, versions: None) -> None:
    rollout = started(owner, slos=["ttft_p99_ms <= 800"], guardrails=[],
                      steps=[{"weight": 0.1, "min_duration_s": 60, "min_candidate_requests": 10_000}])
    step_back(rollout, 30)
    both_arms(rollout, total=1000, weight=0.1, seed=4)  # ttft ~ 100 ms: nobody near 800
    analysis = look(rollout)
    slo = analysis.checks[0]
    assert (slo["name"], slo["estimate"], analysis.decision) == ("ttft_p99_ms <= 800", 0.0, "hold")
    assert slo["decision"] != "breach"
    # Another 100 candidate requests at 1.5 s: half of the candidate's requests over 800 ms, not 1 %.
    records(rollout, arm="candidate", n=100, ttft=(1500.0, 50.0), model_version=rollout.candidate)
    analysis = look(rollout)
    assert analysis.decision == "rollback" and analysis.checks[0]["decision"] == "breach"
    assert analysis.checks[0]["estimate"] == 0.5 and analysis.checks[0]["low"] > 0.01


def test_a_sample_ratio_mismatch_is_flagged_and_blocks_advancing(owner: Any, versions: None) -> None:
    rollout = started(owner)
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=700, model_version=rollout.baseline, seed=5)
    records(rollout, arm="candidate", n=300, model_version=rollout.candidate, seed=6)  # configured: 10 %

    analysis = look(rollout)
    assert analysis.srm is not None and analysis.srm["mismatch"] is True and analysis.srm["counts"] == [700, 300]
    assert analysis.decision == "hold" and "sample ratio mismatch" in analysis.reason
    assert fresh(rollout).step_index == 0


def test_an_approval_step_waits_for_a_person(owner: Any, approver: Any, versions: None) -> None:
    rollout = quick(owner, steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}])
    step_back(rollout, 61)
    both_arms(rollout, total=600, weight=0.1, seed=7)
    assert look(rollout).decision == "await_approval"
    rollout = fresh(rollout)
    assert rollout.state == "awaiting_approval"
    assert alias_get(name="adder").candidate_weight == 0.1  # type: ignore[union-attr]
    waiting = rollout.events.order_by("seq").last()
    assert waiting is not None and waiting.kind == "awaiting_approval"
    assert Notification.objects.filter(event=waiting).exists()

    again = look(rollout)
    assert (again.decision, again.reason) == ("hold", "waiting for an approval")
    rollout_approve(rollout=rollout, actor=approver.user)
    assert fresh(rollout).step_index == 1
    # The approval records the evidence the approver saw: the latest look, read rather than measured again.
    approved = fresh(rollout).events.get(kind="approved")
    assert approved.evidence["arms"] == again.arms and again.arms["candidate"]["n"] == 60
    assert approved.evidence["latest_analysis"]["checks"] == again.checks


def test_the_last_step_promotes_the_candidate(owner: Any, versions: None) -> None:
    rollout = quick(owner, steps=[{"weight": 0.5}], bake_s=0)
    step_back(rollout, 61)
    both_arms(rollout, total=200, weight=0.5, seed=8)
    assert look(rollout).decision == "promote"
    assert fresh(rollout).state == "promoted"
    assert alias_get(name="adder").baseline.label == "adder-v2"  # type: ignore[union-attr]


def test_a_candidate_without_a_ready_engine_rolls_back_after_the_grace_period(owner: Any, versions: None) -> None:
    rollout = started(owner, engine_grace_s=30)
    engines_down(rollout.candidate)
    first = look(rollout)
    assert first.decision == "hold"
    assert fresh(rollout).candidate_unready_since is not None
    Rollout.objects.filter(pk=rollout.pk).update(candidate_unready_since=timezone.now() - timedelta(seconds=31))
    second = look(rollout)
    assert second.decision == "rollback" and "adder-v2 has had no ready engine for 3" in second.reason
    assert fresh(rollout).state == "rolled_back"


def test_an_engine_back_in_time_clears_the_grace_clock(owner: Any, versions: None) -> None:
    rollout = started(owner, engine_grace_s=30)
    engines_down(rollout.candidate)
    look(rollout)
    version("adder-v2")  # its engine is ready again
    look(rollout)
    assert fresh(rollout).candidate_unready_since is None


def test_a_baseline_with_every_engine_down_pauses_the_rollout(owner: Any, versions: None) -> None:
    rollout = started(owner, engine_grace_s=0)
    engines_down(rollout.baseline)
    analysis = look(rollout)
    assert analysis.decision == "pause" and "baseline adder-v1" in analysis.reason
    rollout = fresh(rollout)
    assert (rollout.state, rollout.paused_from) == ("paused", "running")


def test_a_stale_decision_is_never_applied_twice(owner: Any, versions: None) -> None:
    """Two workers that read the same version both decide to advance; only the first applies."""
    from rollouts.analysis.apply import _apply

    rollout = quick(owner)
    step_back(rollout, 61)
    both_arms(rollout, total=1000, weight=0.1, seed=9)
    snapshot = fresh(rollout)
    first, _ = rollout_look(rollout=snapshot)
    second, _ = rollout_look(rollout=snapshot)
    assert first.decision == second.decision == "advance"

    assert _apply(snapshot, first) is True
    from config.errors import Conflict

    with pytest.raises(Conflict, match="expected version"):
        _apply(snapshot, second)
    assert kinds(fresh(rollout)).count("step_started") == 1
    assert fresh(rollout).step_index == 1


def test_a_look_that_finds_the_lease_taken_does_nothing(owner: Any, versions: None) -> None:
    """A worker that died mid-analysis holds the lease until it runs out; meanwhile nobody else acts."""
    rollout = quick(owner)
    step_back(rollout, 61)
    both_arms(rollout, total=1000, weight=0.1, seed=10)
    Rollout.objects.filter(pk=rollout.pk).update(analysis_lease_until=timezone.now() + timedelta(seconds=30))
    assert rollout_analyse(rollout_id=rollout.pk) is None
    assert fresh(rollout).step_index == 0
    Rollout.objects.filter(pk=rollout.pk).update(analysis_lease_until=timezone.now() - timedelta(seconds=1))
    assert look(rollout).decision == "advance"
    assert rollout_analyse(rollout_id=rollout.pk) is not None  # the lease was released after the look
    assert kinds(fresh(rollout)).count("step_started") == 1


def test_a_terminal_rollout_is_not_analysed(owner: Any, versions: None) -> None:
    rollout = started(owner)
    step_back(rollout, 30)
    both_arms(rollout, total=500, weight=0.1, candidate_error_rate=0.5, seed=11)
    assert look(rollout).decision == "rollback"
    assert rollout_analyse(rollout_id=rollout.pk) is None
    assert kinds(fresh(rollout)).count("rolled_back") == 1


def test_a_shadow_rollout_compares_the_candidates_shadow_replies(owner: Any, versions: None) -> None:
    plan = canary_plan(strategy="shadow", steps=None, shadow={"rate": 0.5}, guardrails=[{"metric": "tpot_mean_ms", "margin": "10%"}])
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    alias = alias_get(name="adder")
    assert alias is not None and (alias.candidate_weight, alias.shadow_rate) == (0.0, 0.5)
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=300, model_version=rollout.baseline, seed=12)
    shadow_pairs(rollout, n=150, tpot=(35.0, 3.0), seed=13)
    analysis = look(rollout)
    assert analysis.arms["candidate"]["source"] == "shadow" and analysis.arms["candidate"]["n"] == 150
    assert analysis.decision == "rollback" and "tpot_mean_ms" in analysis.reason
    (check,) = [c for c in analysis.checks if c["type"] == "guardrail" and c["metric"] == "tpot_mean_ms"]
    assert check["test"].startswith("paired shadow requests: ratio of means")
    assert check["n"] == [150, 150] and 0.6 < check["effect"] < 0.9 and check["low"] > 0.1


def test_shadow_latency_is_compared_with_the_baseline_asked_beside_it(owner: Any, versions: None) -> None:
    # The gateway's baseline records say 20 ms TPOT, but on the mirror worker, at the same moments, the
    # baseline took 34 ms too: the candidate's 35 ms is no regression, and no breach is called.
    plan = canary_plan(strategy="shadow", steps=None, shadow={"rate": 0.5}, guardrails=[{"metric": "tpot_gmean_ms", "margin": "10%"}])
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=300, model_version=rollout.baseline, seed=12)
    shadow_pairs(rollout, n=150, tpot=(35.0, 3.0), baseline_tpot=(34.0, 3.0), seed=13)
    analysis = look(rollout)
    (check,) = [c for c in analysis.checks if c["type"] == "guardrail" and c["metric"] == "tpot_gmean_ms"]
    assert check["test"].startswith("paired shadow requests: ratio of geometric means")
    assert check["decision"] != "breach" and analysis.decision != "rollback"
    assert check["low"] < 0.1 < check["high"] or check["decision"] == "safe"


def test_a_blue_green_warms_up_on_shadow_traffic_then_switches_all_but_the_holdout(owner: Any, versions: None) -> None:
    plan = {
        "alias": "adder", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "blue_green",
        "blue_green": {"shadow_rate": 1.0, "warmup_s": 60, "rollback_window_s": 60},
        "guardrails": [{"metric": "tpot_gmean_ms", "margin": "10%"}],
    }  # fmt: skip
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    step_back(rollout, 61)
    records(rollout, arm="baseline", n=150, model_version=rollout.baseline, seed=14)
    shadow_pairs(rollout, n=150, seed=15)
    assert look(rollout).decision == "advance"
    # The switch keeps 5 % of sessions on the baseline: its rollback window compares the two.
    assert alias_get(name="adder").candidate_weight == 0.95  # type: ignore[union-attr]
    rollout = fresh(rollout)
    step_back(rollout, 61)
    assert look(rollout).decision == "hold"  # no data yet: the window is not shown safe
    both_arms(rollout, total=1000, weight=0.95, seed=16)
    analysis = look(rollout)
    assert analysis.decision == "promote", analysis.reason
    rollout = fresh(rollout)
    assert rollout.state == "baking" and alias_get(name="adder").candidate_weight == 0.95  # type: ignore[union-attr]


def test_evidence_is_carried_across_steps_and_counts_sessions(
    owner: Any, versions: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guardrail at 50 % starts from what the 10 % step measured: both steps are strata of one comparison
    (`steps` says which), sessions are its units, and the SRM counts sessions, not requests."""
    # Records written between the step changes of this test are in their steps: no settling time to wait.
    monkeypatch.setattr("rollouts.analysis.checks.ROUTE_SETTLE", timedelta(0))
    rollout = quick(owner, steps=[{"weight": 0.1}, {"weight": 0.5}])
    # Sticky users: 40 sessions of 15 requests each on the baseline, 4 of 15 on the candidate.
    records(rollout, arm="baseline", n=600, model_version=rollout.baseline, seed=70, sessions=40)
    records(rollout, arm="candidate", n=60, model_version=rollout.candidate, seed=71, sessions=4)
    rollout_advance(rollout=rollout, actor=owner.user, reason="test")
    both_arms(rollout, total=400, weight=0.5, seed=72)
    step_back(rollout, 30)

    analysis = look(rollout)
    tpot = next(c for c in analysis.checks if c["metric"] == "tpot_gmean_ms")
    assert tpot["steps"] == [0, 1] and tpot["n"] == [600 + 200, 60 + 200]
    # alpha 0.05 for the one guardrail; its breach side has half, beside its check on the bake alone (rollouts.plans.alpha)
    assert tpot["sessions"][1] <= 4 + 200 and tpot["scale"] == "log" and (tpot["alpha"], tpot["breach_alpha"]) == (0.05, 0.025)
    assert analysis.arms["candidate"]["n"] == 200  # the arms shown are the current step's
    assert analysis.srm is not None and analysis.srm["unit"] == "sessions at first exposure"
    assert sum(analysis.srm["counts"]) == analysis.arms["baseline"]["exposed"] + analysis.arms["candidate"]["exposed"]
    assert {"min_n", "more_unit"} <= set(tpot) and (tpot["decision"] != "undecided" or tpot["more_n"] is not None)
