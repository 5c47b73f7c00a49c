"""The SQL aggregates give the same sufficient statistics as computing them from the rows in Python."""

from __future__ import annotations

import math
from typing import Any

import pytest

from experiments.analysis import arm_sums
from experiments.metrics import METRICS
from experiments.stats import ArmStats
from serving.models import RequestRecord
from tests.rollouts.helpers import records, version

pytestmark = pytest.mark.django_db


def test_aggregates_match_the_rows(owner: Any) -> None:
    v1 = version("adder-v1", price_in=1.0, price_out=4.0)
    records(7, arm="baseline", n=300, model_version=v1, error_rate=0.05, seed=51, ttft=(300.0, 200.0))
    records(7, arm="candidate", n=120, model_version=v1, error_rate=0.1, seed=52)
    first_five = list(RequestRecord.objects.filter(rollout_id=7, arm="candidate", outcome="ok").values_list("pk", flat=True)[:5])
    RequestRecord.objects.filter(pk__in=first_five).update(outcome="client_error", status_code=400)
    records(8, arm="candidate", n=50, model_version=v1, seed=53)  # another rollout: not counted

    sums = arm_sums(rollout_id=7, thresholds={"ttft_ms": [400.0]})
    rows = list(RequestRecord.objects.filter(rollout_id=7, arm="baseline"))
    ok = [r for r in rows if r.outcome == "ok"]
    expected = ArmStats.from_values([r.tpot_ms for r in ok])
    base = sums["baseline"]
    assert base.requests == 300 and base.errors == sum(r.outcome == "engine_error" for r in rows)
    tpot = base.stats_for("tpot_mean_ms")
    assert tpot is not None and tpot.n == expected.n
    assert math.isclose(tpot.sum, expected.sum, rel_tol=1e-9) and math.isclose(tpot.sum_squares, expected.sum_squares, rel_tol=1e-9)
    over = base.stats_for(METRICS["ttft_p99_ms"], threshold=400.0)
    assert over is not None and over.sum == sum(r.ttft_ms > 400.0 for r in ok)
    assert base.good == sum(r.ttft_ms <= 400.0 for r in ok)
    cost = base.stats_for("cost_per_request", prices=(1.0, 4.0))
    expected_cost = ArmStats.from_values([(r.prompt_tokens * 1.0 + r.completion_tokens * 4.0) / 1e6 for r in ok])
    assert cost is not None and math.isclose(cost.mean, expected_cost.mean, rel_tol=1e-9)
    ranked = sorted(r.ttft_ms for r in ok)
    assert base.percentiles["ttft_p50_ms"] == ranked[math.ceil(0.5 * len(ranked)) - 1]
    assert base.percentiles["ttft_p99_ms"] == ranked[math.ceil(0.99 * len(ranked)) - 1]

    cand = sums["candidate"]
    assert cand.requests == 120 and cand.counted == 115  # client errors are nobody's verdict
    assert cand.stats_for("error_rate").n == 115  # type: ignore[union-attr]


def test_an_empty_window_is_empty_not_an_error() -> None:
    sums = arm_sums(rollout_id=999)
    assert sums["baseline"].requests == 0 and sums["candidate"].stats_for("tpot_mean_ms").n == 0  # type: ignore[union-attr]
    assert sums["candidate"].percentiles["ttft_p99_ms"] is None
