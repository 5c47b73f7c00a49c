"""Eval run throughput: the held-out adder suite (200 items) against one adder-v1 engine, run by the eval
runner in this process at several concurrencies, and what each scorer costs per item.

    .venv/bin/python benchmarks/evals_runner.py                    # concurrency 1, 4, 8; one round each
    .venv/bin/python benchmarks/evals_runner.py --concurrency 4 --rounds 3

The engine takes one engine slot (tests/support/engines.py). The database and the broker live in a
temporary directory; the demo models come from DEMO_MODELS_DIR (default var/demo-models, built if missing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated concurrencies")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scorers-only", action="store_true", help="only the scorer costs (no engine)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="evals-bench-"))
    os.environ["PLATFORM_VAR_DIR"] = str(tmp)
    os.environ.setdefault("DEMO_MODELS_DIR", str(REPO / "var" / "demo-models"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    from django.conf import settings

    from evals import runner, services
    from evals.scorers import ScoreInput, scorer_build
    from serving.demo_models import DEMO_RECIPES, build_demo_models
    from serving.services import model_version_register

    # Runs are executed here, slice by slice: no worker, so nothing is sent to the broker.
    services.eval_run_enqueue = lambda *, run_id, countdown=None: None  # type: ignore[assignment]
    runner.eval_run_enqueue = lambda *, run_id, countdown=None: None  # type: ignore[assignment]

    recipe = next(r for r in DEMO_RECIPES if r.name == "adder-v1")
    model = build_demo_models(Path(settings.DEMO_MODELS_DIR), recipes=[recipe], log=lambda _: None)[0]
    suite = services.builtin_suites_ensure()[0]
    version = model_version_register(name="adder", version="v1", artifact=str(model.path),
                                     served_model_name=model.served_name)
    if not args.scorers_only:
        run_throughput(args, suite=suite, version=version, model=model, tmp=tmp)

    # The saved model's own greedy answers to the held-out sums (what the engine answers too).
    from serving.demo_models import heldout_sums

    cases = [ScoreInput(output=answer, reference=reference, prompt=prompt)
             for (prompt, reference), answer in zip(heldout_sums(), model.heldout_answers, strict=True)]
    print(f"\nscorer cost per item ({len(cases)} adder-v1 answers; the first call loads what the scorer needs):")
    for spec in ("exact_match", "numeric", {"name": "regex", "params": {"pattern": r"^\d+$"}}, "similarity"):
        scorer = scorer_build(services.scorer_spec_normalise(spec))
        loaded = time.perf_counter()
        scorer(cases[0])
        load_s = time.perf_counter() - loaded
        times = []
        for case in cases:
            t0 = time.perf_counter()
            scorer(case)
            times.append((time.perf_counter() - t0) * 1000)
        name = spec if isinstance(spec, str) else spec["name"]
        print(f"  {name:<12} median {statistics.median(times):8.3f} ms   first call {load_s:6.2f} s")


def run_throughput(args, *, suite, version, model, tmp) -> None:  # type: ignore[no-untyped-def]
    from evals import runner, services
    from evals.models import EvalRun
    from serving.engines.services import engine_claim, engine_ready, engine_start_begin
    from serving.models import EngineWorker
    from serving.services import engine_worker_create
    from tests.support.engines import running_engine

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with running_engine(model_dir=model.path, served_name=model.served_name, log_dir=tmp / "logs") as engine:
        worker = engine_worker_create(model_version=version, driver=EngineWorker.Driver.STATIC, base_url=engine.base_url)
        engine_claim(worker_id=worker.id, agent="bench", ttl_s=3600)
        engine_start_begin(worker_id=worker.id, agent="bench", port=None, base_url=engine.base_url)
        engine_ready(worker_id=worker.id, agent="bench")
        print(f"suite {suite.label}: {suite.item_count} items; engine adder-v1 (vLLM CPU); scorer exact_match")
        print(f"{'concurrency':>11} {'items/s':>8} {'wall s':>7} {'p50 ms':>7} {'p95 ms':>7} {'exact':>6}")
        for concurrency in concurrencies:
            for _ in range(args.rounds):
                run = services.eval_run_create(suite=suite, model_version=version, scorers=["exact_match"],
                                               concurrency=concurrency)
                started = time.perf_counter()
                while not EvalRun.objects.get(pk=run.pk).is_finished:
                    runner.eval_run_execute(run_id=run.pk)
                wall = time.perf_counter() - started
                run.refresh_from_db()
                latency = run.summary["latency_ms"]
                print(f"{concurrency:>11} {run.total / wall:>8.1f} {wall:>7.2f} {latency['p50']:>7.1f} "
                      f"{latency['p95']:>7.1f} {run.summary['scorers']['exact_match']['mean']:>6.3f}")


if __name__ == "__main__":
    main()
