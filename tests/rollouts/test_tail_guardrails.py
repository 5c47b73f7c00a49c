"""Tail guardrails ("tpot_p90_ms at most 10 % worse") in a plan and in the look: validated, given their share
of the alpha split, decided on one request per session with the quantile confidence sequences
(experiments.stats.quantiles), shown like the other guardrails, and acted on by the step policy."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from experiments.analysis import first_request_bins
from experiments.stats.quantiles import quantile_tuning_n, tail_min_n
from rollouts.analysis.checks import alpha_split, check_alpha_share, guardrail_breach_share, step_min_sample
from rollouts.plans import plan_from_stored, plan_normalise
from rollouts.services import rollout_create, rollout_promote
from tests.rollouts.helpers import canary_plan, fresh, look, records, shadow_pairs, step_back, version

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions() -> None:
    version("adder-v1")
    version("adder-v2")


TAIL = {"metric": "tpot_p90_ms", "margin": "10%"}


def started(owner: Any, **overrides: Any) -> Any:
    plan = canary_plan(**{"guardrails": [TAIL], "steps": [{"weight": 0.5, "min_duration_s": 600}], **overrides})
    return rollout_create(plan=plan, actor=owner.user, start=True).rollout


def test_a_tail_guardrail_is_a_plan_check_with_its_share_and_floor() -> None:
    plan = plan_normalise(canary_plan(guardrails=[TAIL, {"metric": "error_rate", "margin": 0.01}]))
    (tail, _) = plan.guardrails
    assert (tail.metric, tail.margin, tail.relative, tail.label) == ("tpot_p90_ms", 0.1, True, "tpot_p90_ms at most 10% worse")
    split = alpha_split(plan)
    # Two checks at 0.025 each (0.0125 when the checks on the bake alone had shares of their own): each guardrail
    # is also checked on the bake's evidence alone (the plan bakes with a 5 % holdout), at half of its breach side.
    assert split.checks == ("tpot_p90_ms at most 10% worse", "error_rate at most 0.01 worse") and split.share == 0.025
    assert split.bake_alone == ("tpot_p90_ms at most 10% worse (bake alone)", "error_rate at most 0.01 worse (bake alone)")
    assert split.breach_share == guardrail_breach_share(plan) == 0.0125
    # The step's floor: at least the candidate sessions at which the p90 has an upper bound at all.
    floor = tail_min_n(quantile=0.9, alpha=0.025, tuning_n=quantile_tuning_n(quantile=0.9, alpha=0.025, margin=0.1))
    assert step_min_sample(plan, 0) >= floor


def test_the_sample_is_each_sessions_first_request(owner: Any, versions: None) -> None:
    """A session's later requests never enter: one slow first request and nine fast ones count once, slow."""
    rollout = started(owner)
    now = timezone.now()
    records(rollout, arm="candidate", n=1, tpot=(500.0, 0.0), sessions=["s1"], at=now - timedelta(seconds=5))
    records(rollout, arm="candidate", n=9, tpot=(10.0, 0.0), sessions=["s1"], at=now - timedelta(seconds=3))
    for session in ("s2", "s3", "s4"):
        records(rollout, arm="candidate", n=1, tpot=(10.0, 0.0), sessions=[session], at=now - timedelta(seconds=3))
    bins = first_request_bins(rollout_id=rollout.pk, windows=[(now - timedelta(minutes=1), None)], fields=["tpot_ms"])
    counts = bins["candidate"]["tpot_ms"]
    # Four sessions: s1's slow first request once, and the three others' fast ones.
    slow = max(counts)
    assert sum(counts.values()) == 4 and counts[slow] == 1


def test_a_tail_regression_with_the_mean_almost_unchanged_rolls_back(owner: Any, versions: None) -> None:
    """A fifth of the candidate's requests take four times as long: its p90 is far over the baseline's while
    most requests are as fast. The guardrail breaches on sessions' first requests and the step rolls back."""
    rollout = started(owner)
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=1500, model_version=rollout.baseline, seed=21, sessions=1200)
    records(rollout, arm="candidate", n=1500, model_version=rollout.candidate, seed=22, sessions=1200,
            tpot=lambda rng: rng.gauss(20.0, 2.0) * (4.0 if rng.random() < 0.2 else 1.0))  # fmt: skip
    analysis = look(rollout)
    (check,) = [c for c in analysis.checks if c["metric"] == "tpot_p90_ms"]
    assert check["decision"] == "breach" and check["scale"] == "quantile" and check["test"].startswith("quantile confidence")
    # Sessions, not requests: each arm counts each session once.
    assert check["n"][0] < 1200 and check["n"] == check["sessions"] and check["more_unit"] == "candidate sessions"
    assert check["low"] > 0.1 and check["candidate"] > 2 * check["baseline"]
    assert analysis.decision == "rollback" and "tpot_p90_ms" in analysis.reason and "margin 10%" in analysis.reason
    assert fresh(rollout).state == "rolled_back"


def test_an_a_a_is_shown_safe_and_advances(owner: Any, versions: None) -> None:
    rollout = started(owner, steps=[{"weight": 0.5, "min_duration_s": 60}, {"weight": 0.9}])
    step_back(rollout, 120)
    records(rollout, arm="baseline", n=3000, model_version=rollout.baseline, seed=31)
    records(rollout, arm="candidate", n=3000, model_version=rollout.candidate, seed=32)
    analysis = look(rollout)
    (check,) = [c for c in analysis.checks if c["metric"] == "tpot_p90_ms"]
    assert check["decision"] == "safe", check
    # Its share; its breach side has half, beside its check on the bake alone.
    assert check["low"] < 0 < check["high"] < 0.1 and (check["alpha"], check["breach_alpha"]) == (0.05, 0.025)
    assert check["baseline_bounds"][0] <= check["baseline"] <= check["baseline_bounds"][1]
    assert analysis.decision == "advance"


def test_too_few_sessions_hold_the_step_and_say_how_many(owner: Any, versions: None) -> None:
    rollout = started(owner)
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=20, model_version=rollout.baseline, seed=41)
    records(rollout, arm="candidate", n=20, model_version=rollout.candidate, seed=42)
    analysis = look(rollout)
    (check,) = [c for c in analysis.checks if c["metric"] == "tpot_p90_ms"]
    assert check["decision"] == "undecided" and check["high"] is None
    assert "candidate sessions" in check["reason"] and check["more_n"] and analysis.decision == "hold"


def test_a_shadow_step_compares_both_sides_of_its_pairs(owner: Any, versions: None) -> None:
    rollout = _shadow_rollout(owner)
    shadow_pairs(rollout, n=800, tpot=(40.0, 3.0), baseline_tpot=(20.0, 2.0), seed=51)
    analysis = look(rollout)
    (check,) = [c for c in analysis.checks if c["metric"] == "tpot_p90_ms"]
    # Pairs without a session: each its own unit.
    assert check["decision"] == "breach" and check["unit"] == "first shadow pair of each session"
    assert check["n"] == [800, 800] and check["more_unit"] == "shadow sessions"
    assert analysis.decision == "rollback"


def _shadow_rollout(owner: Any, **overrides: Any) -> Any:
    plan = canary_plan(**{"strategy": "shadow", "steps": None, "shadow": {"rate": 0.5}, "guardrails": [TAIL], **overrides})
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    step_back(rollout, 30)
    return rollout


def _heavy_shadow_user(rollout: Any, *, sessions: bool, slow_ttft: tuple[float, float] = (100.0, 10.0),
                       slow_tpot: tuple[float, float] = (20.0, 2.0)) -> None:  # fmt: skip
    """300 sessions with one pair each, candidate and baseline alike; then one heavy user whose first pair
    is alike too and whose 600 later pairs are slower on the candidate's side. With `sessions` False the
    600 slow pairs come from 600 sessions of one pair each instead. `slow_ttft`, `slow_tpot`: the candidate's
    side of those 600 pairs (by default as the others)."""
    now = timezone.now()
    shadow_pairs(rollout, n=300, seed=81, sessions=[f"u{i}" for i in range(300)], at=now - timedelta(seconds=20))
    shadow_pairs(rollout, n=1, sessions=["heavy"], at=now - timedelta(seconds=20))
    later = ["heavy"] if sessions else [f"v{i}" for i in range(600)]
    shadow_pairs(rollout, n=600, seed=82, sessions=later, at=now - timedelta(seconds=10), ttft=slow_ttft, tpot=slow_tpot)


@pytest.mark.parametrize("heavy", [True, False], ids=["one-heavy-user", "600-users"])
def test_one_heavy_shadow_user_does_not_decide_the_tail_guardrail(owner: Any, versions: None, heavy: bool) -> None:
    """A shadow step where one user sends 600 of its 901 pairs, all four times slower on the candidate: each
    session's first pair is the sample, so the heavy user counts once and the guardrail is not breached.
    The same pairs from 600 users (what a pair-by-pair reading amounts to) breach it."""
    rollout = _shadow_rollout(owner)
    _heavy_shadow_user(rollout, sessions=heavy, slow_tpot=(80.0, 2.0))
    analysis = look(rollout)
    (check,) = [c for c in analysis.checks if c["metric"] == "tpot_p90_ms"]
    if heavy:
        assert check["n"] == [301, 301] and check["sessions"] == [301, 301] and check["decision"] != "breach", check
        assert analysis.decision != "rollback"
    else:
        assert check["n"] == [901, 901] and check["decision"] == "breach"


def test_a_shadow_tail_slo_counts_each_sessions_first_reply(owner: Any, versions: None) -> None:
    """A shadow step's tail SLO on the candidate's replies: 301 sessions' first replies are fast, the heavy
    user's 600 later ones slow. Per reply two thirds would be over the limit; per session none is."""
    rollout = _shadow_rollout(owner, guardrails=[], slos=["ttft_p99_ms <= 800"])
    _heavy_shadow_user(rollout, sessions=True, slow_ttft=(1500.0, 50.0))
    (slo,) = look(rollout).checks
    assert (slo["n"], slo["sessions"], slo["estimate"]) == (301, 301, 0.0) and slo["decision"] != "breach"
    assert (slo["unit"], slo["more_unit"]) == ("first shadow pair of each session", "shadow sessions")


def test_the_planned_sample_counts_candidate_sessions() -> None:
    from experiments.stats.quantiles import tail_sample_size
    from rollouts.planning import plan_sample_sizes

    plan = plan_normalise(canary_plan(guardrails=[TAIL], steps=[{"weight": 0.2}]))
    (step,) = plan_sample_sizes(plan=plan, baseline=None)["steps"]
    (check,) = step["checks"]
    alpha = check_alpha_share(plan)  # 0.05: the one guardrail (its check on the bake alone takes no share)
    tuning = quantile_tuning_n(quantile=0.9, alpha=alpha, margin=0.1)
    expected = tail_sample_size(quantile=0.9, margin=0.1, alpha=alpha, tuning_n=tuning, candidate_share=0.2,
                                power=1.0 - step["miss_per_check"])  # fmt: skip
    assert (check["unit"], check["candidate_n"], check["assumed"]) == ("candidate sessions", expected, {"log_sd": 0.5})
    assert step["candidate_n"] >= expected


def test_a_tail_slo_counts_each_sessions_first_request(owner: Any, versions: None) -> None:
    """A tail SLO on sticky users: 300 candidate sessions, each first request fast, then one heavy user
    whose 200 later requests are all slow. Per request a fifth would be over the limit; per session none is,
    and the SLO counts sessions (the unit its bound is exact for)."""
    rollout = started(owner, guardrails=[], slos=["ttft_p99_ms <= 800"],
                      steps=[{"weight": 0.5, "min_duration_s": 600, "min_candidate_requests": 10_000}])  # fmt: skip
    step_back(rollout, 30)
    now = timezone.now()
    records(rollout, arm="candidate", n=300, model_version=rollout.candidate, seed=61, at=now - timedelta(seconds=20))
    heavy = records(rollout, arm="candidate", n=1, model_version=rollout.candidate, sessions=["heavy"], at=now - timedelta(seconds=20))
    records(rollout, arm="candidate", n=200, model_version=rollout.candidate, sessions=["heavy"], ttft=(1500.0, 50.0),
            at=now - timedelta(seconds=10))  # fmt: skip
    analysis = look(rollout)
    (slo,) = analysis.checks
    assert heavy[0].ttft_ms is not None and heavy[0].ttft_ms < 800
    assert (slo["n"], slo["sessions"], slo["estimate"], slo["more_unit"]) == (301, 301, 0.0, "candidate sessions")
    assert slo["test"] == "beta-binomial confidence sequence, one request per session" and slo["decision"] != "breach"


def test_the_page_the_api_and_the_alpha_split_show_the_tail_guardrail(owner: Any, versions: None) -> None:
    from django.test import Client

    rollout = started(owner, guardrails=[TAIL, {"metric": "error_rate", "margin": 0.01}])
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=200, model_version=rollout.baseline, seed=71)
    records(rollout, arm="candidate", n=200, model_version=rollout.candidate, seed=72)
    look(rollout)
    detail = owner.api().get(f"/api/v1/rollouts/{rollout.pk}").json()
    (check,) = [c for c in detail["latest_analysis"]["checks"] if c["metric"] == "tpot_p90_ms"]
    assert check["alpha"] == 0.025 and check["scale"] == "quantile" and check["more_unit"] == "candidate sessions"
    assert "tpot_p90_ms at most 10% worse" in detail["alpha_split"]["checks"]
    client = Client()
    client.force_login(owner.user)
    page = client.get(f"/rollouts/{rollout.pk}").content.decode()
    assert "tpot_p90_ms at most 10% worse" in page and "candidate sessions" in page


def test_while_baking_a_tail_guardrail_is_also_checked_on_the_bake_alone(
    owner: Any, versions: None, routes_settle_at_once: None
) -> None:
    rollout = started(owner)
    step_back(rollout, 30)
    records(rollout, arm="baseline", n=400, model_version=rollout.baseline, seed=81)
    records(rollout, arm="candidate", n=400, model_version=rollout.candidate, seed=82)
    rollout = rollout_promote(rollout=rollout, actor=owner.user, reason="test")
    assert rollout.state == "baking"
    # In the bake the candidate's p90 is three times the holdout's.
    records(rollout, arm="baseline", n=300, model_version=rollout.baseline, seed=83)
    records(rollout, arm="candidate", n=300, model_version=rollout.candidate, seed=84, tpot=(60.0, 5.0))
    analysis = look(fresh(rollout))
    pooled = next(c for c in analysis.checks if c["name"] == "tpot_p90_ms at most 10% worse")
    alone = next(c for c in analysis.checks if c["name"] == "tpot_p90_ms at most 10% worse (bake alone)")
    assert pooled["steps"] == [0, 1] and pooled["sessions"] == [700, 700]
    assert alone["steps"] == [1] and alone["sessions"] == [300, 300] and alone["scale"] == "quantile"
    # At half of the guardrail's breach side: 0.025 of its share of 0.05 (the pooled check's breach side has the other half).
    plan = plan_from_stored(rollout.plan)
    assert alone["decision"] == "breach" and alone["alpha"] == guardrail_breach_share(plan) == check_alpha_share(plan) / 2
    assert pooled["alpha"] == 0.05 and pooled["breach_alpha"] == 0.025
    assert analysis.decision == "rollback" and analysis.reason.startswith("during the bake: "), analysis.reason
