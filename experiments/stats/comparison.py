"""``compare``: the facade the rest of the platform calls with two arms' sums."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._checks import check_alpha, check_choice, check_positive
from .arm import ArmStats
from .estimators import DIFFERENCES, KINDS, arm_difference, arm_estimate, cuped_estimates
from .fixed import fixed_interval
from .sequential import sequential_interval

METHODS = ("fixed", "sequential")


@dataclass(frozen=True, slots=True)
class Comparison:
    """Candidate versus baseline on one metric.

    ``effect`` is candidate - baseline (``difference="absolute"``) or
    candidate / baseline - 1 (``"relative"``); [ci_low, ci_high] is its
    1 - alpha interval and ``p_value`` tests effect == 0. With
    ``method="sequential"`` both are always valid: they may be recomputed after
    every batch and acted on whenever they first cross a threshold.
    """

    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    standard_error: float
    kind: str
    difference: str
    method: str
    alpha: float
    baseline_estimate: float
    candidate_estimate: float
    baseline_n: int
    candidate_n: int
    df: float = math.inf
    cuped_theta: float | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.p_value <= 1.0):
            raise ValueError(f"p_value must be in [0, 1], got {self.p_value!r}")
        if self.ci_low > self.ci_high:
            raise ValueError(f"ci_low ({self.ci_low!r}) must not exceed ci_high ({self.ci_high!r})")

    @property
    def significant(self) -> bool:
        return self.p_value <= self.alpha


def compare(
    baseline: ArmStats,
    candidate: ArmStats,
    *,
    kind: str = "mean",
    difference: str = "absolute",
    method: str = "sequential",
    alpha: float = 0.05,
    tuning_n: float = 5000,
    cuped: bool = False,
) -> Comparison:
    """Compare candidate with baseline from their sufficient statistics.

    kind: ``"mean"`` (sample variance, Welch t for ``method="fixed"``),
    ``"proportion"`` (0/1 values, variance p(1 - p), normal reference) or
    ``"ratio"`` (sum(x) / sum(y) per arm, delta method; y sums required).
    cuped: adjust a mean with the covariate in the y sums, theta pooled across arms.
    method: ``"sequential"`` (always valid, the default for rollouts) or
    ``"fixed"`` (one look at a planned sample size). tuning_n is N*, the total
    sample size of both arms at which the sequential interval is narrowest.
    """
    check_choice("kind", kind, KINDS)
    check_choice("difference", difference, DIFFERENCES)
    check_choice("method", method, METHODS)
    alpha = check_alpha(alpha)
    tuning_n = check_positive("tuning_n", tuning_n)
    if not isinstance(cuped, bool):
        raise ValueError(f"cuped must be True or False, got {cuped!r}")

    theta: float | None = None
    if cuped:
        if kind != "mean":
            raise ValueError(f"cuped=True needs kind='mean', got kind={kind!r}")
        base_est, cand_est, theta = cuped_estimates(baseline, candidate)
    else:
        base_est = arm_estimate(baseline, kind=kind, role="baseline")
        cand_est = arm_estimate(candidate, kind=kind, role="candidate")

    # Proportions use the normal reference (statsmodels' Wald test); means,
    # CUPED and ratio metrics are per-unit averages and use Welch's t.
    diff = arm_difference(
        base_est, cand_est, relative=difference == "relative", t_reference=kind != "proportion"
    )
    if method == "fixed":
        low, high, p_value = fixed_interval(diff, alpha=alpha)
    else:
        low, high, p_value = sequential_interval(
            effect=diff.effect,
            variance=diff.variance,
            n_total=baseline.n + candidate.n,
            alpha=alpha,
            tuning_n=tuning_n,
        )
    return Comparison(
        effect=diff.effect,
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        standard_error=diff.standard_error,
        kind=kind,
        difference=difference,
        method=method,
        alpha=alpha,
        baseline_estimate=base_est.mean,
        candidate_estimate=cand_est.mean,
        baseline_n=baseline.n,
        candidate_n=candidate.n,
        df=diff.df if method == "fixed" else math.inf,
        cuped_theta=theta,
    )
