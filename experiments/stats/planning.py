"""How many samples a plan needs, shown when a plan is made: statsmodels' power solvers for a fixed-horizon
test, and the sample the rollout's own always-valid bounds need (``sequential_sample_size``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from scipy.stats import norm as _norm
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import proportion_effectsize

from ._checks import check_alpha, check_choice, check_finite, check_positive, smallest_enough

PLAN_KINDS = ("mean", "proportion")
ALTERNATIVES = ("two-sided", "larger", "smaller")


@dataclass(frozen=True, slots=True)
class SampleSizePlan:
    """Samples per arm for a fixed-horizon test to detect ``min_effect``.

    ``effect_size`` is standardised: Cohen's d for means, Cohen's h (arcsine)
    for proportions. A sequential analysis of the same data needs more samples
    at N* to reach the same power; ``total_n`` is a reasonable ``tuning_n``.
    """

    baseline_n: int
    candidate_n: int
    total_n: int
    effect_size: float
    alpha: float
    power: float


def sample_size_per_arm(
    *,
    kind: str,
    baseline_mean: float,
    min_effect: float,
    relative: bool = True,
    baseline_sd: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
    alternative: str = "two-sided",
) -> SampleSizePlan:
    """Samples per arm to detect ``min_effect`` (a fraction of the baseline when ``relative``).

    ``ratio`` is candidate_n / baseline_n (0.05 / 0.95 for a 5 % canary).
    Means need ``baseline_sd`` (assumed the same in both arms); proportions use
    the baseline rate, and ``baseline_mean`` is that rate.
    """
    check_choice("kind", kind, PLAN_KINDS)
    check_choice("alternative", alternative, ALTERNATIVES)
    baseline_mean = check_finite("baseline_mean", baseline_mean)
    min_effect = check_finite("min_effect", min_effect)
    alpha = check_alpha(alpha)
    power = check_alpha(power, "power")
    ratio = check_positive("ratio", ratio)
    if min_effect == 0:
        raise ValueError("min_effect must not be 0: no sample size detects a zero effect")
    absolute = min_effect * baseline_mean if relative else min_effect
    if absolute == 0:
        raise ValueError("baseline_mean must not be 0 with a relative min_effect")
    if kind == "mean":
        if baseline_sd is None:
            raise ValueError("baseline_sd is required for kind='mean'")
        sd = check_positive("baseline_sd", baseline_sd)
        effect_size = absolute / sd
        solver = TTestIndPower()
    else:
        if not (0.0 < baseline_mean < 1.0):
            raise ValueError(
                f"baseline_mean must be a rate in (0, 1) for kind='proportion', got {baseline_mean!r}"
            )
        target = baseline_mean + absolute
        if not (0.0 < target < 1.0):
            raise ValueError(f"baseline_mean + effect must stay in (0, 1), got {target!r}")
        effect_size = float(proportion_effectsize(target, baseline_mean))
        solver = NormalIndPower()
    # statsmodels reads the one-sided alternatives off the sign of the effect size.
    if (alternative == "larger" and effect_size <= 0) or (alternative == "smaller" and effect_size >= 0):
        raise ValueError(f"min_effect has the wrong sign for alternative={alternative!r}")
    signed = abs(effect_size) if alternative == "two-sided" else effect_size
    nobs1 = float(
        solver.solve_power(
            effect_size=signed, nobs1=None, alpha=alpha, power=power, ratio=ratio, alternative=alternative
        )
    )
    baseline_n = math.ceil(nobs1)
    candidate_n = math.ceil(nobs1 * ratio)
    return SampleSizePlan(baseline_n, candidate_n, baseline_n + candidate_n, abs(effect_size), alpha, power)


MIN_TUNING_N = 200


def step_tuning_n(*, candidate_share: float, min_candidate_requests: int) -> float:
    """N* for one rollout step: the total sample (both arms) expected at its decision.

    A step decides once the candidate has ``min_candidate_requests`` (at least 50 are assumed) at its
    ``candidate_share`` of the compared requests (taken as at least 1 %), so the confidence sequence is
    made narrowest there; at least MIN_TUNING_N.
    """
    share = check_finite("candidate_share", candidate_share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"candidate_share must be in [0, 1], got {candidate_share!r}")
    if isinstance(min_candidate_requests, bool) or not isinstance(min_candidate_requests, int) \
            or min_candidate_requests < 0:
        raise ValueError(f"min_candidate_requests must be a non-negative integer, got {min_candidate_requests!r}")
    share = max(share, 0.01)
    return float(max(MIN_TUNING_N, round(max(min_candidate_requests, 50) / share)))


def _search_n(enough: Callable[[int], bool], start: int = 2) -> int:
    found = smallest_enough(enough, start=start)
    if found is None:
        raise ValueError("no sample up to 10^10 is enough: the gap is too small for the spread")
    return found


def sequential_sample_size(
    *,
    variance_baseline: float,
    variance_candidate: float,
    gap: float,
    candidate_share: float,
    alpha: float,
    tuning_n: float,
    power: float = 0.8,
) -> int:
    """Candidate observations at which the always-valid one-sided bound of a guardrail (the rollout's test,
    ``decisions.effect_check``) comes within ``gap`` of the true harm with probability ``power``: with the
    candidate as good as the baseline, ``gap`` is the margin, and this is the sample at which a step can
    expect to show the guardrail safe (advance on evidence). Variances are per observation (per request,
    with the sessions' clustering in them); the baseline gets the rest of the split."""
    from .sequential import one_sided_multiplier

    gap = check_positive("gap", gap)
    share = check_finite("candidate_share", candidate_share)
    if not 0.0 < share < 1.0:
        raise ValueError(f"candidate_share must be in (0, 1), got {candidate_share!r}")
    alpha, power = check_alpha(alpha), check_alpha(power, "power")
    z = float(_norm.ppf(power))
    vb, vc = max(variance_baseline, 0.0), max(variance_candidate, 0.0)

    def enough(n_c: int) -> bool:
        n_b = max(n_c * (1.0 - share) / share, 1.0)
        se = math.sqrt(vb / n_b + vc / n_c)
        k = one_sided_multiplier(n_total=n_c + n_b, alpha=alpha, tuning_n=tuning_n)
        return gap >= (k + z) * se

    return _search_n(enough)


def sequential_one_arm_size(
    *, variance: float, gap: float, alpha: float, tuning_n: float, power: float = 0.8
) -> int:
    """Observations at which a one-arm always-valid bound (an SLO on a mean) comes within ``gap`` of the
    truth with probability ``power``: the sample to show an SLO met when the truth is ``gap`` inside it."""
    from .sequential import one_sided_multiplier

    gap = check_positive("gap", gap)
    alpha, power = check_alpha(alpha), check_alpha(power, "power")
    z = float(_norm.ppf(power))

    def enough(n: int) -> bool:
        return gap >= (one_sided_multiplier(n_total=n, alpha=alpha, tuning_n=tuning_n) + z) * math.sqrt(max(variance, 0.0) / n)

    return _search_n(enough)


def planned_total_n(
    *, variance_baseline: float, variance_candidate: float, gap: float, candidate_share: float, alpha: float,
    power: float = 0.8,
) -> float:
    """Both arms' observations at which a fixed-sample one-sided test at ``alpha`` has ``power`` to show a
    difference ``gap`` from its margin, the candidate getting ``candidate_share``: the normal approximation
    (z_(1 - alpha) + z_power)^2 (v_c + v_b s / (1 - s)) / gap^2 candidate observations, over s.

    What a check's confidence sequence takes as N* (the sample where it is made narrowest) when the plan
    names none: it depends on the check's margin and alpha, not on the data, so it is fixed in advance."""
    gap = check_positive("gap", gap)
    share = check_finite("candidate_share", candidate_share)
    if not 0.0 < share < 1.0:
        raise ValueError(f"candidate_share must be in (0, 1), got {candidate_share!r}")
    alpha, power = check_alpha(alpha), check_alpha(power, "power")
    z = float(_norm.ppf(1.0 - alpha) + _norm.ppf(power))
    n_c = z * z * (max(variance_candidate, 0.0) + max(variance_baseline, 0.0) * share / (1.0 - share)) / (gap * gap)
    return max(float(MIN_TUNING_N), n_c / share)


# What a check's N* assumes when the plan names none: spreads typical of LLM traffic, never the data (N*
# must be fixed before the first look for the sequence to be valid).
ASSUMED_LOG_VARIANCE = 0.5  # a log latency's variance per request, with its sessions' clustering in it
ASSUMED_CV = 0.5  # an arithmetic mean's coefficient of variation
ASSUMED_BAD_SHARE = 0.01  # errors, over-limit requests
ASSUMED_GOOD_SHARE = 0.5  # outcomes better higher (thumbs up)


def margin_tuning_n(
    *, scale: str, margin: float, relative: bool, lower_is_better: bool, candidate_share: float, alpha: float
) -> float | None:
    """N* of a guardrail's sequence: the sample a fixed test of its margin needs (``planned_total_n`` at 80 %
    power, the assumed spreads above), so the bound is narrowest where the guardrail decides. None for an
    absolute margin on a mean, whose scale is not known in advance."""
    if margin <= 0:
        return None
    if scale == "log":
        gap = math.log1p(margin) if lower_is_better else -math.log1p(-margin)
        vb = vc = ASSUMED_LOG_VARIANCE
    elif scale == "proportion":
        p = ASSUMED_BAD_SHARE if lower_is_better else ASSUMED_GOOD_SHARE
        gap = margin * p if relative else margin
        q = min(max(p + (gap if lower_is_better else -gap), 1e-6), 1 - 1e-6)
        vb, vc = p * (1.0 - p), q * (1.0 - q)
    elif relative:
        factor = 1.0 + margin if lower_is_better else 1.0 - margin
        gap, vb, vc = margin, factor * factor * ASSUMED_CV**2, ASSUMED_CV**2
    else:
        return None
    return planned_total_n(variance_baseline=vb, variance_candidate=vc, gap=gap, candidate_share=candidate_share,
                           alpha=alpha)  # fmt: skip


def limit_tuning_n(*, limit: float, alpha: float) -> float:
    """N* of a share's limit (an SLO "error_rate <= 0.01"): the sample at which a candidate halfway inside
    the limit shows it met, at 80 % power with a fixed test."""
    share = limit / 2.0
    z = float(_norm.ppf(1.0 - check_alpha(alpha)) + _norm.ppf(0.8))
    return max(float(MIN_TUNING_N), z * z * share * (1.0 - share) / (limit - share) ** 2)


def breach_tuning_n(tuning_n: float) -> float:
    """N* of a guardrail's breach side (``decisions.effect_check``): where a harm of three margins would be
    caught with the power ``margin_tuning_n`` gives the safe side. A fixed test's sample scales with the
    inverse square of the gap to the margin, and that gap is twice the safe side's (2m against m): a quarter."""
    return max(float(MIN_TUNING_N), check_positive("tuning_n", tuning_n) / 4.0)
