"""Guardrail, non-inferiority and SLO decisions from always-valid bounds.

The rollout analysis calls these every interval (10 s) on cumulative sums, so
they are plain arithmetic: no scipy call, no raw data.

One-sided bounds. A breach is called when the always-valid one-sided lower
bound of the harm (``sequential.one_sided_multiplier``: the normal-mixture
martingale mixed over the harmful side only) clears the margin; safe when the
one-sided upper bound is within it. Each bound is wrong at some look with
probability at most alpha, and only one of the two decisions can be wrong for a
given truth, so each guardrail's decision is valid at alpha at every look and
every stopping time. ``lower_bound``/``bound`` together form a (1 - 2 alpha)
interval. (An earlier version read both sides of the two-sided (1 - alpha)
sequence, valid too but wider: about 3.0 standard errors at N = N* for
alpha = 0.05, against 2.8 now.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from ._checks import (
    boundary,
    breach_level,
    check_alpha,
    check_choice,
    check_finite,
    check_non_negative,
    check_positive,
)
from .arm import ArmStats
from .estimators import KINDS, ArmEstimate, arm_difference, arm_estimate, check_binary
from .sequential import one_sided_multiplier, one_sided_p_value

DIRECTIONS = ("lower_is_better", "higher_is_better")

# Below this many observations per arm the normal approximation behind the
# asymptotic confidence sequence is not trusted; a mean over a handful of
# requests can even have zero variance, which would make any bound look exact.
DEFAULT_MIN_N = 30


class Decision(StrEnum):
    BREACH = "breach"
    SAFE = "safe"
    UNDECIDED = "undecided"


@dataclass(frozen=True, slots=True)
class GuardrailResult:
    """A guardrail ("candidate no more than ``margin`` worse than baseline").

    ``effect`` and both bounds are on the *harm* scale: positive means the
    candidate is worse, whatever the metric's direction, in the margin's units
    (a fraction of the baseline when ``relative``). ``bound`` is the always-valid
    upper bound on the harm, i.e. "at most this much worse". ``p_value`` is the
    always-valid p-value against "harm <= margin": small means evidence of a breach.
    """

    decision: Decision
    effect: float
    bound: float
    lower_bound: float
    margin: float
    p_value: float
    kind: str
    relative: bool
    direction: str
    alpha: float
    baseline_n: int
    candidate_n: int
    reason: str
    # While undecided: by how much the sample (both arms in proportion) must grow before the bound can clear
    # the margin, if the estimate and the spread stay as they are; None when decided, or when the estimate
    # sits on the margin (then no amount of data decides).
    growth: float | None = None


@dataclass(frozen=True, slots=True)
class SloResult:
    """One arm's metric against an absolute limit, with always-valid bounds.

    For a tail SLO ``estimate`` is the share of requests over the latency
    threshold and ``limit`` the allowed share (0.01 for a p99 objective).
    """

    decision: Decision
    estimate: float
    lower_bound: float
    upper_bound: float
    limit: float
    p_value: float
    direction: str
    alpha: float
    n: int
    reason: str
    growth: float | None = None  # as GuardrailResult.growth


def _decide_harm(lower: float, upper: float, margin: float) -> tuple[Decision, str]:
    if lower > margin:
        return Decision.BREACH, f"the candidate is worse than the margin: harm >= {lower:.6g} > {margin:.6g}"
    if upper <= margin:
        return Decision.SAFE, f"the candidate is within the margin: harm <= {upper:.6g} <= {margin:.6g}"
    return Decision.UNDECIDED, f"the interval [{lower:.6g}, {upper:.6g}] contains the margin {margin:.6g}"


def _smoothed_proportion(arm: ArmStats, role: str, pseudo: float) -> ArmEstimate:
    check_binary(role, arm)
    p = arm.sum / arm.n
    # Variance at the Wilson centre (x + c / 2) / (n + c), c the squared
    # multiplier of the sequence (Wilson 1927 with z^2 = c): with no errors yet
    # the plain p(1 - p) is 0 and would call a candidate "safe" on a handful
    # of requests, and with a few errors it is still far too small. For many
    # errors the centre tends to x / n, so this agrees with DESIGN.md's p(1 - p).
    # The point estimate stays x / n.
    centre = (arm.sum + pseudo / 2.0) / (arm.n + pseudo)
    return ArmEstimate(p, centre * (1.0 - centre), arm.n)


def guardrail_check(
    baseline: ArmStats,
    candidate: ArmStats,
    *,
    kind: str = "mean",
    margin: float,
    relative: bool = False,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    min_n: int = DEFAULT_MIN_N,
) -> GuardrailResult:
    """Decide a guardrail / non-inferiority test from cumulative sufficient statistics.

    Breach when the whole always-valid interval of the harm lies above
    ``margin``; safe (non-inferior) when it lies at or below it; undecided
    otherwise. ``margin >= 0`` is the tolerated harm: 0.10 with
    ``relative=True`` is "TPOT not more than 10 % worse", 0.005 with
    ``kind="proportion"`` is "error rate not more than 0.5 points worse".
    For several guardrails at once, pass alpha / k to each (Bonferroni), or run
    Holm on their ``p_value`` fields.
    """
    check_choice("kind", kind, KINDS)
    check_choice("direction", direction, DIRECTIONS)
    margin = check_non_negative("margin", margin)
    alpha = check_alpha(alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    if not isinstance(relative, bool):
        raise ValueError(f"relative must be True or False, got {relative!r}")
    if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 2:
        raise ValueError(f"min_n must be an integer of at least 2, got {min_n!r}")
    for role, arm in (("baseline", baseline), ("candidate", candidate)):
        if not isinstance(arm, ArmStats):
            raise ValueError(f"{role} must be an ArmStats, got {type(arm).__name__}")

    def undecided(reason: str) -> GuardrailResult:
        return GuardrailResult(
            Decision.UNDECIDED, math.nan, math.inf, -math.inf, margin, 1.0, kind, relative, direction, alpha,
            baseline.n, candidate.n, reason,
        )  # fmt: skip

    if min(baseline.n, candidate.n) < min_n:
        return undecided(f"fewer than min_n={min_n} observations in an arm")
    n_total: float = baseline.n + candidate.n
    if kind == "proportion":
        pseudo = one_sided_multiplier(n_total=n_total, alpha=alpha, tuning_n=tuning_n) ** 2
        base_est = _smoothed_proportion(baseline, "baseline", pseudo)
        cand_est = _smoothed_proportion(candidate, "candidate", pseudo)
    else:
        base_est = arm_estimate(baseline, kind=kind, role="baseline")
        cand_est = arm_estimate(candidate, kind=kind, role="candidate")
    if relative and base_est.mean <= 0:
        return undecided("baseline mean is not positive, so a relative margin is undefined")

    return difference_check(
        base_est, cand_est, margin=margin, relative=relative, direction=direction, alpha=alpha, tuning_n=tuning_n,
        n_total=n_total, kind=kind,
    )  # fmt: skip


def growth_to_decide(*, gap: float, variance: float, n_total: float, alpha: float, tuning_n: float) -> float | None:
    """The factor f >= 1 by which the sample must grow (every arm in proportion) for a bound k(N f) se / sqrt(f)
    to come within ``gap`` of the estimate, the estimate and the spread staying as they are. None when the gap
    is 0 (the estimate on the margin: no sample decides) or more than a million times the sample is needed."""
    if not (gap > 0 and math.isfinite(gap)):
        return None
    se = math.sqrt(max(variance, 0.0))

    def short(f: float) -> bool:
        return one_sided_multiplier(n_total=n_total * f, alpha=alpha, tuning_n=tuning_n) * se / math.sqrt(f) > gap

    if not short(1.0):
        return 1.0
    if short(1e6):
        return None
    # k(N f) / sqrt(f) falls as f grows (k grows like sqrt(log f)).
    return boundary(lambda f: not short(f), before=1.0, past=1e6, geometric=True)[1]


def difference_check(
    baseline: ArmEstimate,
    candidate: ArmEstimate,
    *,
    margin: float,
    relative: bool = False,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    n_total: float | None = None,
    kind: str = "mean",
) -> GuardrailResult:
    """The guardrail decision from two arms' estimates (any kind: means, proportions, ratios over sessions).

    ``n_total`` is the "time" of the confidence sequence (both arms' observations; requests for ratios over
    sessions, whose variance is the sessions' own); the arms' n by default."""
    n_total = n_total if n_total is not None else baseline.n + candidate.n
    diff = arm_difference(baseline, candidate, relative=relative, t_reference=False)
    return effect_check(
        diff.effect, diff.variance, margin=margin, relative=relative, direction=direction, alpha=alpha,
        tuning_n=tuning_n, n_total=n_total, kind=kind, baseline_n=baseline.n, candidate_n=candidate.n,
    )  # fmt: skip


def effect_check(
    effect: float,
    variance: float,
    *,
    margin: float,
    relative: bool = False,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    n_total: float,
    kind: str = "mean",
    baseline_n: int = 0,
    candidate_n: int = 0,
    project: bool = False,
    breach_tuning_n: float | None = None,
    breach_alpha: float | None = None,
) -> GuardrailResult:
    """The guardrail decision on an effect (candidate - baseline, or a combination of per-step ones) with
    the given squared standard error; ``project`` fills ``growth`` while undecided (a search: costly).

    The lower bound (which calls a breach) and the upper bound (which calls the candidate safe) are two
    one-sided sequences, each valid at its own level, so each may have its own N* and its own alpha:
    ``breach_tuning_n`` for the lower one (by default ``tuning_n``), smaller, so a regression well past the
    margin is caught early, while the upper one is narrowest where a candidate as good as the baseline can be
    shown safe; ``breach_alpha`` for the lower one (by default ``alpha``): a false breach then has chance at
    most ``breach_alpha``, a false pass at most ``alpha`` (a rollout gives half of a guardrail's breach side
    to its check on the bake alone, ``rollouts.plans.alpha``). ``p_value`` is the lower sequence's."""
    check_choice("direction", direction, DIRECTIONS)
    margin = check_non_negative("margin", margin)
    alpha = check_alpha(alpha)
    breach_a = breach_level(alpha, breach_alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    breach_n = check_positive("breach_tuning_n", breach_tuning_n) if breach_tuning_n is not None else tuning_n
    n_total = check_positive("n_total", n_total)
    se = math.sqrt(variance)
    harm = effect if direction == "lower_is_better" else -effect
    lower = harm - se * one_sided_multiplier(n_total=n_total, alpha=breach_a, tuning_n=breach_n)
    upper = harm + se * one_sided_multiplier(n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    p_value = one_sided_p_value(effect=harm, variance=variance, n_total=n_total, alpha=breach_a, tuning_n=breach_n,
                                null=margin)  # fmt: skip
    decision, reason = _decide_harm(lower, upper, margin)
    growth = None
    if decision is Decision.UNDECIDED and project:
        growth = growth_to_decide(gap=abs(harm - margin), variance=variance, n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    return GuardrailResult(
        decision, harm, upper, lower, margin, p_value, kind, relative, direction, alpha,
        baseline_n, candidate_n, reason, growth,
    )  # fmt: skip


def _decide_limit(lower: float, upper: float, limit: float, direction: str) -> tuple[Decision, str]:
    if direction == "lower_is_better":
        if lower > limit:
            return Decision.BREACH, f"above the limit: >= {lower:.6g} > {limit:.6g}"
        if upper <= limit:
            return Decision.SAFE, f"within the limit: <= {upper:.6g} <= {limit:.6g}"
    else:
        if upper < limit:
            return Decision.BREACH, f"below the limit: <= {upper:.6g} < {limit:.6g}"
        if lower >= limit:
            return Decision.SAFE, f"within the limit: >= {lower:.6g} >= {limit:.6g}"
    return Decision.UNDECIDED, f"the interval [{lower:.6g}, {upper:.6g}] contains the limit {limit:.6g}"


def tail_slo_check(
    exceedances: ArmStats,
    *,
    max_share: float = 0.01,
    alpha: float = 0.05,
    tuning_n: float = 5000,
) -> SloResult:
    """A tail objective ("p99 TTFT <= 800 ms") as a share of requests over the threshold.

    ``exceedances`` holds one 0/1 value per request (1 = over the latency
    threshold), e.g. ``ArmStats.from_counts(over, n)``; ``max_share`` is the
    allowed share (0.01 for p99). The bounds invert the mixture test with the
    variance p(1 - p) taken at each candidate share p rather than estimated, a
    Wilson-style interval: it stays honest when no request has been over the
    threshold yet, where the plug-in variance would be 0.
    """
    if not isinstance(exceedances, ArmStats):
        raise ValueError(f"exceedances must be an ArmStats, got {type(exceedances).__name__}")
    max_share = check_finite("max_share", max_share)
    if not (0.0 < max_share < 1.0):
        raise ValueError(f"max_share must be in (0, 1), got {max_share!r}")
    alpha = check_alpha(alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    n = exceedances.n
    if n < 2:
        raise ValueError(f"exceedances.n must be at least 2, got {n}")
    check_binary("exceedances", exceedances)
    share = exceedances.sum / n
    # Solve (share - p)^2 <= c p (1 - p) / n for p, c the squared multiplier.
    c = one_sided_multiplier(n_total=n, alpha=alpha, tuning_n=tuning_n) ** 2
    denominator = 1.0 + c / n
    centre = (share + c / (2.0 * n)) / denominator
    spread = math.sqrt(c * share * (1.0 - share) / n + c * c / (4.0 * n * n)) / denominator
    lower, upper = max(centre - spread, 0.0), min(centre + spread, 1.0)
    p_value = one_sided_p_value(
        effect=share, variance=max_share * (1.0 - max_share) / n, n_total=n, alpha=alpha, tuning_n=tuning_n,
        null=max_share,
    )
    decision, reason = _decide_limit(lower, upper, max_share, "lower_is_better")
    return SloResult(decision, share, lower, upper, max_share, p_value, "lower_is_better", alpha, n, reason)


def mean_slo_check(
    arm: ArmStats,
    *,
    threshold: float,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    min_n: int = DEFAULT_MIN_N,
) -> SloResult:
    """One arm's mean against an absolute threshold ("mean TPOT <= 50 ms").

    Uses the one-sample confidence sequence (N = n, V = s^2 / n).
    """
    if not isinstance(arm, ArmStats):
        raise ValueError(f"arm must be an ArmStats, got {type(arm).__name__}")
    threshold = check_finite("threshold", threshold)
    check_choice("direction", direction, DIRECTIONS)
    alpha = check_alpha(alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 2:
        raise ValueError(f"min_n must be an integer of at least 2, got {min_n!r}")
    if arm.n < 2:
        raise ValueError(f"arm.n must be at least 2, got {arm.n}")
    if arm.n < min_n:
        return SloResult(
            Decision.UNDECIDED, arm.mean, -math.inf, math.inf, threshold, 1.0, direction, alpha, arm.n,
            f"fewer than min_n={min_n} observations",
        )  # fmt: skip
    return estimate_limit_check(
        arm.mean, arm.variance / arm.n, threshold=threshold, direction=direction, alpha=alpha, tuning_n=tuning_n,
        n_total=arm.n, n=arm.n,
    )  # fmt: skip


def estimate_limit_check(
    estimate: float,
    variance: float,
    *,
    threshold: float,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    n_total: float,
    n: int = 0,
    project: bool = False,
    breach_alpha: float | None = None,
) -> SloResult:
    """One arm's estimate (squared standard error ``variance``) against an absolute threshold, on the
    one-sample confidence sequence with "time" ``n_total``. ``breach_alpha`` (by default ``alpha``): the
    alpha of the bound that calls a breach (the lower one when lower is better), as ``effect_check``'s;
    the p-value is that bound's."""
    check_choice("direction", direction, DIRECTIONS)
    alpha = check_alpha(alpha)
    breach_a = breach_level(alpha, breach_alpha)
    se = math.sqrt(max(variance, 0.0))
    safe_width = se * one_sided_multiplier(n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    breach_width = se * one_sided_multiplier(n_total=n_total, alpha=breach_a, tuning_n=tuning_n)
    if direction == "lower_is_better":
        lower, upper = estimate - breach_width, estimate + safe_width
    else:
        lower, upper = estimate - safe_width, estimate + breach_width
    beyond, null = (estimate, threshold) if direction == "lower_is_better" else (-estimate, -threshold)
    p_value = one_sided_p_value(effect=beyond, variance=variance, n_total=n_total, alpha=breach_a, tuning_n=tuning_n,
                                null=null)  # fmt: skip
    decision, reason = _decide_limit(lower, upper, threshold, direction)
    growth = None
    if decision is Decision.UNDECIDED and project:
        growth = growth_to_decide(gap=abs(estimate - threshold), variance=variance, n_total=n_total, alpha=alpha,
                                  tuning_n=tuning_n)  # fmt: skip
    return SloResult(decision, estimate, lower, upper, threshold, p_value, direction, alpha, n, reason, growth)
