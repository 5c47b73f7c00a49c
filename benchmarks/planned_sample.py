"""Where a step's planned sample falls for a candidate as good as the baseline, without the database: A/A
rollouts of a demo plan through `tests/rollouts/policy_sim.py` (the real checks and the policy's rules on
sticky, heavy-tailed simulated traffic), side by side with the planned samples of the current
`rollouts.planning` and, with `--before`, of another version of that module (the same rollouts, the same
seed; only the planned samples differ). Prints how many rollouts paused (reached a planned sample with a
check still holding), with a Clopper-Pearson 95 % interval.

    git show da90b9f:rollouts/planning.py > /tmp/old_planning.py   # the 80 %-power normal approximation
    .venv/bin/python benchmarks/planned_sample.py --plan adder-slow-demo --metrics tpot_gmean_ms --sims 120 \\
        --looks 330 --look-s 20 --before /tmp/old_planning.py

`--plan canary` is `docs/examples/canary.yaml` (5 % -> 25 % -> 50 % -> 100 %: its first step gets about
1 candidate request/s, so its rollouts need hours of simulated time: `--looks 2700 --look-s 10`, about
10 s of CPU per rollout). `--history-looks` sets how many looks of the baseline alone the planned samples
are estimated from: the simulator's default is 20 minutes (`policy_sim.HISTORY_LOOKS`), the planner's own
window is an hour (`rollouts.planning.HISTORY`: 360 looks of 10 s), in which fewer sessions are cut short
by the window's start, so its spreads are nearer those of a step that lasts hours (whole sessions):

    .venv/bin/python benchmarks/planned_sample.py --plan canary --sims 40 --looks 2700 --look-s 10 --seed 11 \\
        --history-looks 360
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _before(path: Path, plan: Any, seed: int, look_s: float, history_looks: int) -> list[int | None]:
    """The planned samples of another version of rollouts/planning.py, from the same simulated history and
    over the same checks as `policy_sim.planned_samples` (only the module differs)."""
    from tests.rollouts import policy_sim

    spec = importlib.util.spec_from_file_location("planning_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return policy_sim.planned_from(module._step_entry, plan, policy_sim.baseline_history(seed, look_s, history_looks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--plan", default="adder-slow-demo", help="a plan of rollouts.demo.DEMO_PLANS, or canary")
    parser.add_argument("--metrics", default="tpot_gmean_ms,error_rate", help="the checks simulated (tpot_gmean_ms, error_rate)")
    parser.add_argument("--sims", type=int, default=120)
    parser.add_argument("--looks", type=int, default=330)
    parser.add_argument("--look-s", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1802)
    parser.add_argument("--history-looks", type=int, default=None, help="looks of the baseline alone planned from")
    parser.add_argument("--before", type=Path, default=None, help="another version of rollouts/planning.py to compare with")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("SECRET_KEY", "planned-sample-benchmark-key-xxxxxxxxxxxxxxxxxxxxxxxx")
    import django

    django.setup()
    from benchmarks.decision_policy import clopper_pearson
    from experiments.stats.simulation import Effect
    from rollouts.demo import DEMO_PLANS
    from rollouts.plans import plan_normalise, plan_parse
    from tests.rollouts.policy_sim import HISTORY_LOOKS, planned_samples, simulate

    written = plan_parse((REPO / "docs" / "examples" / "canary.yaml").read_text()) if args.plan == "canary" else DEMO_PLANS[args.plan]
    plan = plan_normalise(written)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    looks_before = args.history_looks or HISTORY_LOOKS
    versions = [("now", planned_samples(plan, args.seed, args.look_s, looks_before))]
    if args.before is not None:
        versions.insert(0, (f"before ({args.before.name})", _before(args.before, plan, args.seed, args.look_s, looks_before)))
    print(f"# {args.plan}, A/A, {args.sims} rollouts, a look every {args.look_s:g} s for at most {args.looks}, "
          f"checks on {', '.join(metrics)}; seed {args.seed}; planned from {looks_before} looks of history")  # fmt: skip
    for label, planned in versions:
        ended = simulate(plan, effect=Effect(), seed=args.seed, sims=args.sims, looks=args.looks, look_s=args.look_s,
                         metrics=metrics, planned=planned)  # fmt: skip
        paused = int(ended.paused.sum())
        low, high = clopper_pearson(paused, args.sims)
        print(f"{label}: planned samples {planned}; paused {paused}/{args.sims} ({low:.1%}-{high:.1%}), rolled back "
              f"{int(ended.rolled_back.sum())}, promoted {int(ended.promoted.sum())}", flush=True)  # fmt: skip
        for sim, (step, holding) in sorted(ended.undecided.items()):
            print(f"  rollout {sim}: step {step}'s planned sample reached with {', '.join(holding)} holding")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
