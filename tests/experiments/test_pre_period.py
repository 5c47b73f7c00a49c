"""A session's requests before the rollout as the latencies' second covariate: the SQL reads exactly the
history it should (the alias, the baseline's version, the pre-period, strictly before the start), once
per session, and the incremental look adds up to the computation from scratch."""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from datetime import datetime, timedelta

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from experiments.analysis import PrePeriod, arm_sums, records_fold
from experiments.analysis.preperiod import pre_column_names, pre_specs
from experiments.analysis.sessions import RECORDS, ratio_specs
from experiments.rollups import arms_from_scratch_equal, window_fold, window_scratch
from experiments.stats import RatioStats, cuped_ratio_estimates
from serving.models import RequestRecord
from tests.rollouts.helpers import version

# Committed records: on PostgreSQL a look folds for good (and reads the history of) only what is committed
# below its horizon; records of the look's own transaction are counted, with no history, until then.
pytestmark = pytest.mark.django_db(transaction=True)
ROLLOUT = 41


def record(*, at: datetime, session: str, tpot: float, arm: str = "baseline", rollout: int | None = ROLLOUT,
           version_id: int | None = None, alias: str = "adder", outcome: str = "ok", failover: bool = False,
           chars: int = 100) -> RequestRecord:  # fmt: skip
    return RequestRecord(
        request_id=os.urandom(12).hex(), created_at=at, alias=alias, rollout_id=rollout, arm=arm,
        model_version_id=version_id, endpoint="chat.completions", stream=True, session_hash=session,
        prompt_chars=chars, status_code=200 if outcome == "ok" else 502, outcome=outcome, failover=failover,
        ttft_ms=100.0 if outcome == "ok" else None, tpot_ms=tpot if outcome == "ok" else None,
        e2e_ms=500.0 if outcome == "ok" else None, prompt_tokens=10, completion_tokens=4,
    )  # fmt: skip


def history(start: datetime, base_id: int, other_id: int, rng: random.Random) -> list[RequestRecord]:
    """Sessions s0..s29 used the alias before the rollout (each with its own speed), and what must not count:
    another version's requests, another alias's, older than the pre-period, errors, failovers, and
    requests at or after the start."""
    rows = []
    for i in range(30):
        speed = 10.0 + i
        for k in range(1 + i % 4):
            rows.append(record(at=start - timedelta(hours=2, minutes=k), session=f"s{i}", tpot=speed + rng.random(),
                               rollout=None, version_id=base_id))  # fmt: skip
        rows.append(record(at=start - timedelta(hours=1), session=f"s{i}", tpot=999.0, rollout=None, version_id=other_id))
        rows.append(record(at=start - timedelta(hours=1), session=f"s{i}", tpot=999.0, rollout=None, version_id=base_id,
                           alias="other"))  # fmt: skip
        rows.append(record(at=start - timedelta(hours=25), session=f"s{i}", tpot=999.0, rollout=None, version_id=base_id))
        rows.append(record(at=start - timedelta(minutes=5), session=f"s{i}", tpot=999.0, rollout=None, version_id=base_id,
                           outcome="engine_error"))  # fmt: skip
        rows.append(record(at=start - timedelta(minutes=4), session=f"s{i}", tpot=999.0, rollout=None, version_id=base_id,
                           failover=True))  # fmt: skip
    return rows


def window(start: datetime, base_id: int, look: int, rng: random.Random) -> list[RequestRecord]:
    """The rollout's requests in look `look`: sessions s0..s29 (history) and n0..n19 (new to the alias), sticky
    (every fourth on the candidate), slow as they were before, plus sessionless requests; a session's first
    request is exactly at the start (the rollout's own, never history)."""
    rows = []
    for i in range(30 + 20):
        name = f"s{i}" if i < 30 else f"n{i - 30}"
        if look == 0 and i % 3:
            continue  # most sessions arrive later
        arm = "candidate" if i % 4 == 0 else "baseline"
        speed = 10.0 + i if i < 30 else 25.0
        for k in range(1 + (i + look) % 3):
            at = start if look == 0 and k == 0 else start + timedelta(minutes=look, seconds=k)
            rows.append(record(at=at, session=name, tpot=speed * (1.2 if arm == "candidate" else 1.0) + rng.random(),
                               arm=arm, version_id=base_id, chars=50 + 10 * k))  # fmt: skip
    rows += [record(at=start + timedelta(minutes=look), session="", tpot=20.0 + rng.random(), version_id=base_id)
             for _ in range(5)]  # fmt: skip
    return rows


def expected(rows: list[RequestRecord], arm: str, history_rows: list[RequestRecord], start: datetime,
             base_id: int) -> RatioStats:  # fmt: skip
    """The tpot_gmean_ms RatioStats of an arm, with both covariates, computed row by row in Python."""
    before: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in history_rows:
        if (r.alias == "adder" and r.model_version_id == base_id and start - timedelta(hours=24) <= r.created_at < start
                and r.outcome == "ok" and not r.failover and r.session_hash):  # fmt: skip
            before[r.session_hash][0] += math.log(r.tpot_ms)  # type: ignore[arg-type]
            before[r.session_hash][1] += 1.0
    units: dict[str, list[float]] = defaultdict(lambda: [0.0] * 6)
    for r in rows:
        if r.arm != arm:
            continue
        key = r.session_hash or f"r:{r.request_id}"
        u = units[key]
        u[0] += math.log(r.tpot_ms)  # type: ignore[arg-type]
        u[1] += 1.0
        u[2] += r.prompt_chars
        u[3] += 1.0
        u[4], u[5] = before[key] if key in before else (0.0, 0.0)
    a = np.array(list(units.values()))
    return RatioStats.from_units(a[:, 0], a[:, 1], a[:, 2], a[:, 3], pre_num=a[:, 4], pre_den=a[:, 5])


def close(found: RatioStats | None, wanted: RatioStats) -> None:
    assert found is not None
    for name, value in wanted.as_dict().items():
        assert math.isclose(getattr(found, name), value, rel_tol=1e-9, abs_tol=1e-6), name


def test_history_is_read_once_per_session_and_the_looks_add_up_to_the_rows() -> None:
    base, other = version("adder-v1"), version("adder-v2")
    rng = random.Random(5)
    start = timezone.now().replace(microsecond=0) - timedelta(minutes=30)
    past = RequestRecord.objects.bulk_create(history(start, base.pk, other.pk, rng))
    pre = PrePeriod(alias="adder", until=start, model_version_id=base.pk)
    seen: list[RequestRecord] = []
    for look in range(3):
        seen += RequestRecord.objects.bulk_create(window(start, base.pk, look, rng))
        incremental = arm_sums(rollout_id=ROLLOUT, since=start, pre_period=pre, outcomes=False, percentiles=False)
        scratch = arm_sums(rollout_id=ROLLOUT, pre_period=pre, outcomes=False, percentiles=False)
        for arm in ("baseline", "candidate"):
            wanted = expected(seen, arm, past + seen, start, base.pk)
            assert wanted.pre_den > 0 and wanted.units > wanted.pre_den / 4  # some sessions have no history
            close(incremental[arm].ratio_for("tpot_gmean_ms"), wanted)
            close(scratch[arm].ratio_for("tpot_gmean_ms"), wanted)
        # Every column and product of the window's rollup, history included, as from scratch (the benchmark's check).
        fold = records_fold(limits={}, pre_period=pre)
        assert fold is not None and fold["fill"] is not None
        folded = window_fold(rollout_id=ROLLOUT, since=start, until=None, **fold)
        del fold["rows_key"]
        from_scratch = window_scratch(rollout_id=ROLLOUT, since=start, until=None, **fold)
        assert not arms_from_scratch_equal(folded.arms, from_scratch)
        assert from_scratch["baseline"].sums["pre_tpot_ms_n"] > 0
    # The window's own requests at the start, and a session's later requests, never became history.
    assert all(r.created_at >= start for r in seen)
    # Without a pre-period nothing changes: the prompt's length is the only covariate.
    plain = arm_sums(rollout_id=ROLLOUT, since=start, outcomes=False, percentiles=False)["baseline"].ratio_for("tpot_gmean_ms")
    assert plain is not None and plain.pre_den == 0 and plain.cov_den > 0


def test_a_session_first_seen_by_a_later_look_gets_its_history_and_only_it() -> None:
    """A later fold's new unit rows get their history after the fold (`_fill_units`, by the new rows' ids);
    the first fold's get it in the same statement. One new session per look: the id range's ends count."""
    base, other = version("adder-v1"), version("adder-v2")
    start = timezone.now().replace(microsecond=0) - timedelta(minutes=30)
    RequestRecord.objects.bulk_create(history(start, base.pk, other.pk, random.Random(8)))
    fold = records_fold(limits={}, pre_period=PrePeriod(alias="adder", until=start, model_version_id=base.pk))
    assert fold is not None
    scratch_args = {k: v for k, v in fold.items() if k != "rows_key"}
    # s5 has 2 requests in the pre-period that count, s6 has 3 (`history`), n0 none: the window's count after
    # the look that adds each. The last look touches all three again: its products take their stored history.
    wanted = {"n0": 0.0, "s5": 2.0, "s6": 5.0}
    for look, sessions in enumerate((["n0"], ["s5"], ["s6"], ["n0", "s5", "s6"])):
        RequestRecord.objects.bulk_create([record(at=start + timedelta(minutes=look), session=session, tpot=30.0 + look,
                                                  version_id=base.pk) for session in sessions])  # fmt: skip
        with CaptureQueriesContext(connection) as queries:
            folded = window_fold(rollout_id=ROLLOUT, since=start, until=None, **fold)
        assert folded.arms["baseline"].sums["pre_tpot_ms_n"] == wanted[sessions[-1]]
        if connection.vendor == "postgresql":  # (one statement there: no temporary table made and dropped)
            assert not [q["sql"] for q in queries.captured_queries if "TEMP TABLE" in q["sql"]]
        assert not arms_from_scratch_equal(folded.arms, window_scratch(rollout_id=ROLLOUT, since=start, until=None,
                                                                       **scratch_args))  # fmt: skip


def test_the_history_covariate_removes_the_sessions_own_speed() -> None:
    base, other = version("adder-v1"), version("adder-v2")
    rng = random.Random(6)
    start = timezone.now().replace(microsecond=0) - timedelta(minutes=30)
    RequestRecord.objects.bulk_create(history(start, base.pk, other.pk, rng))
    for look in range(3):
        RequestRecord.objects.bulk_create(window(start, base.pk, look, rng))
    pre = PrePeriod(alias="adder", until=start, model_version_id=base.pk)
    sums = arm_sums(rollout_id=ROLLOUT, since=start, pre_period=pre, outcomes=False, percentiles=False)
    b, c = (sums[arm].ratio_for("tpot_gmean_ms") for arm in ("baseline", "candidate"))
    assert b is not None and c is not None
    adjusted = cuped_ratio_estimates(b, c)
    assert "pre" in adjusted.covariates and adjusted.variance_reduction > 0.5
    prompt_only = cuped_ratio_estimates(b, c, covariates=("cov",))
    assert adjusted.variance_reduction > prompt_only.variance_reduction + 0.3


def test_no_adjustment_reads_what_the_candidate_can_change() -> None:
    # Covariates are the prompt's length (the user's) and latencies from before the rollout, never output
    # tokens or anything else of the window's answers; cost and tokens are not adjusted at all.
    specs = ratio_specs(RECORDS, {"ttft_ms": (100.0,)}, pre=pre_specs(RECORDS))
    for key, spec in specs.items():
        covariates = {*(spec.covariate or ()), *(spec.pre or ())}
        assert covariates <= {"chars", "counted", "ok_chars", "ok", *pre_column_names(RECORDS)}, key
        assert all(c.startswith(("pre_", "chars", "ok_chars", "counted", "ok")) for c in covariates)
    assert specs["tokens"].pre is None and specs["error_rate"].pre is None
    assert specs["tpot_ms:log"].pre == ("pre_tpot_ms_l", "pre_tpot_ms_n")


def test_a_pre_period_needs_an_alias_and_a_positive_span() -> None:
    with pytest.raises(ValueError, match="alias"):
        PrePeriod(alias="", until=timezone.now())
    with pytest.raises(ValueError, match="span"):
        PrePeriod(alias="a", until=timezone.now(), span=timedelta(0))


