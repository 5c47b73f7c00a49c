"""The SQL aggregates over sessions give the same statistics as computing them from the rows in Python."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from experiments.analysis import arm_sums
from experiments.metrics import METRICS
from experiments.models import OutcomeEvent
from experiments.services import outcome_events_record
from experiments.stats import RatioStats
from serving.models import RequestRecord
from tests.rollouts.helpers import records, version

pytestmark = pytest.mark.django_db


def _by_unit(rows: list[RequestRecord], num: Any, den: Any, cov: Any = None) -> RatioStats:
    """The expected RatioStats, from the rows grouped by session in Python."""
    units: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for r in rows:
        key = r.session_hash or f"r:{r.request_id}"
        unit = units[key]
        unit[0] += num(r)
        unit[1] += den(r)
        if cov is not None:
            unit[2] += cov[0](r)
            unit[3] += cov[1](r)
    a, b, c, d = (np.array([u[i] for u in units.values()]) for i in range(4))
    return RatioStats.from_units(a, b, c, d) if cov is not None else RatioStats.from_units(a, b)


def _close(found: RatioStats | None, expected: RatioStats) -> None:
    assert found is not None
    for name, value in expected.as_dict().items():
        assert math.isclose(getattr(found, name), value, rel_tol=1e-9, abs_tol=1e-9), name


def test_per_session_sums_match_the_rows(owner: Any) -> None:
    v1 = version("adder-v1", price_in=1.0, price_out=4.0)
    # Sticky users: 300 requests over 40 sessions, some requests without a session, long and short prompts.
    records(7, arm="baseline", n=300, model_version=v1, error_rate=0.05, seed=51, ttft=(300.0, 200.0),
            sessions=[f"user-{i}" for i in range(40)] + ["", ""], prompt_chars=lambda rng: rng.randint(3, 400))
    records(7, arm="candidate", n=120, model_version=v1, error_rate=0.1, seed=52, sessions=15)
    first_five = list(RequestRecord.objects.filter(rollout_id=7, arm="candidate", outcome="ok").values_list("pk", flat=True)[:5])
    RequestRecord.objects.filter(pk__in=first_five).update(outcome="client_error", status_code=400)
    records(8, arm="candidate", n=50, model_version=v1, seed=53)  # another rollout: not counted

    sums = arm_sums(rollout_id=7, thresholds={"ttft_ms": [400.0]})
    rows = list(RequestRecord.objects.filter(rollout_id=7, arm="baseline"))
    base = sums["baseline"]
    units = {r.session_hash or r.request_id for r in rows}
    assert base.requests == 300 and base.sessions == len(units) and base.exposed == len(units)
    assert base.errors == sum(r.outcome == "engine_error" for r in rows)

    ok = lambda r: r.outcome == "ok"  # noqa: E731
    chars_ok = (lambda r: r.prompt_chars if ok(r) else 0.0, lambda r: 1.0 if ok(r) else 0.0)
    _close(base.ratio_for("tpot_mean_ms"), _by_unit(rows, lambda r: r.tpot_ms if ok(r) else 0.0, lambda r: float(ok(r)), chars_ok))
    _close(
        base.ratio_for("tpot_gmean_ms"),
        _by_unit(rows, lambda r: math.log(r.tpot_ms) if ok(r) else 0.0, lambda r: float(ok(r)), chars_ok),
    )
    counted = (lambda r: float(r.prompt_chars), lambda r: 1.0)
    _close(base.ratio_for("error_rate"), _by_unit(rows, lambda r: float(r.outcome == "engine_error"), lambda r: 1.0, counted))
    _close(
        base.ratio_for(METRICS["ttft_p99_ms"], threshold=400.0),
        _by_unit(rows, lambda r: float(ok(r) and r.ttft_ms > 400.0), lambda r: float(ok(r))),
    )
    assert base.good == sum(ok(r) and r.ttft_ms <= 400.0 for r in rows)
    _close(
        base.ratio_for("cost_per_request", prices=(1.0, 4.0)),
        _by_unit(rows, lambda r: (r.prompt_tokens * 1.0 + r.completion_tokens * 4.0) / 1e6 if ok(r) else 0.0,
                 lambda r: float(ok(r)), chars_ok),
    )  # fmt: skip
    ranked = sorted(r.ttft_ms for r in rows if ok(r))
    assert base.percentiles["ttft_p50_ms"] == ranked[math.ceil(0.5 * len(ranked)) - 1]
    assert base.percentiles["ttft_p99_ms"] == ranked[math.ceil(0.99 * len(ranked)) - 1]

    cand = sums["candidate"]
    assert cand.requests == 120 and cand.counted == 115 and cand.sessions <= 15  # client errors are nobody's verdict
    assert cand.ratio_for("error_rate").den == 115  # type: ignore[union-attr]


def test_a_session_counts_once_in_the_arm_it_was_first_assigned_to(owner: Any) -> None:
    v1 = version("adder-v1")
    start = timezone.now() - timedelta(minutes=5)
    records(9, arm="candidate", n=3, model_version=v1, seed=1, sessions=["alice"], at=start, error_rate=1.0)
    # Alice's failed candidate attempts failed over to the baseline: not an assignment to it.
    failed_over = records(9, arm="baseline", n=3, model_version=v1, seed=2, sessions=["alice"], at=start + timedelta(seconds=1))
    RequestRecord.objects.filter(pk__in=[r.pk for r in failed_over]).update(failover=True)
    records(9, arm="baseline", n=4, model_version=v1, seed=3, sessions=["bob"], at=start)
    records(9, arm="baseline", n=2, model_version=v1, seed=4, sessions=[""], at=start)  # no session: two units

    sums = arm_sums(rollout_id=9)
    assert (sums["candidate"].exposed, sums["baseline"].exposed) == (1, 3)
    assert (sums["candidate"].sessions, sums["baseline"].sessions) == (1, 4)
    assert sums["candidate"].errors == 3 and sums["baseline"].requests == 9


def test_an_outcome_reported_twice_counts_once(owner: Any) -> None:
    v1 = version("adder-v1")
    served = records(11, arm="candidate", n=4, model_version=v1, seed=5, sessions=["carol"])
    ids = [r.request_id for r in served]
    outcome_events_record(items=[
        {"request_id": ids[0], "kind": "thumbs", "value": "up"},
        {"request_id": ids[0], "kind": "thumbs", "value": "up"},  # the same click sent twice
        {"request_id": ids[1], "kind": "thumbs", "value": "down"},
        {"request_id": ids[1], "kind": "thumbs", "value": "up"},  # changed their mind: the latest stands
    ])  # fmt: skip
    assert OutcomeEvent.objects.filter(rollout_id=11).count() == 4
    thumbs = arm_sums(rollout_id=11)["candidate"].ratio_for("thumbs_up_rate")
    assert thumbs is not None and (thumbs.units, thumbs.den, thumbs.num) == (1, 2.0, 2.0)


def test_an_empty_window_is_empty_not_an_error() -> None:
    sums = arm_sums(rollout_id=999)
    assert sums["baseline"].requests == 0 and sums["candidate"].ratio_for("tpot_gmean_ms").units == 0  # type: ignore[union-attr]
    assert sums["candidate"].percentiles["ttft_p99_ms"] is None
