"""Guardrails on request metrics over sessions: the candidate at most a margin worse than the baseline.

Each arm's metric is a ratio over its sessions (``clustered.RatioStats``) with the cluster-robust variance;
the decision is the one-sided always-valid bound of ``decisions.difference_check`` (the normal mixture of
``sequential``), whose "time" is the number of requests measured in both arms. Three scales:

- ``log``: latencies, by default. a_i sums the logs of the session's latencies, so each arm's ratio is its
  mean log latency and the difference exp'd is the ratio of geometric means. The margin is relative
  (10 % is ln 1.1 on the log scale). Heavy right tails (a busy CPU, a slow tenant) weigh far less than on
  the arithmetic mean, which is why a regression decides in a fraction of the requests.
- ``mean``: the arithmetic mean (a metric named ``*_arith_ms`` / cost): a relative margin is tested as
  a difference against the baseline scaled by (1 + margin), Fieller's way, which stays decisive where the
  delta method's ratio variance (the baseline's variance times the squared ratio) would not.
- ``proportion``: errors, goodput, outcome shares. An absolute margin is decided by the score test of the
  difference of two shares (Farrington and Manning), inverted into bounds (Miettinen and Nurminen): the
  variance is taken at the shares the margin implies, not at the observed ones, so no errors yet in a
  handful of requests is not certainty and a few errors are not a breach; the sessions' clustering enters
  as each arm's design effect. A relative margin uses the delta method with the per-request variance
  never below the binomial one at the Wilson centre (x + c/2) / (n + c), c the squared multiplier.

Regression adjustment (CUPED) on pre-treatment covariates (the prompt's length as the gateway received
it, and the same metric over the session's requests before the rollout started: ``clustered``, theta
pooled across arms) applies to the ``log`` and ``mean`` scales on those both arms carry; the result says
which it used and how much variance it removed. Proportions are left unadjusted: the smoothing floor above, not the sample variance, sets their
bounds while errors are rare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._checks import boundary, breach_level, check_alpha, check_choice, check_non_negative, check_positive
from .clustered import CupedRatio, RatioStats, cuped_ratio_estimates, ratio_estimate
from .decisions import DIRECTIONS, Decision, SloResult, effect_check, estimate_limit_check
from .estimators import ArmEstimate, arm_difference
from .proportions import ShareStratum, difference_bounds, difference_score
from .sequential import always_valid_p_value, half_width, one_sided_multiplier, one_sided_p_value

SCALES = ("log", "mean", "proportion")
# Below this many sessions in an arm the normal approximation behind the asymptotic confidence sequence is
# not trusted (a variance from a handful of sessions can be near zero).
DEFAULT_MIN_UNITS = 30


@dataclass(frozen=True, slots=True)
class RatioGuardrailResult:
    """A guardrail over sessions. ``harm``, ``harm_low``, ``harm_high`` and ``margin`` are on the margin's
    scale (a fraction of the baseline when relative), positive meaning worse whatever the direction;
    [harm_low, harm_high] is the (1 - 2 alpha) interval whose one-sided ends decide. ``baseline`` and
    ``candidate`` are the arms' estimates on the metric's own scale (geometric means on ``log``), adjusted
    when ``theta`` is not 0. ``growth`` as ``GuardrailResult.growth``."""

    decision: Decision
    scale: str
    harm: float
    harm_low: float
    harm_high: float
    margin: float
    relative: bool
    p_value: float
    baseline: float
    candidate: float
    baseline_units: int
    candidate_units: int
    baseline_requests: float
    candidate_requests: float
    theta: float
    variance_reduction: float
    growth: float | None
    reason: str
    covariates: tuple[str, ...] = ()


def _wilson_floor(stats: RatioStats, estimate: ArmEstimate, pseudo: float) -> ArmEstimate:
    share = stats.num / stats.den
    if not -1e-9 <= share <= 1.0 + 1e-9:
        raise ValueError(f"a proportion's share must be in [0, 1], got {share!r}")
    centre = (stats.num + pseudo / 2.0) / (stats.den + pseudo)
    floor = centre * (1.0 - centre) * stats.units / stats.den
    return ArmEstimate(estimate.mean, max(estimate.variance, floor), estimate.n)


def _estimates(
    baseline: RatioStats, candidate: RatioStats, *, cuped: bool
) -> tuple[ArmEstimate, ArmEstimate, CupedRatio | None]:
    if cuped and baseline.has_covariate and candidate.has_covariate:
        adjusted = cuped_ratio_estimates(baseline, candidate)
        return adjusted.baseline, adjusted.candidate, adjusted
    return ratio_estimate(baseline, role="baseline"), ratio_estimate(candidate, role="candidate"), None


@dataclass(frozen=True, slots=True)
class _Stratum:
    effect: float
    variance: float
    variance_unadjusted: float
    weight: float
    requests: float
    theta: float
    covariates: tuple[str, ...] = ()


def _strata(values: RatioStats | Sequence[RatioStats], role: str) -> list[RatioStats]:
    found = [values] if isinstance(values, RatioStats) else list(values)
    if not found:
        raise ValueError(f"{role} must be a RatioStats or a non-empty sequence of them (one per step)")
    for arm in found:
        if not isinstance(arm, RatioStats):
            raise ValueError(f"{role} must hold RatioStats, got {type(arm).__name__}")
    return found


def _pooled(arms: Sequence[RatioStats]) -> RatioStats:
    if len(arms) == 1:
        return arms[0]
    total = RatioStats.empty()
    for arm in arms:
        total = total + arm
    return total


def _combine(
    eligible: Sequence[tuple[RatioStats, RatioStats]], *, scale: str, relative: bool, factor: float, cuped: bool,
    pseudo: float,
) -> tuple[float, float, float, float, tuple[str, ...]] | None:  # fmt: skip
    """The strata's differences averaged with the CMH weights: (effect, variance, variance reduction by the
    regression adjustment, mean theta, the covariates any stratum adjusted on); None when no stratum can
    give one."""
    strata: list[_Stratum] = []
    rel = relative and scale != "log" and factor == 1.0
    for b, c in eligible:
        if scale == "proportion":
            b_est = _wilson_floor(b, ratio_estimate(b, role="baseline"), pseudo)
            c_est = _wilson_floor(c, ratio_estimate(c, role="candidate"), pseudo)
            plain_var, theta = None, 0.0
            used: tuple[str, ...] = ()
        else:
            scaled = b.scaled(factor) if factor != 1.0 else b
            b_est, c_est, adjusted = _estimates(scaled, c, cuped=cuped)
            theta = adjusted.theta if adjusted is not None else 0.0
            used = adjusted.covariates if adjusted is not None else ()
            plain_var = None
            if adjusted is not None:
                plain_var = arm_difference(ratio_estimate(scaled), ratio_estimate(c), relative=rel, t_reference=False).variance
        if rel and b_est.mean <= 0:
            continue
        diff = arm_difference(b_est, c_est, relative=rel, t_reference=False)
        weight = b.den * c.den / (b.den + c.den)
        strata.append(_Stratum(diff.effect, diff.variance, plain_var if plain_var is not None else diff.variance,
                               weight, b.den + c.den, theta, used))  # fmt: skip
    if not strata:
        return None
    total_weight = sum(s.weight for s in strata)
    effect = sum(s.weight * s.effect for s in strata) / total_weight
    variance = sum(s.weight**2 * s.variance for s in strata) / total_weight**2
    before = sum(s.weight**2 * s.variance_unadjusted for s in strata) / total_weight**2
    reduction = 1.0 - variance / before if before > 0 else 0.0
    theta = sum(s.weight * s.theta for s in strata) / total_weight
    used = tuple(p for p in ("cov", "pre") if any(p in s.covariates for s in strata))
    return effect, variance, reduction, theta, used


@dataclass(frozen=True, slots=True)
class RatioComparison:
    """Candidate against baseline on a metric over sessions, both ways (a report, not a decision): ``effect``
    is candidate / baseline - 1 on ``log`` and relative means (the ratio of geometric means on ``log``),
    candidate - baseline otherwise; [low, high] its two-sided always-valid interval at alpha; ``p_value``
    the always-valid p-value of no difference; ``chance_better`` the normal posterior's chance (flat prior)
    that the candidate is better in the metric's direction."""

    effect: float
    low: float
    high: float
    p_value: float
    chance_better: float
    baseline: float
    candidate: float
    baseline_units: int
    candidate_units: int
    variance_reduction: float


def ratio_comparison(
    baseline: RatioStats | Sequence[RatioStats],
    candidate: RatioStats | Sequence[RatioStats],
    *,
    scale: str,
    relative: bool,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    cuped: bool = True,
    min_units: int = DEFAULT_MIN_UNITS,
) -> RatioComparison | None:
    """The two-sided comparison of an exploratory metric, strata as in ``ratio_guardrail_check``; None when
    no stratum has ``min_units`` sessions in both arms."""
    check_choice("scale", scale, SCALES)
    check_choice("direction", direction, DIRECTIONS)
    alpha = check_alpha(alpha)
    bases, cands = _strata(baseline, "baseline"), _strata(candidate, "candidate")
    eligible = [(b, c) for b, c in zip(bases, cands, strict=True)
                if min(b.units, c.units) >= min_units and min(b.den, c.den) > 0]  # fmt: skip
    if not eligible:
        return None
    n_total = sum(b.den + c.den for b, c in eligible)
    pseudo = one_sided_multiplier(n_total=n_total, alpha=alpha, tuning_n=tuning_n) ** 2
    combined = _combine(eligible, scale=scale, relative=relative and scale != "log", factor=1.0, cuped=cuped, pseudo=pseudo)
    if combined is None:
        return None
    effect, variance, reduction, _, _ = combined
    width = half_width(variance=variance, n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    p_value = always_valid_p_value(effect=effect, variance=variance, n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    z = effect / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, effect) if effect else 0.0
    chance = 0.5 * math.erfc(z / math.sqrt(2.0)) if direction == "lower_is_better" else 0.5 * math.erfc(-z / math.sqrt(2.0))
    low, high = effect - width, effect + width
    pooled_b, pooled_c = _pooled(bases), _pooled(cands)
    base_value, cand_value = pooled_b.ratio, pooled_c.ratio
    if scale == "log":
        effect, low, high = math.expm1(effect), math.expm1(low), math.expm1(high)
        base_value, cand_value = math.exp(base_value), math.exp(cand_value)
    return RatioComparison(effect, low, high, p_value, chance, base_value, cand_value, pooled_b.units, pooled_c.units, reduction)


def ratio_guardrail_check(
    baseline: RatioStats | Sequence[RatioStats],
    candidate: RatioStats | Sequence[RatioStats],
    *,
    scale: str,
    margin: float,
    relative: bool,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    cuped: bool = True,
    min_units: int = DEFAULT_MIN_UNITS,
    breach_tuning_n: float | None = None,
    breach_alpha: float | None = None,
) -> RatioGuardrailResult:
    """Decide "candidate at most ``margin`` worse than baseline" on a metric over sessions (module docstring).

    ``breach_tuning_n`` and ``breach_alpha``: the N* and the alpha of the lower bound, which calls a breach
    (``decisions.effect_check``; by default ``tuning_n`` and ``alpha``). The upper bound, which calls the
    candidate safe, stays at ``alpha`` and ``tuning_n``.

    ``baseline`` and ``candidate`` may be sequences, one entry per stratum (a rollout's steps, whose weights
    and traffic differ): the arms are compared within each stratum that has ``min_units`` sessions in both,
    and the strata's differences are averaged with the weights n_b n_c / (n_b + n_c) of their requests (the
    Cochran-Mantel-Haenszel weights, which depend on the counts only), so a change of split between steps
    cannot bias the comparison (Simpson's paradox); the variance is the weighted sum of the strata's."""
    check_choice("scale", scale, SCALES)
    check_choice("direction", direction, DIRECTIONS)
    margin = check_non_negative("margin", margin)
    alpha = check_alpha(alpha)
    breach_a = breach_level(alpha, breach_alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    if scale == "log" and not relative:
        raise ValueError("the log scale compares geometric means: give the margin as relative (10 % worse)")
    if relative and direction == "higher_is_better" and margin >= 1:
        raise ValueError(f"a relative margin for a higher-is-better metric must be below 1, got {margin!r}")
    bases, cands = _strata(baseline, "baseline"), _strata(candidate, "candidate")
    if len(bases) != len(cands):
        raise ValueError(f"baseline and candidate need one entry per stratum, got {len(bases)} and {len(cands)}")
    lower_is_better = direction == "lower_is_better"
    pooled_b, pooled_c = _pooled(bases), _pooled(cands)

    def result(decision: Decision, reason: str, **values: Any) -> RatioGuardrailResult:
        return _result(pooled_b, pooled_c, scale, margin, relative, decision, reason, values)

    eligible = [(b, c) for b, c in zip(bases, cands, strict=True)
                if min(b.units, c.units) >= min_units and min(b.den, c.den) > 0]  # fmt: skip
    if not eligible:
        growth = None
        if pooled_b.units and pooled_c.units:
            growth = max(min_units / pooled_c.units, min_units / pooled_b.units, 1.0)
        return result(Decision.UNDECIDED, f"fewer than {min_units} sessions in an arm", growth=growth)
    n_total = sum(b.den + c.den for b, c in eligible)
    factor = (1.0 + margin if lower_is_better else 1.0 - margin) if scale == "mean" and relative else 1.0
    if scale == "mean" and relative and pooled_b.ratio <= 0:
        return result(Decision.UNDECIDED, "the baseline's mean is not positive, so a relative margin is undefined")
    if scale == "proportion" and relative and pooled_b.num <= 0:
        return result(Decision.UNDECIDED, "no events in the baseline yet, so a relative margin is undefined")

    multiplier = one_sided_multiplier(n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    breach_n = breach_tuning_n if breach_tuning_n is not None else tuning_n
    if scale == "proportion" and not relative:
        breach_k = one_sided_multiplier(n_total=n_total, alpha=breach_a, tuning_n=breach_n)
        return _share_difference(eligible, pooled_b, pooled_c, margin, direction, (breach_k, multiplier), n_total,
                                 breach_a, breach_n, result)  # fmt: skip
    combined = _combine(eligible, scale=scale, relative=relative, factor=factor, cuped=cuped, pseudo=multiplier**2)
    if combined is None:
        return result(Decision.UNDECIDED, "no step with events in the baseline yet, so a relative margin is undefined")
    effect, variance, reduction, theta, used = combined

    if scale == "log":
        log_margin = math.log1p(margin) if lower_is_better else -math.log1p(-margin)
        check = effect_check(
            effect, variance, margin=log_margin, direction=direction, alpha=alpha, tuning_n=tuning_n,
            n_total=n_total, kind="mean", baseline_n=pooled_b.units, candidate_n=pooled_c.units,
            breach_tuning_n=breach_n, breach_alpha=breach_a,
        )  # fmt: skip

        def shown(h: float) -> float:
            # Harm on the log scale back to "this much worse than the baseline", as a fraction.
            if not math.isfinite(h):
                return h
            return math.expm1(h) if lower_is_better else -math.expm1(-h)

        return result(
            check.decision, _readable(check.decision, shown(check.lower_bound), shown(check.bound), margin),
            harm=shown(check.effect), harm_low=shown(check.lower_bound), harm_high=shown(check.bound),
            p_value=check.p_value, baseline=math.exp(pooled_b.ratio), candidate=math.exp(pooled_c.ratio),
            theta=theta, variance_reduction=reduction, growth=check.growth, covariates=used,
        )  # fmt: skip
    if scale == "mean" and relative:
        # mean_c <= (1 + m) mean_b  <=>  mean_c - (1 + m) mean_b <= 0: the difference against the scaled baseline.
        check = effect_check(
            effect, variance, margin=0.0, direction=direction, alpha=alpha, tuning_n=tuning_n, n_total=n_total,
            kind="mean", baseline_n=pooled_b.units, candidate_n=pooled_c.units, breach_tuning_n=breach_n,
            breach_alpha=breach_a,
        )  # fmt: skip
        # Back on the relative scale, the baseline's mean taken as known (its error is in the bound already).
        base_mean = pooled_b.ratio
        harm = (pooled_c.ratio / base_mean - 1.0) * (1.0 if lower_is_better else -1.0)
        low, high = check.lower_bound / base_mean + margin, check.bound / base_mean + margin
        return result(
            check.decision, _readable(check.decision, low, high, margin), harm=harm, harm_low=low, harm_high=high,
            p_value=check.p_value, baseline=base_mean, candidate=pooled_c.ratio, theta=theta,
            variance_reduction=reduction, growth=check.growth, covariates=used,
        )  # fmt: skip
    check = effect_check(
        effect, variance, margin=margin, relative=relative, direction=direction, alpha=alpha, tuning_n=tuning_n,
        n_total=n_total, kind="proportion" if scale == "proportion" else "mean", baseline_n=pooled_b.units,
        candidate_n=pooled_c.units, breach_tuning_n=breach_n, breach_alpha=breach_a,
    )  # fmt: skip
    return result(
        check.decision, check.reason, harm=check.effect, harm_low=check.lower_bound, harm_high=check.bound,
        p_value=check.p_value, baseline=pooled_b.ratio, candidate=pooled_c.ratio, theta=theta,
        variance_reduction=reduction, growth=check.growth, covariates=used,
    )  # fmt: skip


def guardrail_more_factor(
    baseline: RatioStats | Sequence[RatioStats], candidate: RatioStats | Sequence[RatioStats], **check: object
) -> float | None:
    """By what factor the last stratum's sessions (the current step's: earlier steps are done) must multiply,
    their spread and means staying as they are, before ``ratio_guardrail_check(baseline, candidate, **check)``
    decides; None when not within a thousand times (the estimate on the margin). Projects the check itself,
    so the Wilson floor of a share and the sessions' minimum are accounted for."""
    bases, cands = _strata(baseline, "baseline"), _strata(candidate, "candidate")

    def decides(f: float) -> bool:
        grown = ratio_guardrail_check([*bases[:-1], bases[-1].replicated(f)], [*cands[:-1], cands[-1].replicated(f)], **check)  # type: ignore[arg-type]
        return grown.decision is not Decision.UNDECIDED

    if decides(1.0):
        return 1.0
    high = 2.0
    while not decides(high):
        high *= 2.0
        if high > 1000.0:
            return None
    return boundary(decides, before=high / 2.0, past=high, steps=12, geometric=True)[1]


def _share_difference(
    eligible: Sequence[tuple[RatioStats, RatioStats]], pooled_b: RatioStats, pooled_c: RatioStats, margin: float,
    direction: str, multipliers: tuple[float, float], n_total: float, breach_alpha: float, breach_tuning_n: float,
    result: Any,
) -> RatioGuardrailResult:  # fmt: skip
    """A share guardrail with an absolute margin ("errors at most 1 point worse"): the score test's
    inversion (``proportions.difference_bounds``), each arm's variance at the shares the hypothesis implies
    and inflated by its sessions' design effect, so rare events are neither certainty at zero nor a
    breach on a handful. ``multipliers``: the breach side's (at ``breach_alpha``, ``breach_tuning_n``, as
    the p-value) and the safe side's."""
    strata = [
        ShareStratum(b.num, b.den, c.num, c.den, design_effect(b), design_effect(c), b.den * c.den / (b.den + c.den))
        for b, c in eligible
    ]
    breach_k, safe_k = multipliers
    sign = 1.0 if direction == "lower_is_better" else -1.0
    # On the harm scale the breach side is the lower bound; for a share better higher that is p_c - p_b's upper.
    below, above = (breach_k, safe_k) if sign > 0 else (safe_k, breach_k)
    estimate, low, high = difference_bounds(strata, multiplier=below, upper_multiplier=above)
    harm, harm_low, harm_high = sign * estimate, *sorted((sign * low, sign * high))
    z = sign * difference_score(strata, sign * margin)
    p_value = one_sided_p_value(effect=z, variance=1.0, n_total=n_total, alpha=breach_alpha, tuning_n=breach_tuning_n)
    if harm_low > margin:
        decision = Decision.BREACH
    elif harm_high <= margin:
        decision = Decision.SAFE
    else:
        decision = Decision.UNDECIDED
    return result(  # type: ignore[no-any-return]
        decision, _readable(decision, harm_low, harm_high, margin), harm=harm, harm_low=harm_low,
        harm_high=harm_high, p_value=p_value, baseline=pooled_b.ratio, candidate=pooled_c.ratio,
    )  # fmt: skip


def _readable(decision: Decision, low: float, high: float, margin: float) -> str:
    if decision is Decision.BREACH:
        return f"worse than the margin: at least {low:.4g} > {margin:.4g}"
    if decision is Decision.SAFE:
        return f"within the margin: at most {high:.4g} <= {margin:.4g}"
    return f"the interval [{low:.4g}, {high:.4g}] contains the margin {margin:.4g}"


def _result(
    baseline: RatioStats, candidate: RatioStats, scale: str, margin: float, relative: bool, decision: Decision,
    reason: str, values: dict[str, Any],
) -> RatioGuardrailResult:  # fmt: skip
    def value(name: str, default: float) -> float:
        found = values.get(name)
        return default if found is None else float(found)

    return RatioGuardrailResult(
        decision=decision, scale=scale, harm=value("harm", math.nan), harm_low=value("harm_low", -math.inf),
        harm_high=value("harm_high", math.inf), margin=margin, relative=relative, p_value=value("p_value", 1.0),
        baseline=value("baseline", math.nan), candidate=value("candidate", math.nan),
        baseline_units=baseline.units, candidate_units=candidate.units, baseline_requests=baseline.den,
        candidate_requests=candidate.den, theta=value("theta", 0.0),
        variance_reduction=value("variance_reduction", 0.0), growth=values.get("growth"), reason=reason,
        covariates=tuple(values.get("covariates") or ()),
    )  # fmt: skip


def ratio_limit_check(
    stats: RatioStats,
    *,
    threshold: float,
    log: bool = False,
    direction: str = "lower_is_better",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    min_units: int = DEFAULT_MIN_UNITS,
) -> SloResult:
    """One arm's mean over sessions (a geometric mean when ``log``) against an absolute threshold, with the
    cluster-robust variance; bounds and estimate on the metric's own scale."""
    if not isinstance(stats, RatioStats):
        raise ValueError(f"stats must be a RatioStats, got {type(stats).__name__}")
    if log and threshold <= 0:
        raise ValueError(f"a geometric mean's threshold must be positive, got {threshold!r}")
    if stats.units < min_units or stats.den <= 0:
        growth = min_units / stats.units if stats.units else None
        estimate = (math.exp(stats.ratio) if log else stats.ratio) if stats.den > 0 else math.nan
        return SloResult(Decision.UNDECIDED, estimate, -math.inf, math.inf, threshold, 1.0, direction, alpha,
                         int(stats.den), f"fewer than {min_units} sessions", growth)  # fmt: skip
    est = ratio_estimate(stats)
    result = estimate_limit_check(
        est.mean, est.standard_error_squared, threshold=math.log(threshold) if log else threshold, direction=direction,
        alpha=alpha, tuning_n=tuning_n, n_total=stats.den, n=int(stats.den), project=True,
    )  # fmt: skip
    if not log:
        return result
    return SloResult(
        result.decision, math.exp(result.estimate), math.exp(result.lower_bound), math.exp(result.upper_bound),
        threshold, result.p_value, direction, alpha, result.n, _readable_limit(result, threshold), result.growth,
    )  # fmt: skip


def _readable_limit(result: SloResult, threshold: float) -> str:
    if result.decision is Decision.UNDECIDED:
        return f"the interval contains the limit {threshold:g}"
    return f"{result.decision.value}: the geometric mean against the limit {threshold:g}"


def design_effect(stats: RatioStats) -> float:
    """How much clustering in sessions inflates a share's variance over the binomial one (at least 1)."""
    if stats.units < 2 or stats.den <= 0:
        return 1.0
    share = stats.num / stats.den
    binomial = share * (1.0 - share) / stats.den
    if binomial <= 0:
        return 1.0
    return max(1.0, ratio_estimate(stats).standard_error_squared / binomial)
