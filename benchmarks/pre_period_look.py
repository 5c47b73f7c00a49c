"""What the pre-rollout covariate costs a look, on PostgreSQL: the same incremental looks with and without
the sessions' history (`experiments.analysis.preperiod`), side by side on one database.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ramp_NAME .venv/bin/python benchmarks/pre_period_look.py 6000

SESSIONS (6,000 by default) sessions send 10 requests each to the alias in the 24 h before the rollout,
then 10 x SESSIONS requests from 1.3 x SESSIONS sessions arrive in the rollout's window (a quarter new to
the alias); the first look of each kind (cold), then 5 steady looks after SESSIONS / 2 more requests each
(some from new sessions), interleaved. Prints wall time and this process's CPU (the database's is the
rest). The tables are ANALYZEd after the fill, as autovacuum would. Its records (alias "cuped-bench") and
windows are deleted at the end. The database must be migrated.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django

django.setup()

from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from experiments.analysis import PrePeriod, arm_sums  # noqa: E402
from experiments.models import RollupWindow  # noqa: E402
from serving.models import RequestRecord  # noqa: E402
from tests.rollouts.helpers import version  # noqa: E402

ROLLOUT = 990001
ALIAS = "cuped-bench"


def main() -> None:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 6000
    rng = random.Random(1)
    RequestRecord.objects.filter(alias=ALIAS).delete()
    RollupWindow.objects.filter(rollout_id=ROLLOUT).delete()
    model = version("cupedbench-v1")
    start = timezone.now() - timedelta(hours=1)

    def record(at: object, session: int, rollout: int | None) -> RequestRecord:
        ok = rng.random() > 0.01
        return RequestRecord(
            request_id=os.urandom(12).hex(), created_at=at, alias=ALIAS, rollout_id=rollout,
            arm="candidate" if rollout and session % 10 == 0 else "baseline", model_version_id=model.pk,
            endpoint="chat.completions", stream=True, session_hash=f"{session:032x}",
            prompt_chars=rng.randint(5, 2000), status_code=200 if ok else 502, outcome="ok" if ok else "engine_error",
            ttft_ms=rng.lognormvariate(5, 0.4) if ok else None, tpot_ms=rng.lognormvariate(3, 0.4) if ok else None,
            e2e_ms=rng.lognormvariate(7, 0.4) if ok else None, prompt_tokens=10, completion_tokens=50,
        )  # fmt: skip

    def window(n: int, high: int) -> None:
        rows = [record(timezone.now() - timedelta(seconds=rng.uniform(0, 60)), rng.randrange(high), ROLLOUT)
                for _ in range(n)]  # fmt: skip
        RequestRecord.objects.bulk_create(rows, batch_size=5000)

    history = [record(start - timedelta(seconds=rng.uniform(1, 86000)), rng.randrange(sessions), None)
               for _ in range(10 * sessions)]  # fmt: skip
    RequestRecord.objects.bulk_create(history, batch_size=5000)
    window(10 * sessions, int(sessions * 1.3))
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {RequestRecord._meta.db_table}")
    pre = PrePeriod(alias=ALIAS, until=start, model_version_id=model.pk)
    thresholds = {"ttft_ms": (300.0,), "tpot_ms": (40.0,)}

    def look(period: PrePeriod | None) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        arm_sums(rollout_id=ROLLOUT, since=start, thresholds=thresholds, pre_period=period, percentiles=False,
                 outcomes=False)  # fmt: skip
        return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3

    kinds = (("without", None), ("with", pre))
    for name, period in kinds:
        wall, cpu = look(period)
        print(f"cold look {name} the history: {wall:,.0f} ms wall, {cpu:,.0f} ms CPU (this process)")
    steady: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    for i in range(5):
        window(sessions // 2, int(sessions * 1.4))
        for name, period in kinds if i % 2 else kinds[::-1]:
            steady[name].append(look(period))
    for name, found in steady.items():
        print(f"steady look {name} the history: median {statistics.median(w for w, _ in found):,.0f} ms wall, "
              f"{statistics.median(c for _, c in found):,.0f} ms CPU (this process)")  # fmt: skip
    RequestRecord.objects.filter(alias=ALIAS).delete()
    RollupWindow.objects.filter(rollout_id=ROLLOUT).delete()


if __name__ == "__main__":
    main()
