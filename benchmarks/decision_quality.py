"""Decision quality of canary analysis: this engine against Flagger's and Kayenta's rules.

Simulates request streams with known effects, analyses them every interval
with three rules, and prints, per scenario and canary weight, how often each
rule rolled the canary back and how many canary requests it took. Then times
one look of the analysis from the sufficient statistics of 10 million requests.

    python benchmarks/decision_quality.py            # defaults: about 2 minutes on 2 cores
    python benchmarks/decision_quality.py --sims 200 # quicker, noisier

Model of a request: TPOT = 30 ms x lognormal(0, 0.4); an engine error with
probability 1 %. The candidate multiplies TPOT or adds to the error rate.
Each interval (10 s) carries a fixed number of requests, split by the canary
weight. Every rule watches both metrics with the same tolerances: TPOT at most
5 % worse than the baseline, error rate at most 0.5 points worse.

(a) this engine: ``guardrail_check`` on the cumulative sums of both arms, one
    guardrail per metric at alpha / 2 (Bonferroni, so the pair is valid at
    alpha), N* as a rollout step sets it (``step_tuning_n`` for the canary
    weight and the default 50 candidate requests per step); roll back on the
    first breach, promote early once both are safe.
(b) Flagger: each interval, the canary's mean TPOT and error rate over that
    interval against fixed thresholds (baseline's true mean TPOT x 1.05; true
    baseline error rate + 0.5 points); a failing interval adds one failed
    check, the count never resets, and the fifth failed check rolls back.
(c) Kayenta: each interval, Mann-Whitney U of the canary's samples against the
    baseline's from that interval only, at 98 % confidence, per metric; the
    first interval where either metric is significantly higher rolls back.
    TPOT samples are the requests' TPOTs. Kayenta judges metric time series,
    so the error samples are the error rates of 5 equal steps of the interval
    per arm: on per-request 0/1 values the normal approximation of U is far
    too liberal (one error among 15 canary requests against none among 285
    baseline ones gives p = 1e-5), which would make Kayenta look worse than it
    is. (Kayenta classifies on the Hodges-Lehmann interval; the p-value form
    used here is the same test without its effect-size tolerance.)
(c') the same test with the per-look level divided by 2 x looks (Bonferroni
    over every look and both metrics): what Kayenta would need to match (a)'s
    guarantee without a confidence sequence.
(o) the floor: the fewest canary requests at which any rule whose false
    rollbacks stay under alpha / 2 per metric can catch the regression in half
    of the rollouts. It is the first look at which the most powerful test of
    that one look (Neyman-Pearson, told the look, the effect and the spread in
    advance: a z-test on log TPOT, on the error rate) reaches 50 % power; a
    rule that caught it earlier in half the rollouts would be a more powerful
    test at that look. Computed, not simulated.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

# Runnable as a script from a checkout without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.stats import (
    ArmStats,
    Decision,
    Monitor,
    guardrail_check,
    srm_check,
    step_tuning_n,
    tail_slo_check,
)

TPOT_MEDIAN_S = 0.030
TPOT_SIGMA = 0.4
TPOT_MEAN_S = TPOT_MEDIAN_S * float(np.exp(TPOT_SIGMA**2 / 2))
ERROR_RATE = 0.01
TPOT_MARGIN = 0.05  # relative
ERROR_MARGIN = 0.005  # absolute (0.5 points)
FLAGGER_FAILED_CHECKS = 5
KAYENTA_CONFIDENCE = 0.98
KAYENTA_STEPS = 5


@dataclass(frozen=True)
class Scenario:
    name: str
    tpot_factor: float
    error_rate: float
    regression: bool


SCENARIOS = (
    Scenario("A/A", 1.0, ERROR_RATE, False),
    Scenario("TPOT +10%", 1.10, ERROR_RATE, True),
    Scenario("TPOT +25%", 1.25, ERROR_RATE, True),
    Scenario("errors +1 pt", 1.0, ERROR_RATE + 0.01, True),
)
WEIGHTS = (0.05, 0.50)
METHODS = ("(a) this engine", "(b) Flagger", "(c) Kayenta", "(c') Kayenta, Bonferroni")
FLOOR = "(o) floor for any rule valid at alpha"
DEFAULT_STEP_REQUESTS = 50  # rollouts/plans.py: a step's default minimum of candidate requests


@dataclass
class Outcome:
    """Per simulated rollout: the look (1-based) it rolled back at, or 0."""

    rollback_look: np.ndarray
    promoted_look: np.ndarray


def _step_rates(flags: np.ndarray) -> np.ndarray:
    """Per-row rates over KAYENTA_STEPS consecutive, near-equal chunks of the columns."""
    steps = min(KAYENTA_STEPS, flags.shape[1])
    starts = np.linspace(0, flags.shape[1], steps + 1).astype(int)
    sums = np.add.reduceat(flags, starts[:-1], axis=1)
    return sums / np.diff(starts)


def _simulate(
    scenario: Scenario,
    weight: float,
    *,
    sims: int,
    looks: int,
    rate: int,
    alpha: float,
    tuning_n: float,
    seed: int,
) -> dict[str, Outcome]:
    rng = np.random.default_rng(seed)
    n_c = round(rate * weight)
    n_b = rate - n_c
    kayenta_alpha = 1 - KAYENTA_CONFIDENCE
    bonferroni_alpha = alpha / (2 * looks)

    # Cumulative sums per simulated rollout: [sum, sum of squares] for TPOT, error count.
    cum = {arm: np.zeros((sims, 3)) for arm in ("b", "c")}
    outcomes = {m: Outcome(np.zeros(sims, dtype=int), np.zeros(sims, dtype=int)) for m in METHODS}
    flagger_failed = np.zeros(sims, dtype=int)
    ours_active = np.ones(sims, dtype=bool)
    tpot_threshold = TPOT_MEAN_S * (1 + TPOT_MARGIN)
    error_threshold = ERROR_RATE + ERROR_MARGIN

    for look in range(1, looks + 1):
        tpot_b = TPOT_MEDIAN_S * rng.lognormal(0.0, TPOT_SIGMA, size=(sims, n_b))
        tpot_c = scenario.tpot_factor * TPOT_MEDIAN_S * rng.lognormal(0.0, TPOT_SIGMA, size=(sims, n_c))
        err_b = (rng.random((sims, n_b)) < ERROR_RATE).astype(float)
        err_c = (rng.random((sims, n_c)) < scenario.error_rate).astype(float)
        for arm, tpot, err in (("b", tpot_b, err_b), ("c", tpot_c, err_c)):
            cum[arm][:, 0] += tpot.sum(axis=1)
            cum[arm][:, 1] += (tpot * tpot).sum(axis=1)
            cum[arm][:, 2] += err.sum(axis=1)

        # (a) this engine, on cumulative sufficient statistics.
        n_base, n_cand = n_b * look, n_c * look
        ours = outcomes[METHODS[0]]
        for s in np.flatnonzero(ours_active):
            cb, cc = cum["b"][s], cum["c"][s]
            tpot_check = guardrail_check(
                ArmStats(n_base, cb[0], cb[1]),
                ArmStats(n_cand, cc[0], cc[1]),
                margin=TPOT_MARGIN,
                relative=True,
                alpha=alpha / 2,
                tuning_n=tuning_n,
            )
            error_check = guardrail_check(
                ArmStats.from_counts(int(cb[2]), n_base),
                ArmStats.from_counts(int(cc[2]), n_cand),
                kind="proportion",
                margin=ERROR_MARGIN,
                alpha=alpha / 2,
                tuning_n=tuning_n,
            )
            if Decision.BREACH in (tpot_check.decision, error_check.decision):
                ours.rollback_look[s] = look
                ours_active[s] = False
            elif tpot_check.decision is Decision.SAFE and error_check.decision is Decision.SAFE:
                ours.promoted_look[s] = look
                ours_active[s] = False

        # (b) Flagger: thresholds on this interval's canary means, cumulative failed checks.
        flagger = outcomes[METHODS[1]]
        failing = (tpot_c.mean(axis=1) > tpot_threshold) | (err_c.mean(axis=1) > error_threshold)
        active = flagger.rollback_look == 0
        flagger_failed += failing & active
        flagger.rollback_look[active & (flagger_failed >= FLAGGER_FAILED_CHECKS)] = look

        # (c), (c') Kayenta: Mann-Whitney on this interval's samples only.
        worse = np.zeros(sims, dtype=bool)
        worse_strict = np.zeros(sims, dtype=bool)
        for canary, base in ((tpot_c, tpot_b), (_step_rates(err_c), _step_rates(err_b))):
            with np.errstate(invalid="ignore", divide="ignore"):
                test = stats.mannwhitneyu(canary, base, axis=1, method="asymptotic")
            p = np.nan_to_num(test.pvalue, nan=1.0)
            higher = test.statistic > canary.shape[1] * base.shape[1] / 2.0
            worse |= higher & (p < kayenta_alpha)
            worse_strict |= higher & (p < bonferroni_alpha)
        for method, flag in ((METHODS[2], worse), (METHODS[3], worse_strict)):
            kayenta = outcomes[method]
            kayenta.rollback_look[(kayenta.rollback_look == 0) & flag] = look
    return outcomes


def _floor_look(scenario: Scenario, weight: float, *, looks: int, rate: int, alpha: float) -> int:
    """The first look at which the most powerful single-look test at alpha / 2 (one metric's share) has
    50 % power against this scenario's regression; 0 when none within the horizon or no regression."""
    n_c = round(rate * weight)
    n_b = rate - n_c
    z = stats.norm.ppf(1 - alpha / 2)
    for look in range(1, looks + 1):
        nb, nc = n_b * look, n_c * look
        if scenario.tpot_factor != 1.0:
            # log TPOT is normal with a known spread: the test on the difference of log means is the
            # Neyman-Pearson test of "slower by the margin" against "slower by the factor".
            excess = np.log(scenario.tpot_factor) - np.log(1 + TPOT_MARGIN)
            se = TPOT_SIGMA * np.sqrt(1 / nc + 1 / nb)
        else:
            excess = scenario.error_rate - ERROR_RATE - ERROR_MARGIN
            se = np.sqrt(scenario.error_rate * (1 - scenario.error_rate) / nc + ERROR_RATE * (1 - ERROR_RATE) / nb)
        if excess / se >= z:
            return look
    return 0


def _median_requests(rollback_look: np.ndarray, n_c: int, looks: int) -> str:
    # Rollouts that never rolled back count as "later than the horizon".
    never = looks + 1
    values = np.where(rollback_look > 0, rollback_look, never)
    median = float(np.median(values))
    if median >= never:
        return f"> {looks * n_c}"
    return f"{median * n_c:.0f}"


def _format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def _time_one_look(repeats: int, seed: int) -> tuple[float, float, float, float]:
    """Seconds: summing 10M raw requests with numpy; median and p99 of one full look;
    median of one guardrail decision alone."""
    rng = np.random.default_rng(seed)
    n_total = 10_000_000
    n_c = n_total // 20
    tpot = TPOT_MEDIAN_S * rng.lognormal(0.0, TPOT_SIGMA, size=n_total)
    errors = rng.random(n_total) < ERROR_RATE
    start = time.perf_counter()
    arms = {}
    for name, sl in (("baseline", slice(n_c, None)), ("candidate", slice(0, n_c))):
        x = tpot[sl]
        arms[name] = (
            ArmStats(x.size, float(x.sum()), float(np.dot(x, x))),
            ArmStats.from_counts(int(errors[sl].sum()), x.size),
            ArmStats.from_counts(int((x > 0.08).sum()), x.size),
        )
    summing = time.perf_counter() - start
    monitor = Monitor(kind="mean", difference="relative")
    durations = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        (b_tpot, b_err, _), (c_tpot, c_err, c_tail) = arms["baseline"], arms["candidate"]
        srm_check([b_tpot.n, c_tpot.n], [0.95, 0.05])
        guardrail_check(b_tpot, c_tpot, margin=TPOT_MARGIN, relative=True, alpha=0.025)
        guardrail_check(b_err, c_err, kind="proportion", margin=ERROR_MARGIN, alpha=0.025)
        tail_slo_check(c_tail, max_share=0.01)
        monitor.observe(b_tpot, c_tpot)
        durations.append(time.perf_counter() - t0)
    durations.sort()
    single = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        guardrail_check(b_tpot, c_tpot, margin=TPOT_MARGIN, relative=True, alpha=0.025)
        single.append(time.perf_counter() - t0)
    return (
        summing,
        statistics.median(durations),
        durations[int(0.99 * (len(durations) - 1))],
        statistics.median(single),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sims", type=int, default=800, help="simulated rollouts per scenario and weight")
    parser.add_argument("--looks", type=int, default=90, help="analysis intervals per rollout (10 s each)")
    parser.add_argument("--rate", type=int, default=300, help="requests per interval, both arms together")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tuning-n", type=float, default=None,
                        help="N* of the confidence sequence (default: as a rollout step with this canary weight "
                             f"and {DEFAULT_STEP_REQUESTS} candidate requests sets it)")
    parser.add_argument("--timing-repeats", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20240)
    args = parser.parse_args(argv)
    if args.sims < 1 or args.looks < 1 or args.rate < 2:
        parser.error("--sims and --looks must be at least 1, --rate at least 2")

    print(
        f"# decision quality: {args.sims} rollouts per cell, {args.looks} looks of {args.rate} requests, "
        f"alpha={args.alpha}, N*={'per step' if args.tuning_n is None else f'{args.tuning_n:g}'}"
    )
    print(f"# python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    started = time.perf_counter()
    rows = []
    for i, scenario in enumerate(SCENARIOS):
        for j, weight in enumerate(WEIGHTS):
            n_c = round(args.rate * weight)
            tuning_n = args.tuning_n or step_tuning_n(candidate_share=weight,
                                                      min_candidate_requests=DEFAULT_STEP_REQUESTS)
            outcomes = _simulate(
                scenario,
                weight,
                sims=args.sims,
                looks=args.looks,
                rate=args.rate,
                alpha=args.alpha,
                tuning_n=tuning_n,
                seed=args.seed + 100 * i + j,
            )
            for method in METHODS:
                outcome = outcomes[method]
                rolled_back = float(np.mean(outcome.rollback_look > 0))
                promoted = float(np.mean(outcome.promoted_look > 0))
                label = "false rollbacks" if not scenario.regression else "caught"
                rows.append(
                    [
                        scenario.name,
                        f"{weight:.0%}",
                        method,
                        f"{rolled_back:.1%} {label}",
                        _median_requests(outcome.rollback_look, n_c, args.looks),
                        f"{promoted:.1%}" if method == METHODS[0] else "-",
                    ]
                )
            if scenario.regression:
                floor = _floor_look(scenario, weight, looks=args.looks, rate=args.rate, alpha=args.alpha)
                rows.append([scenario.name, f"{weight:.0%}", FLOOR, "-",
                             str(floor * n_c) if floor else f"> {args.looks * n_c}", "-"])
    header = [
        "scenario",
        "canary",
        "method",
        "rolled back",
        "median canary requests to rollback",
        "promoted early",
    ]
    print(_format_table(rows, header))
    print(f"# simulation took {time.perf_counter() - started:.0f} s")

    summing, median, p99, single = _time_one_look(args.timing_repeats, args.seed)
    print()
    print("# one look from the sufficient statistics of 10,000,000 requests (95 % / 5 %):")
    print("#   SRM + TPOT guardrail + error guardrail + tail SLO + monitor update")
    print(
        f"#   median {median * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms over {args.timing_repeats} repeats (target < 10 ms)"
    )
    print(f"#   one guardrail_check alone: median {single * 1e6:.0f} us")
    print(
        f"#   (summing the 10,000,000 raw values with numpy, the database's job, took {summing * 1e3:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
