"""Shadow latency compared request by request: the paired sums per session in SQL, and the guardrail at its
margin on simulated shadow traffic (heavy-tailed prompts and stalls, a machine whose load drifts) of pairs
without a session, each its own unit (sticky users: test_shadow_sessions)."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from experiments.analysis import PairedLatency, PairedSums, shadow_paired_latency
from experiments.metrics import METRICS
from experiments.stats import RatioStats
from rollouts.analysis.shadow import shadow_latency_guardrail


@pytest.mark.django_db
def test_paired_sums_match_the_pairs_where_both_sides_answered() -> None:
    from serving.models import ShadowPair

    rng = np.random.default_rng(4)
    rows, kept = [], []
    sessions = [f"{s:032x}" for s in range(8)]
    for i in range(60):
        base, cand = float(rng.lognormal(3, 0.5)), float(rng.lognormal(3.1, 0.5))
        base_outcome = "ok" if i % 10 else "engine_error"
        cand_outcome = "ok" if i % 7 else "engine_error"
        if i == 5:
            base_outcome = ""  # a pair from before the baseline was replayed
        rows.append(ShadowPair(
            request_id=os.urandom(8).hex(), created_at=timezone.now(), alias="adder", rollout_id=3,
            session_hash=sessions[i % 8] if i % 3 else "",
            candidate_outcome=cand_outcome, candidate_ttft_ms=cand, candidate_tpot_ms=cand / 10, candidate_e2e_ms=cand * 2,
            baseline_replay_outcome=base_outcome, baseline_replay_ttft_ms=base, baseline_replay_tpot_ms=base / 10,
            baseline_replay_e2e_ms=base * 2, baseline_ttft_ms=1.0, baseline_e2e_ms=1.0,
        ))  # fmt: skip
        if base_outcome == "ok" and cand_outcome == "ok":
            # The unit: the session, or the pair itself without one.
            kept.append((sessions[i % 8] if i % 3 else f"own{i}", base, cand))
    ShadowPair.objects.bulk_create(rows)
    paired = shadow_paired_latency(rollout_id=3)
    units = sorted({unit for unit, _, _ in kept})
    index = np.array([units.index(unit) for unit, _, _ in kept])
    base_v, cand_v = np.array([(b, c) for _, b, c in kept]).T
    log_ratio = np.log(cand_v) - np.log(base_v)
    per_unit = np.bincount(index, weights=log_ratio)
    counts = np.bincount(index).astype(float)
    expected = RatioStats.from_units(per_unit, counts)
    stats = paired.fields["ttft_ms"].log_ratio()
    assert stats.den == len(kept) > 30 and stats.units == len(units) == 8 + sum(u.startswith("own") for u in units)
    for name in ("num", "num_sq", "den_sq", "num_den"):
        assert getattr(stats, name) == pytest.approx(getattr(expected, name), rel=1e-9), name
    scaled = paired.fields["e2e_ms"].scaled_difference(1.1)
    differences = np.bincount(index, weights=2 * (cand_v - 1.1 * base_v))
    assert scaled.num == pytest.approx(differences.sum(), rel=1e-9)
    assert scaled.num_sq == pytest.approx((differences**2).sum(), rel=1e-9)
    assert scaled.num_den == pytest.approx(differences @ counts, rel=1e-9)
    assert shadow_paired_latency(rollout_id=4).fields["tpot_ms"].n == 0


@pytest.mark.django_db
def test_the_candidates_shadow_sums_are_over_sessions() -> None:
    """The candidate's SLO sums in a shadow step, by hand: session a has TPOTs 10 and 30 and a failed reply,
    session b 50, and two pairs without a session (20 and 40) are one unit each."""
    from experiments.analysis import shadow_candidate_sums
    from serving.models import ShadowPair

    def pair(session: str, tpot: float | None) -> ShadowPair:
        return ShadowPair(
            request_id=os.urandom(8).hex(), created_at=timezone.now(), alias="adder", rollout_id=5, session_hash=session,
            candidate_outcome="ok" if tpot else "engine_error", candidate_tpot_ms=tpot, baseline_ttft_ms=1.0,
            baseline_e2e_ms=1.0,
        )  # fmt: skip

    ShadowPair.objects.bulk_create([pair("a", 10.0), pair("a", 30.0), pair("a", None), pair("b", 50.0),
                                    pair("", 20.0), pair("", 40.0)])  # fmt: skip
    sums = shadow_candidate_sums(rollout_id=5, percentiles=False)
    tpot = sums.ratio_for("tpot_mean_ms")
    assert tpot is not None and sums.sessions == 4
    # Units a, b, and the two own units: sums (40, 50, 20, 40) over counts (2, 1, 1, 1).
    assert (tpot.units, tpot.num, tpot.den) == (4, 150.0, 5.0)
    assert (tpot.num_sq, tpot.den_sq, tpot.num_den) == (40**2 + 50**2 + 20**2 + 40**2, 4 + 1 + 1 + 1, 80 + 50 + 20 + 40)
    errors = sums.ratio_for("error_rate")
    assert errors is not None and (errors.num, errors.den, errors.num_sq, errors.den_sq, errors.num_den) == (1, 6, 1, 12, 3)


def _shadow_traffic(rng: np.random.Generator, reps: int, n: int, ratio: float) -> np.ndarray:
    """Per-pair log ratios ln(candidate / baseline) of `reps` rollouts of `n` mirrored requests.

    Each request: a prompt of heavy-tailed size (lognormal, sd 1 on the log scale), the machine's load at
    that moment (a slow random walk shared by both sides, which answer side by side), each side's own
    noise (sd 0.3) and, on 2 % of requests per side, a stall that makes it 6x slower. The candidate's
    geometric mean is `ratio` times the baseline's."""
    prompt = rng.lognormal(0.0, 1.0, size=(reps, n))
    load = np.exp(np.cumsum(rng.normal(0.0, 0.05, size=(reps, n)), axis=1))

    def side() -> np.ndarray:
        stall = np.where(rng.random((reps, n)) < 0.02, 6.0, 1.0)
        return 40.0 * prompt * load * rng.lognormal(0.0, 0.3, size=(reps, n)) * stall

    base = side()
    cand = ratio * side()
    return np.log(cand) - np.log(base)


def _first_decisions(log_ratios: np.ndarray, *, every: int, alpha: float) -> list[tuple[str, int]]:
    """For each rollout: the first decision the guardrail ("tpot_gmean_ms" within 10 %) takes, looking after
    every `every` pairs, and after how many pairs ("undecided", n if none)."""
    guardrail = SimpleNamespace(margin=0.10, relative=True)
    metric = METRICS["tpot_gmean_ms"]
    sums, squares = np.cumsum(log_ratios, axis=1), np.cumsum(log_ratios**2, axis=1)
    n = log_ratios.shape[1]
    out = []
    for rep in range(log_ratios.shape[0]):
        decided = ("undecided", n)
        for looked in range(every, n + 1, every):
            # Independent pairs, each its own unit: a unit's n_u^2 = n_u = 1 and n_u lr_u = lr_u.
            lr = float(sums[rep, looked - 1])
            sums_here = PairedSums(looked, looked, lr=lr, lr2=float(squares[rep, looked - 1]), n2=looked, nlr=lr)
            paired = PairedLatency(fields={"tpot_ms": sums_here})
            check: dict[str, Any] = shadow_latency_guardrail(
                guardrail, metric, paired, alpha=alpha, tuning_n=500
            )
            if check["decision"] != "undecided":
                decided = (check["decision"], looked)
                break
        out.append(decided)
    return out


def test_a_candidate_exactly_at_the_margin_is_called_either_way_at_most_alpha_of_the_time() -> None:
    """1,000 shadow steps of 1,000 pairs, looked at every 50 pairs, candidate exactly 10 % slower (ratio of
    geometric means 1.10): a breach (or a "safe") at any look in at most alpha of them (Monte Carlo s.e.
    0.7 %)."""
    alpha, reps = 0.05, 1000
    decisions = _first_decisions(
        _shadow_traffic(np.random.default_rng(61), reps, 1000, 1.10), every=50, alpha=alpha
    )
    breaches = sum(d == "breach" for d, _ in decisions) / reps
    safes = sum(d == "safe" for d, _ in decisions) / reps
    print(
        f"at the margin: breach {breaches:.3f}, safe {safes:.3f} (s.e. {math.sqrt(alpha * (1 - alpha) / reps):.4f})"
    )
    assert breaches <= alpha and safes <= alpha


def test_a_candidate_25_percent_slower_is_caught_within_a_few_hundred_pairs() -> None:
    decisions = _first_decisions(
        _shadow_traffic(np.random.default_rng(62), 300, 1000, 1.25), every=25, alpha=0.05
    )
    caught = sorted(n for d, n in decisions if d == "breach")
    print(f"+25 %: caught in {len(caught)} of 300, median after {caught[len(caught) // 2]} pairs")
    assert len(caught) == 300 and caught[len(caught) // 2] <= 300


@pytest.mark.django_db
def test_shadow_tail_bins_and_percentiles_match_the_pairs() -> None:
    """The shadow tail guardrails' sample, by hand: per field, each session's first pair (by time, then id)
    among those where both sides answered ok with a positive latency, both sides' sketch buckets from that
    one pair; the candidate's displayed percentiles within the sketches' 1 % of the nearest ranks."""
    from datetime import timedelta

    from ddsketch.mapping import LogarithmicMapping

    from experiments.analysis import shadow_candidate_sums, shadow_pair_bins
    from experiments.rollups import RELATIVE_ACCURACY
    from serving.models import ShadowPair

    rng = np.random.default_rng(11)
    start = timezone.now() - timedelta(minutes=5)
    rows = []
    for i in range(400):
        cand_ok, base_ok = i % 9 != 0, i % 11 != 0
        ttft = (float(rng.lognormal(4.5, 0.6)), float(rng.lognormal(4.6, 0.6)))
        tpot = (0.0 if i % 13 == 0 else float(rng.lognormal(3.0, 0.3)), float(rng.lognormal(3.1, 0.3)))
        rows.append(ShadowPair(
            request_id=f"p{i}", created_at=start + timedelta(seconds=int(rng.integers(0, 60))), alias="adder",
            rollout_id=6, session_hash=f"s{int(rng.integers(0, 40))}" if i % 5 else "",
            candidate_outcome="ok" if cand_ok else "engine_error", candidate_ttft_ms=ttft[1] if cand_ok else None,
            candidate_tpot_ms=tpot[1] if cand_ok else None, candidate_e2e_ms=ttft[1] * 3 if cand_ok else None,
            baseline_replay_outcome="ok" if base_ok else "engine_error", baseline_replay_ttft_ms=ttft[0],
            baseline_replay_tpot_ms=tpot[0], baseline_replay_e2e_ms=ttft[0] * 3, baseline_ttft_ms=1.0, baseline_e2e_ms=1.0,
        ))  # fmt: skip
    ShadowPair.objects.bulk_create(rows)
    pairs = sorted(ShadowPair.objects.filter(rollout_id=6), key=lambda p: (p.created_at, p.pk))
    key = LogarithmicMapping(RELATIVE_ACCURACY).key
    expected: dict[str, dict[str, dict[int, int]]] = {}
    for name in ("ttft_ms", "tpot_ms"):
        seen: set[str] = set()
        for p in pairs:
            b, c = getattr(p, f"baseline_replay_{name}"), getattr(p, f"candidate_{name}")
            unit = p.session_hash or f"r:{p.request_id}"
            if p.candidate_outcome != "ok" or p.baseline_replay_outcome != "ok" or not b or not c or unit in seen:
                continue
            seen.add(unit)
            for arm, value in (("baseline", b), ("candidate", c)):
                bins = expected.setdefault(arm, {}).setdefault(name, {})
                bins[key(value)] = bins.get(key(value), 0) + 1
    assert shadow_pair_bins(rollout_id=6, since=None, fields=["ttft_ms", "tpot_ms"]) == expected
    assert sum(expected["candidate"]["tpot_ms"].values()) < sum(expected["candidate"]["ttft_ms"].values()) <= 40 + 80

    shown = shadow_candidate_sums(rollout_id=6).percentiles
    for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
        values = sorted(getattr(p, f"candidate_{name}") for p in pairs if p.candidate_outcome == "ok")
        for label, q in (("p50", 0.50), ("p99", 0.99)):
            exact = values[max(1, math.ceil(q * len(values))) - 1]
            assert shown[f"{name.removesuffix('_ms')}_{label}_ms"] == pytest.approx(exact, rel=RELATIVE_ACCURACY)
