"""Decision quality of canary analysis on traffic that looks real: this engine against Flagger's and
Kayenta's rules.

Simulates rollouts with known effects (`experiments.stats.simulation`: users sticky to an arm, lognormal
requests per user with median 10, a per-user latency factor, a Pareto tail on 2 % of requests, rare errors
that differ by user, a thumbs-up outcome whose rate differs by user, and requests before the rollout
started from the users already active then and from the 60 % who came back within the pre-period, with
the same per-user factor), analyses each every interval with
the rules below, and prints, per scenario and canary weight, how often each rolled the canary back and how
many canary requests it took, beside the floor no valid rule can beat. Then the issue's targets, each with
its verdict, and the time of one look from sufficient statistics.

    python benchmarks/decision_quality.py             # the defaults: about 20 minutes on 2 cores
    python benchmarks/decision_quality.py --sims 100  # quicker, noisier
    python benchmarks/decision_quality.py --no-history  # no requests before the rollout (no such covariate)

Every rule watches the same three guardrails with the same tolerances: TPOT at most 5 % worse than the
baseline, errors at most 0.5 points worse, thumbs-up at most 3 points worse.

(a) this engine: the rollout's checks on the sums over sessions the database computes
    (`ratio_guardrail_check`): TPOT as the ratio of geometric means with the regression adjustment on the
    prompt's length and on the session's TPOT before the rollout (multivariate CUPED, theta pooled),
    errors and thumbs-up by the score test of two shares with the sessions' design effects; alpha split
    over the three (Bonferroni); each guardrail's N* as a rollout sets it (`margin_tuning_n`: where a test
    of its margin decides, and a quarter of that for the breach side, `breach_tuning_n`); roll back at the
    first breach, promote early once all three are safe. Beside it, the sequential sample-ratio check on
    sessions at first exposure.
(b) Flagger: each interval, the canary's own mean TPOT, error rate and thumbs-up rate over that interval
    against fixed thresholds (the baseline's true values with the tolerances); a failing interval adds a
    failed check, the count never resets, the fifth rolls back.
(c) Kayenta: each interval, Mann-Whitney U of the canary against the baseline on that interval's requests
    only, at 98 % confidence, per metric; TPOT per request, errors and thumbs-up as rates of 5 equal parts
    of the interval (Kayenta judges time series; on 0/1 values U's normal approximation is far too liberal).
(c') the same with the per-look level divided by 3 x looks (Bonferroni over looks and metrics).
(o) the floor: the fewest canary requests at which a rule whose false rollbacks stay under alpha / 3 per
    metric can catch the regression in half of the rollouts: the first look at which the one-sided z-test
    of that look, told the look and the effect in advance and knowing the estimator's true spread (measured
    across the simulated rollouts), has 50 % power. Sessions are the units here too: with sticky users no
    rule can know more than the sessions tell. The z-test is on the unadjusted difference, what the rollout's
    own requests tell.
(o') the same floor on the regression-adjusted difference (the prompt's length and the requests before the
    rollout, as (a) adjusts): what a rule that also reads the users' history could reach.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

# Runnable as a script from a checkout without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.stats import (
    Decision,
    breach_tuning_n,
    cuped_ratio_estimates,
    margin_tuning_n,
    ratio_guardrail_check,
    srm_sequential,
    step_tuning_n,
)
from experiments.stats.simulation import Effect, SimLook, Traffic, simulate

TPOT_MARGIN = 0.05  # relative
ERROR_MARGIN = 0.005  # absolute (0.5 points)
THUMBS_MARGIN = 0.03  # absolute (3 points)
CHECKS = 3
FLAGGER_FAILED_CHECKS = 5
KAYENTA_CONFIDENCE = 0.98
KAYENTA_PARTS = 5
DEFAULT_STEP_REQUESTS = 50  # rollouts/plans: a step's default minimum of candidate requests


@dataclass(frozen=True)
class Scenario:
    name: str
    effect: Effect
    regression: bool
    floor_metric: str | None = None  # tpot | errors


SCENARIOS = (
    Scenario("A/A", Effect(), False),
    Scenario("TPOT +10%", Effect(tpot_factor=1.10), True, "tpot"),
    Scenario("TPOT +25%", Effect(tpot_factor=1.25), True, "tpot"),
    Scenario("errors +1 pt", Effect(error_add=0.01), True, "errors"),
)
WEIGHTS = (0.05, 0.50)
DEFAULT_USERS = {0.05: 8000, 0.50: 4000}
METHODS = ("(a) this engine", "(b) Flagger", "(c) Kayenta", "(c') Kayenta, Bonferroni")
FLOOR = "(o) floor for any rule valid at alpha"
FLOOR_ADJUSTED = "(o') floor, with the pre-rollout covariate"


@dataclass
class Outcome:
    rollback_at: np.ndarray  # candidate requests at the rollback, inf when none
    promoted: np.ndarray
    srm_alarm: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def _truth(traffic: Traffic, seed: int) -> dict[str, float]:
    """The baseline's true mean TPOT, error rate and thumbs-up rate (Flagger's fixed thresholds), from a
    large simulated sample."""
    means: dict[str, list[float]] = {"tpot": [], "errors": [], "thumbs": []}
    for look in simulate(traffic.with_(users=20000), Effect(), sims=1, looks=1, weight=0.5, seed=seed, requests=True):
        batch = look.requests
        assert batch is not None
        ok = batch.error == 0
        means["tpot"].append(float(np.exp(batch.log_tpot[ok]).mean()))
        means["errors"].append(float(batch.error.mean()))
        means["thumbs"].append(float(batch.thumbs[ok].mean()))
    return {k: float(np.mean(v)) for k, v in means.items()}


def _parts(values: np.ndarray) -> np.ndarray:
    """Rates of KAYENTA_PARTS near-equal consecutive parts (a time series of the interval)."""
    if values.size < KAYENTA_PARTS:
        return values
    return np.array([part.mean() for part in np.array_split(values, KAYENTA_PARTS)])


def _mann_whitney(cand: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """(U of the candidate, two-sided p) by the normal approximation with the tie correction and continuity
    correction, as scipy.stats.mannwhitneyu(method="asymptotic") computes it (checked against it on start)."""
    m, n = cand.size, base.size
    ordered = np.sort(base)
    u = float((np.searchsorted(ordered, cand, side="left") + np.searchsorted(ordered, cand, side="right")).sum()) / 2.0
    _, counts = np.unique(np.concatenate([cand, base]), return_counts=True)
    total = m + n
    ties = float((counts**3 - counts).sum())
    variance = m * n / 12.0 * ((total + 1) - ties / (total * (total - 1)))
    if variance <= 0:
        return u, 1.0
    z = (abs(u - m * n / 2.0) - 0.5) / math.sqrt(variance)
    return u, float(min(1.0, 2.0 * stats.norm.sf(max(z, 0.0))))


def _kayenta_worse(cand: np.ndarray, base: np.ndarray, level: float, lower_is_better: bool) -> bool:
    if cand.size < 2 or base.size < 2:
        return False
    u, p = _mann_whitney(cand, base)
    higher = u > cand.size * base.size / 2.0
    return bool((higher if lower_is_better else not higher) and p < level)


def _simulate(scenario: Scenario, weight: float, traffic: Traffic, truth: dict[str, float], *, sims: int, looks: int,
              alpha: float, seed: int) -> tuple[dict[str, Outcome], dict[str, list[np.ndarray]], list[float]]:  # fmt: skip
    share = alpha / CHECKS
    # N* as a rollout sets it: per guardrail, where a test of its margin decides (rollouts.analysis.checks).
    n_star = {
        name: margin_tuning_n(scale=scale, margin=margin, relative=name == "tpot", lower_is_better=name != "thumbs",
                              candidate_share=weight, alpha=share) or 1000.0
        for name, scale, margin in (("tpot", "log", TPOT_MARGIN), ("errors", "proportion", ERROR_MARGIN),
                                    ("thumbs", "proportion", THUMBS_MARGIN))
    }  # fmt: skip
    tuning_n = step_tuning_n(candidate_share=weight, min_candidate_requests=DEFAULT_STEP_REQUESTS)
    outcomes = {m: Outcome(np.full(sims, np.inf), np.zeros(sims, dtype=bool)) for m in METHODS}
    outcomes[METHODS[0]].srm_alarm = np.zeros(sims, dtype=bool)
    failed = np.zeros(sims, dtype=int)
    kayenta_levels = {METHODS[2]: 1 - KAYENTA_CONFIDENCE, METHODS[3]: alpha / (CHECKS * looks)}
    estimates: dict[str, list[np.ndarray]] = {"raw": [], "adjusted": []}  # per look, per rollout: the floors' differences
    cand_requests: list[float] = []  # per look: the mean candidate requests so far
    active = np.ones(sims, dtype=bool)
    for look in simulate(traffic, scenario.effect, sims=sims, looks=looks, weight=weight, seed=seed, requests=True):
        base, cand = look.arms["baseline"], look.arms["candidate"]
        ours = outcomes[METHODS[0]]
        for s in range(sims):
            srm = srm_sequential([int(base.units[s]), int(cand.units[s])], [1.0 - weight, weight], tuning_n=tuning_n)
            ours.srm_alarm[s] |= srm.mismatch
            if not active[s]:
                continue
            results = [
                ratio_guardrail_check(base.ratio("tpot_log", s), cand.ratio("tpot_log", s), scale="log",
                                      margin=TPOT_MARGIN, relative=True, alpha=share, tuning_n=n_star["tpot"],
                                      breach_tuning_n=breach_tuning_n(n_star["tpot"])),
                ratio_guardrail_check(base.ratio("errors", s), cand.ratio("errors", s), scale="proportion",
                                      margin=ERROR_MARGIN, relative=False, alpha=share, tuning_n=n_star["errors"],
                                      breach_tuning_n=breach_tuning_n(n_star["errors"])),
                ratio_guardrail_check(base.ratio("thumbs", s), cand.ratio("thumbs", s), scale="proportion",
                                      margin=THUMBS_MARGIN, relative=False, direction="higher_is_better",
                                      alpha=share, tuning_n=n_star["thumbs"], breach_tuning_n=breach_tuning_n(n_star["thumbs"])),
            ]  # fmt: skip
            decisions = {r.decision for r in results}
            if Decision.BREACH in decisions:
                ours.rollback_at[s], active[s] = cand.requests[s], False
            elif decisions == {Decision.SAFE}:
                ours.promoted[s], active[s] = True, False
        _estimate(scenario, look, estimates, sims)
        cand_requests.append(float(cand.requests.mean()))
        _flagger_and_kayenta(look, outcomes, failed, truth, kayenta_levels, sims)
    return outcomes, estimates, cand_requests


def _estimate(scenario: Scenario, look: SimLook, estimates: dict[str, list[np.ndarray]], sims: int) -> None:
    if scenario.floor_metric is None:
        return
    metric = "tpot_log" if scenario.floor_metric == "tpot" else "errors"
    b, c = look.arms["baseline"].metric[metric], look.arms["candidate"].metric[metric]
    with np.errstate(all="ignore"):
        raw = c["num"] / c["den"] - b["num"] / b["den"]
    estimates["raw"].append(raw)
    adjusted = raw.copy()
    if metric == "tpot_log":  # errors are not adjusted (ratio_checks: proportions)
        for s in range(sims):
            base, cand = look.arms["baseline"].ratio(metric, s), look.arms["candidate"].ratio(metric, s)
            if min(base.units, cand.units) >= 2 and min(base.den, cand.den) > 0:
                found = cuped_ratio_estimates(base, cand)
                adjusted[s] = found.candidate.mean - found.baseline.mean
    estimates["adjusted"].append(adjusted)


def _flagger_and_kayenta(look: SimLook, outcomes: dict[str, Outcome], failed: np.ndarray, truth: dict[str, float],
                         levels: dict[str, float], sims: int) -> None:  # fmt: skip
    batch = look.requests
    assert batch is not None
    order = np.argsort(batch.sim, kind="stable")
    bounds = np.searchsorted(batch.sim[order], np.arange(sims + 1))
    for s in range(sims):
        rows = order[bounds[s] : bounds[s + 1]]
        in_cand = batch.candidate[rows]
        series = {}
        for arm, mask in (("c", in_cand), ("b", ~in_cand)):
            picked = rows[mask]
            err = batch.error[picked]
            ok = err == 0
            series[arm] = (np.exp(batch.log_tpot[picked][ok]), err, batch.thumbs[picked][ok])
        tpot_c, err_c, thumbs_c = series["c"]
        # (b) Flagger: this interval's canary means against fixed thresholds; failed checks accumulate.
        flagger = outcomes[METHODS[1]]
        if not math.isfinite(flagger.rollback_at[s]):
            failing = (
                (tpot_c.size and tpot_c.mean() > truth["tpot"] * (1 + TPOT_MARGIN))
                or (err_c.size and err_c.mean() > truth["errors"] + ERROR_MARGIN)
                or (thumbs_c.size and thumbs_c.mean() < truth["thumbs"] - THUMBS_MARGIN)
            )
            failed[s] += bool(failing)
            if failed[s] >= FLAGGER_FAILED_CHECKS:
                flagger.rollback_at[s] = look.arms["candidate"].requests[s]
        # (c), (c') Kayenta: Mann-Whitney on this interval's requests only.
        tpot_b, err_b, thumbs_b = series["b"]
        for method, level in levels.items():
            kayenta = outcomes[method]
            if math.isfinite(kayenta.rollback_at[s]):
                continue
            worse = (
                _kayenta_worse(tpot_c, tpot_b, level, True)
                or _kayenta_worse(_parts(err_c), _parts(err_b), level, True)
                or _kayenta_worse(_parts(thumbs_c), _parts(thumbs_b), level, False)
            )
            if worse:
                kayenta.rollback_at[s] = look.arms["candidate"].requests[s]


def _floor(scenario: Scenario, estimates: list[np.ndarray], cand_requests: list[float], alpha: float) -> float | None:
    """Canary requests at the first look where the oracle z-test at alpha / 3 has 50 % power."""
    if scenario.floor_metric is None:
        return None
    margin = math.log1p(TPOT_MARGIN) if scenario.floor_metric == "tpot" else ERROR_MARGIN
    z = stats.norm.ppf(1 - alpha / CHECKS)
    for values, requests in zip(estimates, cand_requests, strict=True):
        finite = values[np.isfinite(values)]
        if finite.size < 10:
            continue
        spread = finite.std(ddof=1)
        if spread > 0 and (finite.mean() - margin) / spread >= z:
            return requests
    return None


def _check_mann_whitney(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for a, b in ((rng.lognormal(size=40), rng.lognormal(size=300)), (rng.integers(0, 3, 5) / 4, rng.integers(0, 3, 5) / 4)):
        ours = _mann_whitney(a, b)
        theirs = stats.mannwhitneyu(a, b, method="asymptotic")
        if not (math.isclose(ours[0], theirs.statistic) and math.isclose(ours[1], theirs.pvalue, rel_tol=1e-6)):
            raise SystemExit(f"the Mann-Whitney shortcut disagrees with scipy: {ours} against {theirs}")


def _median(values: np.ndarray) -> float:
    return float(np.median(values))  # inf when more than half never rolled back


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def _time_one_look(repeats: int, seed: int) -> tuple[float, float]:
    """Seconds: median and p99 of the three guardrails and the SRM check from one look's sums."""
    look = list(simulate(Traffic(users=20000), Effect(), sims=1, looks=1, weight=0.05, seed=seed))[-1]
    base, cand = look.arms["baseline"], look.arms["candidate"]
    durations = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        srm_sequential([int(base.units[0]), int(cand.units[0])], [0.95, 0.05], tuning_n=1000)
        ratio_guardrail_check(base.ratio("tpot_log", 0), cand.ratio("tpot_log", 0), scale="log", margin=TPOT_MARGIN,
                              relative=True, alpha=0.0167, tuning_n=1000)  # fmt: skip
        ratio_guardrail_check(base.ratio("errors", 0), cand.ratio("errors", 0), scale="proportion", margin=ERROR_MARGIN,
                              relative=False, alpha=0.0167, tuning_n=1000)  # fmt: skip
        ratio_guardrail_check(base.ratio("thumbs", 0), cand.ratio("thumbs", 0), scale="proportion",
                              margin=THUMBS_MARGIN, relative=False, direction="higher_is_better", alpha=0.0167,
                              tuning_n=1000)  # fmt: skip
        durations.append(time.perf_counter() - t0)
    durations.sort()
    return statistics.median(durations), durations[int(0.99 * (len(durations) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sims", type=int, default=200, help="simulated rollouts per scenario and weight")
    parser.add_argument("--looks", type=int, default=40, help="analysis intervals per rollout")
    parser.add_argument("--users", type=int, default=None,
                        help="users per rollout (about 12 requests each within the horizon); default 8000 at a 5 %% "
                             "canary and 4000 at 50 %%, so each weight's regressions fall within the horizon")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--timing-repeats", type=int, default=500)
    parser.add_argument("--seed", type=int, default=20240)
    parser.add_argument("--no-history", action="store_true",
                        help="users have no requests before the rollout (no pre-rollout covariate)")
    args = parser.parse_args(argv)
    if args.sims < 10 or args.looks < 1 or (args.users is not None and args.users < 10):
        parser.error("--sims must be at least 10, --looks at least 1, --users at least 10")

    users = {w: args.users or DEFAULT_USERS[w] for w in WEIGHTS}
    print(f"# decision quality: {args.sims} rollouts per cell, {args.looks} looks, users per rollout "
          f"{', '.join(f'{n} at {w:.0%}' for w, n in users.items())} (sticky; lognormal requests, median 10), "
          f"alpha={args.alpha} split over {CHECKS} guardrails; requests before the rollout: "
          f"{'none' if args.no_history else 'yes'}")  # fmt: skip
    print(f"# python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    _check_mann_whitney(args.seed)
    started = time.perf_counter()
    truth = _truth(Traffic(), args.seed)
    rows: list[list[str]] = []
    verdicts: list[str] = []
    for i, scenario in enumerate(SCENARIOS):
        for j, weight in enumerate(WEIGHTS):
            seed = args.seed + 100 * i + j
            traffic = Traffic(users=users[weight], history=not args.no_history)
            outcomes, estimates, cand_requests = _simulate(scenario, weight, traffic, truth, sims=args.sims,
                                                           looks=args.looks, alpha=args.alpha, seed=seed)  # fmt: skip
            floor = _floor(scenario, estimates["raw"], cand_requests, args.alpha)
            floor_adjusted = _floor(scenario, estimates["adjusted"], cand_requests, args.alpha)
            label = "caught" if scenario.regression else "false rollbacks"
            for method in METHODS:
                outcome = outcomes[method]
                rolled = float(np.mean(np.isfinite(outcome.rollback_at)))
                median = _median(outcome.rollback_at)
                ours = method == METHODS[0]
                rows.append([
                    scenario.name, f"{weight:.0%}", method, f"{rolled:.1%} {label}",
                    f"{median:.0f}" if math.isfinite(median) else f"> {cand_requests[-1]:.0f}",
                    f"{outcome.promoted.mean():.1%}" if ours else "-",
                    f"{outcome.srm_alarm.mean():.1%}" if ours else "-",
                ])  # fmt: skip
                if ours:
                    verdicts += _targets(scenario, weight, rolled, median, outcome.srm_alarm.mean(), floor,
                                         floor_adjusted, args.alpha)  # fmt: skip
            if scenario.regression:
                floors = [(FLOOR, floor)] + ([(FLOOR_ADJUSTED, floor_adjusted)] if scenario.floor_metric == "tpot" else [])
                for name, value in floors:
                    rows.append([scenario.name, f"{weight:.0%}", name, "-",
                                 f"{value:.0f}" if value is not None else f"> {cand_requests[-1]:.0f}", "-", "-"])  # fmt: skip
    header = ["scenario", "canary", "method", "rolled back", "median canary requests to rollback", "promoted early",
              "SRM false alarms"]  # fmt: skip
    print(format_table(rows, header))
    print(f"# simulation took {time.perf_counter() - started:.0f} s")
    print()
    print("# targets (issue 16)")
    for line in verdicts:
        print(f"#   {line}")
    median, p99 = _time_one_look(args.timing_repeats, args.seed)
    print()
    print("# one look from the sums over sessions (3 guardrails + the sample-ratio check), 20,000 users:")
    print(f"#   median {median * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms over {args.timing_repeats} repeats")
    return 0


def _targets(scenario: Scenario, weight: float, rolled: float, median: float, srm: float, floor: float | None,
             floor_adjusted: float | None, alpha: float) -> list[str]:  # fmt: skip
    where = f"{scenario.name} at {weight:.0%}"
    out = [f"{'met' if srm <= 0.01 else 'MISSED'}: {where}: false sample-ratio alarms {srm:.1%} <= 1 %"]
    if not scenario.regression:
        out.append(f"{'met' if rolled <= alpha else 'MISSED'}: {where}: false rollbacks {rolled:.1%} <= alpha {alpha:g}")
    limit = {"TPOT +25%": 1.5, "errors +1 pt": 2.0}.get(scenario.name)
    if limit is not None and floor is not None:
        ratio = median / floor
        out.append(f"{'met' if ratio <= limit else 'MISSED'}: {where}: caught in {median:.0f} canary requests, "
                   f"{ratio:.2f}x the floor's {floor:.0f} (target <= {limit}x)")  # fmt: skip
        if floor_adjusted is not None and floor_adjusted != floor:
            out.append(f"  (against the floor with the pre-rollout covariate, {floor_adjusted:.0f}: "
                       f"{median / floor_adjusted:.2f}x)")  # fmt: skip
    return out


if __name__ == "__main__":
    raise SystemExit(main())
