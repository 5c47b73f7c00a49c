"""The shadow-quality guardrail's look at production volume, on PostgreSQL: the database's per-session sums
against the Python loop over every scored pair it replaced.

    BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/ramp_bench_shadow \\
        .venv/bin/python benchmarks/shadow_quality.py --pairs 200000 --sessions 20000 --before 0f565ce

The database named by BENCH_DATABASE_URL is created if it is missing and migrated; the benchmark owns it
(it fills it, and drops it with --drop). One rollout's scored shadow pairs are written by COPY (kept between
runs with the same --pairs and --sessions): sticky sessions of lognormal size, 5 % of the pairs with no
session (each its own unit), exact-match scores of 0 or 1 with a pairwise judge's score and its flip beside
them, and a few scores that are no score (null, a string). Then `evals.selectors.shadow_quality` as it is
and as it was at `--before` (evals/selectors.py at that revision, loaded as a module of its own), in
interleaved rounds: wall time and CPU of this process and of its PostgreSQL backend per look, medians side
by side, and whether the two read the same guardrail.

Then the shadow step's other per-look reads over the same pairs, each timed the same way beside itself at
`--before-reads` (they read every pair of the step at each look, as the quality does): the candidate's SLO
sums (`shadow_candidate_sums`), the paired latency guardrail's per-session sums (`shadow_paired_latency`),
the tail guardrails' first pair of each session (`shadow_pair_bins`, TTFT and TPOT) and the tail SLO's
count over its threshold (`shadow_pair_over`). The pairs carry lognormal latencies on both sides for these
(the candidate's TPOT 5 % longer).

Then the shadow step's look as the analysis runs it, folded (`experiments.analysis.shadow.shadow_step_sums`:
the four reads above from one window over the step's pairs, each look folding only the pairs committed
since the previous one): its first look (every pair, cold), then `--steady-looks` looks each after
`--steady-pairs` new pairs (written by COPY and committed; 80 % of them from sessions the step has seen),
each beside the four from-scratch reads over the same pairs, and whether the two give the same numbers.
The pairs those looks add are removed at the start of the next run.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis_volume import backend_cpu_s, database_drop, database_open, module_at  # noqa: E402  (benchmarks/ is the script's own folder)

ROLLOUT_ID = 910_001
ALIAS = "bench-shadow"


def fill(pairs: int, sessions: int, seed: int) -> None:
    """The rollout's scored pairs, by COPY; kept when the same fill is there already."""
    from django.db import connection

    from evals.services import shadow_scoring_configure
    from serving.models import ShadowPair

    judge = {"name": "judge", "params": {"judge_model": "bench-judge", "mode": "pairwise"}, "label": "judge"}
    shadow_scoring_configure(rollout_id=ROLLOUT_ID, scorers=[{"name": "exact_match"}])
    # The judge's spec is stored as configured (its model is not looked up here: nothing is scored).
    from evals.models import ShadowScoring

    config = ShadowScoring.objects.get(rollout_id=ROLLOUT_ID)
    config.scorers = [*config.scorers[:1], judge]
    config.save(update_fields=["scorers"])
    mark = f"{pairs}-{sessions}-{seed}-timed"
    existing = ShadowPair.objects.filter(rollout_id=ROLLOUT_ID)
    existing.filter(request_id__startswith=STEADY).delete()  # (an earlier run's folded looks added them)
    if existing.filter(request_id=f"fill-{mark}").exists() and existing.count() == pairs:
        print(f"== fill: {pairs:,} scored pairs of rollout {ROLLOUT_ID} kept from an earlier run")
        return
    existing.delete()
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    # Sticky sessions of lognormal size (a few heavy users), 5 % of the pairs with no session.
    weights = rng.lognormal(0.0, 1.0, sessions)
    weights /= weights.sum()
    hashes = [secrets.token_hex(16) for _ in range(sessions)]
    owner = rng.choice(sessions, size=pairs, p=weights)
    alone = rng.random(pairs) < 0.05
    exact = (rng.random(pairs) < 0.9).astype(int)
    verdict = rng.choice([0.0, 0.5, 1.0], size=pairs, p=[0.1, 0.8, 0.1])
    flipped = rng.random(pairs) < 0.05
    odd = rng.random(pairs)
    # Both sides' latencies, lognormal, per session a factor shared by its pairs.
    factor = rng.lognormal(0.0, 0.3, sessions)[owner]
    ttft = rng.lognormal(np.log(120.0), 0.5, (2, pairs)) * factor
    tpot = rng.lognormal(np.log(25.0), 0.3, (2, pairs)) * factor * np.array([[1.0], [1.05]])
    start = datetime.now(UTC) - timedelta(hours=2)
    buffer = io.StringIO()
    for i in range(pairs):
        score = "null" if odd[i] < 0.002 else '"0.5"' if odd[i] < 0.004 else str(exact[i])
        scores = (f'{{"exact_match": {score}, "judge": {verdict[i]}, '
                  f'"judge#flipped": {"true" if flipped[i] else "false"}}}')  # fmt: skip
        request_id = f"fill-{mark}" if i == 0 else f"bench-{i}"
        session = "" if alone[i] else hashes[owner[i]]
        created = start + timedelta(microseconds=int(i * 7200e6 / pairs))
        tokens = 40 + i % 200
        timings = (f"{ttft[0, i]:.3f}\t{tpot[0, i]:.4f}\t{ttft[0, i] + tpot[0, i] * tokens:.3f}\t"
                   f"{ttft[1, i]:.3f}\t{tpot[1, i]:.4f}\t{ttft[1, i] + tpot[1, i] * tokens:.3f}\t{tokens}")  # fmt: skip
        buffer.write(f"{request_id}\t{created.isoformat()}\t{ALIAS}\t{ROLLOUT_ID}\t{session}\t\t\t\tok\t\tt\tok\t{timings}\t{scores}\n")
    columns = ("request_id", "created_at", "alias", "rollout_id", "session_hash", "prompt_text", "baseline_output",
               "candidate_output", "candidate_outcome", "candidate_error", "texts_stored", "baseline_replay_outcome",
               "baseline_replay_ttft_ms", "baseline_replay_tpot_ms", "baseline_replay_e2e_ms", "candidate_ttft_ms",
               "candidate_tpot_ms", "candidate_e2e_ms", "candidate_completion_tokens", "scores")  # fmt: skip
    table = ShadowPair._meta.db_table
    with connection.cursor() as cursor:
        with cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())
        cursor.execute(f"ANALYZE {table}")
    units = len(set(owner[~alone].tolist())) + int(alone.sum())
    print(f"== fill: {pairs:,} scored pairs of rollout {ROLLOUT_ID} in {units:,} units "
          f"({int(alone.sum()):,} without a session), by COPY in {time.perf_counter() - started:.1f} s")  # fmt: skip


def timed(look: Any) -> tuple[float, float, float, Any]:
    server, client, wall = backend_cpu_s(), time.process_time(), time.perf_counter()
    result = look()
    wall_ms = (time.perf_counter() - wall) * 1000
    return wall_ms, (time.process_time() - client) * 1000, (backend_cpu_s() - server) * 1000, result


def same(a: Any, b: Any) -> bool:
    for name in ("n", "units", "mean", "ci_low", "ci_high", "sd", "judge_flip_rate"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--before", default="0f565ce", help="the revision whose shadow_quality is timed beside")
    parser.add_argument("--before-reads", default="HEAD",
                        help="the revision whose shadow step reads (candidate sums, paired latency, tail bins) are timed beside")
    parser.add_argument("--steady-looks", type=int, default=7, help="folded looks after new pairs (7)")
    parser.add_argument("--steady-pairs", type=int, default=1000,
                        help="new pairs before each folded look (1,000: 10 s at 100 mirrored requests/s)")
    parser.add_argument("--skip-reads", action="store_true",
                        help="time neither shadow_quality nor the reads beside their earlier revisions, only the folded look")
    parser.add_argument("--drop", action="store_true", help="drop the benchmark's database and stop")
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL")
    if not url or not url.startswith(("postgres://", "postgresql://")):
        sys.exit("set BENCH_DATABASE_URL to a PostgreSQL database the benchmark may own")
    if args.drop:
        database_drop(url)
        return
    database_open(url, var="bench-shadow")
    fill(args.pairs, args.sessions, args.seed)
    if args.skip_reads:
        folded_looks(args.steady_looks, args.steady_pairs, args.seed)
        return

    from evals import selectors

    before = module_at(args.before, "evals/selectors.py")
    looks = {
        "now": lambda label: selectors.shadow_quality(rollout_id=ROLLOUT_ID, scorer=label),
        f"at {args.before}": lambda label: before.shadow_quality(rollout_id=ROLLOUT_ID, scorer=label),
    }
    for label in ("exact_match", "judge"):
        print(f"\n== shadow_quality(scorer={label!r}), {args.rounds} interleaved rounds after one warm-up each")
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in looks}
        results = {name: look(label) for name, look in looks.items()}
        for repeat in range(args.rounds):
            order = list(looks) if repeat % 2 == 0 else list(reversed(looks))
            for name in order:
                wall, client, server, results[name] = timed(lambda name=name, label=label: looks[name](label))
                times[name].append((wall, client, server))
        for name, rows in times.items():
            walls, clients, servers = zip(*rows, strict=True)
            print(f"  {name:>14}: median {statistics.median(walls):8,.1f} ms wall "
                  f"(min {min(walls):,.1f}, max {max(walls):,.1f}); CPU median {statistics.median(clients):,.1f} ms "
                  f"this process, {statistics.median(servers):,.1f} ms its PostgreSQL backend")  # fmt: skip
        now, old = results["now"], results[f"at {args.before}"]
        print(f"  n {now.n:,} scores in {now.units:,} units, mean {now.mean:.5f}, bounds [{now.ci_low:.5f}, "
              f"{now.ci_high:.5f}], sd {now.sd:.5f}, judge flip rate {now.judge_flip_rate}")  # fmt: skip
        print(f"  the same guardrail as at {args.before}: {'yes' if same(now, old) else f'NO: {old}'}")
    if args.skip_reads:
        print("\n== the reads beside their earlier revision: skipped (--skip-reads)")
    else:
        step_reads(args.rounds, args.before_reads)
    folded_looks(args.steady_looks, args.steady_pairs, args.seed)


def step_reads(rounds: int, before_rev: str) -> None:
    """The shadow step's other per-look reads over every pair, timed (`rounds` interleaved rounds after one
    warm-up), each beside the same read at `before_rev` (its module at that revision) where it changed, with
    whether the two agree: the same paired sums (to 1e-9) and tail bins, the same candidate moments, and
    the candidate's percentiles within the sketches' relative accuracy of the nearest ranks."""
    from experiments.analysis import (
        shadow_candidate_sums,
        shadow_pair_bins,
        shadow_pair_over,
        shadow_paired_latency,
    )
    from experiments.rollups import RELATIVE_ACCURACY

    analysis = module_at(before_rev, "experiments/analysis/__init__.py")
    paired = module_at(before_rev, "experiments/analysis/paired.py")
    tails = module_at(before_rev, "experiments/analysis/tails.py")
    limits = {"ttft_ms": [800.0]}
    fields = ("ttft_ms", "tpot_ms")

    def sums_agree(a: Any, b: Any) -> bool:
        # (PostgreSQL's parallel workers add in no fixed order: the last digits of a sum may differ run to run.)
        if a.moments.units != b.moments.units or a.moments.sums.keys() != b.moments.sums.keys() or not all(
                math.isclose(a.moments.sums[k], b.moments.sums[k], rel_tol=1e-9) for k in a.moments.sums):
            return False
        return all((a.percentiles[k] is None) == (b.percentiles[k] is None)
                   and (a.percentiles[k] is None or abs(a.percentiles[k] / b.percentiles[k] - 1) <= RELATIVE_ACCURACY)
                   for k in b.percentiles)  # fmt: skip

    def paired_agree(a: Any, b: Any) -> bool:
        return all((x.n, x.units) == (y.n, y.units) and all(math.isclose(getattr(x, k), getattr(y, k), rel_tol=1e-9)
                   for k in ("b", "b2", "c", "c2", "bc", "lr", "lr2", "n2", "nb", "nc", "nlr"))
                   for x, y in ((a.fields[f], b.fields[f]) for f in a.fields))  # fmt: skip

    reads: dict[str, tuple[Any, Any, Any]] = {
        "shadow_candidate_sums": (
            lambda: shadow_candidate_sums(rollout_id=ROLLOUT_ID, thresholds=limits),
            lambda: analysis.shadow_candidate_sums(rollout_id=ROLLOUT_ID, thresholds=limits), sums_agree),
        "shadow_paired_latency": (lambda: shadow_paired_latency(rollout_id=ROLLOUT_ID),
                                  lambda: paired.shadow_paired_latency(rollout_id=ROLLOUT_ID), paired_agree),
        "shadow_pair_bins (ttft, tpot)": (
            lambda: shadow_pair_bins(rollout_id=ROLLOUT_ID, since=None, fields=fields),
            lambda: tails.shadow_pair_bins(rollout_id=ROLLOUT_ID, since=None, fields=fields), lambda a, b: a == b),
        "shadow_pair_over (ttft > 800)": (
            lambda: shadow_pair_over(rollout_id=ROLLOUT_ID, since=None, thresholds=limits),
            lambda: tails.shadow_pair_over(rollout_id=ROLLOUT_ID, since=None, thresholds=limits), lambda a, b: a == b),
    }  # fmt: skip
    print(f"\n== the shadow step's other reads of a look, over every pair, now and at {before_rev}, {rounds} "
          "interleaved rounds after one warm-up each")  # fmt: skip
    totals = {"now": 0.0, before_rev: 0.0}
    for name, (now, old, agree) in reads.items():
        results = {"now": now(), before_rev: old()}
        times: dict[str, list[tuple[float, float, float]]] = {"now": [], before_rev: []}
        for repeat in range(rounds):
            for label in (["now", before_rev] if repeat % 2 == 0 else [before_rev, "now"]):
                wall, client, server, results[label] = timed(now if label == "now" else old)
                times[label].append((wall, client, server))
        print(f"  {name}: the same as at {before_rev}: {'yes' if agree(results['now'], results[before_rev]) else 'NO'}")
        for label, rows in times.items():
            walls, clients, servers = zip(*rows, strict=True)
            totals[label] += statistics.median(walls)
            print(f"  {label:>14}: median {statistics.median(walls):8,.1f} ms wall (max {max(walls):,.1f}); CPU median "
                  f"{statistics.median(clients):,.1f} ms this process, {statistics.median(servers):,.1f} ms PostgreSQL")  # fmt: skip
    print(f"  together (the sum of the medians): {totals['now']:,.1f} ms a look now, {totals[before_rev]:,.1f} ms at {before_rev}")


STEADY = "steady-"


def folded_looks(looks: int, new_pairs: int, seed: int) -> None:
    """The shadow step's folded look: cold, then after each batch of `new_pairs`, beside the four reads from
    scratch over the same pairs (`assert_folded_as_scratch`)."""
    from django.db import connection

    from experiments.analysis.shadow import shadow_step_differences, shadow_step_scratch, shadow_step_sums
    from experiments.rollups import window_drop
    from serving.models import ShadowPair

    ShadowPair.objects.filter(rollout_id=ROLLOUT_ID, request_id__startswith=STEADY).delete()
    window_drop(rollout_ids=[ROLLOUT_ID])
    table = ShadowPair._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {table}")
        cursor.execute("VACUUM ANALYZE experiments_rollupunit")
    pairs = ShadowPair.objects.filter(rollout_id=ROLLOUT_ID)
    since = pairs.order_by("created_at").values_list("created_at", flat=True).first()
    if since is None:
        sys.exit("no pairs to look at")
    sessions = list(pairs.exclude(session_hash="").values_list("session_hash", flat=True).distinct()[:50_000])
    limits = {"ttft_ms": [800.0], "tpot_ms": [40.0]}
    fields = ("ttft_ms", "tpot_ms")

    def folded() -> Any:
        return shadow_step_sums(rollout_id=ROLLOUT_ID, since=since, thresholds=limits, bin_fields=fields)

    def scratch() -> Any:
        return shadow_step_scratch(rollout_id=ROLLOUT_ID, since=since, thresholds=limits, bin_fields=fields)

    print(f"\n== the shadow step's look, folded (shadow_step_sums: candidate sums, paired sums, tail bins of TTFT and "
          f"TPOT, first replies over TTFT 800 / TPOT 40 ms) against the four reads from scratch, {pairs.count():,} pairs")
    wall, client, server, _ = timed(folded)
    print(f"  first look (cold, every pair): {wall:,.1f} ms wall; CPU {client:,.1f} ms this process, {server:,.1f} ms PostgreSQL")
    rng = np.random.default_rng(seed + 1)
    times: dict[str, list[tuple[float, float, float]]] = {"folded": [], "from scratch": []}
    step = checked = None
    for look in range(looks):
        _write_steady(rng, new_pairs, sessions, look)
        order = ["folded", "from scratch"] if look % 2 == 0 else ["from scratch", "folded"]
        for label in order:
            wall, client, server, result = timed(folded if label == "folded" else scratch)
            times[label].append((wall, client, server))
            if label == "folded":
                step = result
            else:
                checked = result
    for label, rows in times.items():
        walls, clients, servers = zip(*rows, strict=True)
        print(f"  {label:>13}: after {new_pairs:,} new pairs, median {statistics.median(walls):8,.1f} ms wall (min "
              f"{min(walls):,.1f}, max {max(walls):,.1f}); CPU median {statistics.median(clients):,.1f} ms this process, "
              f"{statistics.median(servers):,.1f} ms PostgreSQL")  # fmt: skip
    if step is not None and checked is not None:
        problems = shadow_step_differences(step, checked)
        print(f"  folded == from scratch after the last look: {'yes' if not problems else 'NO: ' + '; '.join(problems)}")


def _write_steady(rng: Any, n: int, sessions: list[str], look: int) -> None:
    """`n` new pairs by COPY, committed, as the fill's: 80 % from sessions seen, the rest new ones."""
    from django.db import connection, transaction

    from serving.models import ShadowPair

    now = datetime.now(UTC)
    buffer = io.StringIO()
    for i in range(n):
        session = sessions[int(rng.integers(len(sessions)))] if sessions and rng.random() < 0.8 else secrets.token_hex(16)
        ttft = rng.lognormal(np.log(120.0), 0.5, 2)
        tpot = rng.lognormal(np.log(25.0), 0.3, 2) * np.array([1.0, 1.05])
        tokens = 40 + i % 200
        timings = (f"{ttft[0]:.3f}\t{tpot[0]:.4f}\t{ttft[0] + tpot[0] * tokens:.3f}\t"
                   f"{ttft[1]:.3f}\t{tpot[1]:.4f}\t{ttft[1] + tpot[1] * tokens:.3f}\t{tokens}")  # fmt: skip
        created = now - timedelta(microseconds=int(rng.integers(0, 5_000_000)))
        buffer.write(f"{STEADY}{look}-{i}\t{created.isoformat()}\t{ALIAS}\t{ROLLOUT_ID}\t{session}\t\t\t\tok\t\tt\tok\t{timings}\t{{}}\n")
    columns = ("request_id", "created_at", "alias", "rollout_id", "session_hash", "prompt_text", "baseline_output",
               "candidate_output", "candidate_outcome", "candidate_error", "texts_stored", "baseline_replay_outcome",
               "baseline_replay_ttft_ms", "baseline_replay_tpot_ms", "baseline_replay_e2e_ms", "candidate_ttft_ms",
               "candidate_tpot_ms", "candidate_e2e_ms", "candidate_completion_tokens", "scores")  # fmt: skip
    with transaction.atomic(), connection.cursor() as cursor:
        with cursor.cursor.copy(f"COPY {ShadowPair._meta.db_table} ({', '.join(columns)}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())


if __name__ == "__main__":
    main()
