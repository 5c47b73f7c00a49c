"""Always-valid inference: the normal-mixture asymptotic confidence sequence.

Source: Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas, "Time-uniform central
limit theory and asymptotic confidence sequences" (Ann. Statist. 2024,
arXiv:2103.06476), Theorem 2.2, the Robbins normal mixture with an estimated
variance. With N observations in all, an estimate whose squared standard error
is V, and a mixing parameter rho:

    half-width = sqrt(V * 2 (N rho^2 + 1) / (N rho^2) * ln(sqrt(N rho^2 + 1) / alpha))

and the mixture likelihood ratio against H0: effect == null is

    Lambda = exp(rho^2 N (effect - null)^2 / (2 V (N rho^2 + 1))) / sqrt(N rho^2 + 1),

so p = min(1, 1 / Lambda) and p <= alpha exactly when null is outside the
interval. rho is chosen so the interval is narrowest when N equals the tuning
parameter N*, the total sample size expected at the decision:

    rho^2 = (-2 ln alpha + ln(1 - 2 ln alpha)) / N*.

Because the guarantee holds uniformly over N, the interval and p-value may be
looked at after every batch and acted on at any time.

One-sided bounds (the guardrail and SLO decisions) mix the same likelihood
ratios over the harmful side only (a half-normal mixing distribution, twice the
normal one on positive lambda). With z = (effect - null) / sqrt(V) and
x = N rho^2, that mixture is

    M = 2 / sqrt(x + 1) * exp(z^2 x / (2 (x + 1))) * Phi(z * sqrt(x / (x + 1))),

a nonnegative martingale under H0 starting at 1, so by Ville's inequality it
ever reaches 1 / alpha with probability at most alpha: the bound
effect - k * sqrt(V), with k the z where M = 1 / alpha, stays below the truth at
every look with probability at least 1 - alpha. k lies between the fixed-n
one-sided quantile and the two-sided multiplier at alpha (about 2.8 against 3.0
standard errors at N = N* for alpha = 0.05).
"""

from __future__ import annotations

import math

from ._checks import check_alpha, check_positive


def mixture_rho_squared(*, alpha: float, tuning_n: float) -> float:
    """rho^2 that minimises the confidence-sequence width at N = tuning_n."""
    alpha = check_alpha(alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    log_alpha = math.log(alpha)
    return (-2.0 * log_alpha + math.log(1.0 - 2.0 * log_alpha)) / tuning_n


def _check_inputs(variance: float, n_total: float) -> tuple[float, float]:
    variance = float(variance)
    if not (math.isfinite(variance) and variance >= 0):
        raise ValueError(f"variance must be finite and non-negative, got {variance!r}")
    n_total = check_positive("n_total", n_total)
    return variance, n_total


def half_width_multiplier(*, n_total: float, alpha: float, tuning_n: float) -> float:
    """The factor k with half-width = k * standard error (k ~ 1.96 would be a fixed-n 95% CI)."""
    _, n_total = _check_inputs(0.0, n_total)
    alpha = check_alpha(alpha)
    x = n_total * mixture_rho_squared(alpha=alpha, tuning_n=tuning_n)
    return math.sqrt(2.0 * (x + 1.0) / x * math.log(math.sqrt(x + 1.0) / alpha))


def half_width(*, variance: float, n_total: float, alpha: float, tuning_n: float) -> float:
    """Half-width of the (1 - alpha) confidence sequence for an estimate with se^2 = variance."""
    variance, n_total = _check_inputs(variance, n_total)
    return math.sqrt(variance) * half_width_multiplier(n_total=n_total, alpha=alpha, tuning_n=tuning_n)


def always_valid_p_value(
    *, effect: float, variance: float, n_total: float, alpha: float, tuning_n: float, null: float = 0.0
) -> float:
    """min(1, 1 / Lambda) for H0: effect == null; valid at any data-dependent look."""
    variance, n_total = _check_inputs(variance, n_total)
    rho2 = mixture_rho_squared(alpha=alpha, tuning_n=tuning_n)
    x = n_total * rho2
    gap = float(effect) - float(null)
    if variance == 0:
        return 1.0 if gap == 0 else 0.0
    # In logs: Lambda overflows a float once the effect is a few dozen standard errors out.
    log_lambda = rho2 * n_total * gap * gap / (2.0 * variance * (x + 1.0)) - 0.5 * math.log(x + 1.0)
    if log_lambda <= 0:
        return 1.0
    return math.exp(-log_lambda)


def _normal_cdf(t: float) -> float:
    # From erfc: accurate in the far left tail too, where 1 - Phi(-t) would round to 0.
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def _one_sided_log_mixture(z: float, x: float) -> float:
    """ln M of the half-normal mixture at z standard errors above the null (see the module docstring)."""
    log_phi = math.log(_normal_cdf(z * math.sqrt(x / (x + 1.0))))
    return math.log(2.0) - 0.5 * math.log(x + 1.0) + z * z * x / (2.0 * (x + 1.0)) + log_phi


def one_sided_multiplier(*, n_total: float, alpha: float, tuning_n: float) -> float:
    """The factor k of an always-valid one-sided bound at level alpha: estimate - k * se (or + k * se)."""
    _, n_total = _check_inputs(0.0, n_total)
    alpha = check_alpha(alpha)
    x = n_total * mixture_rho_squared(alpha=alpha, tuning_n=tuning_n)
    target = -math.log(alpha)
    r = math.sqrt(x / (x + 1.0))
    # ln M rises with z from -ln sqrt(x + 1) < target at 0; at the two-sided multiplier it is at least target
    # (there Phi >= 1/2). Newton's steps from the top of that bracket, kept inside it.
    low, high = 0.0, half_width_multiplier(n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    z = high
    for _ in range(100):
        gap = _one_sided_log_mixture(z, x) - target
        if abs(gap) < 1e-13:
            break
        if gap > 0:
            high = z
        else:
            low = z
        t = z * r
        density = math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
        slope = z * x / (x + 1.0) + r * density / _normal_cdf(t)
        step = z - gap / slope if slope > 0 else (low + high) / 2.0
        z = step if low < step < high else (low + high) / 2.0
        if high - low < 1e-14 * max(1.0, high):
            break
    return z


def one_sided_p_value(
    *, effect: float, variance: float, n_total: float, alpha: float, tuning_n: float, null: float = 0.0
) -> float:
    """min(1, 1 / M) for H0: effect <= null against effect > null; valid at any data-dependent look."""
    variance, n_total = _check_inputs(variance, n_total)
    x = n_total * mixture_rho_squared(alpha=alpha, tuning_n=tuning_n)
    gap = float(effect) - float(null)
    if gap <= 0:
        return 1.0
    if variance == 0:
        return 0.0
    log_m = _one_sided_log_mixture(gap / math.sqrt(variance), x)
    return 1.0 if log_m <= 0 else math.exp(-log_m)


def sequential_interval(
    *, effect: float, variance: float, n_total: float, alpha: float, tuning_n: float
) -> tuple[float, float, float]:
    """(ci_low, ci_high, p_value) of the confidence sequence at this look."""
    width = half_width(variance=variance, n_total=n_total, alpha=alpha, tuning_n=tuning_n)
    p_value = always_valid_p_value(
        effect=effect, variance=variance, n_total=n_total, alpha=alpha, tuning_n=tuning_n
    )
    return effect - width, effect + width, p_value
