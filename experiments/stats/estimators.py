"""Per-arm point estimates and the variance of a difference between arms.

Every metric kind is reduced to the same shape, ``ArmEstimate(mean, variance,
n)``, where ``variance`` is the per-observation variance so that the squared
standard error of the arm's estimate is ``variance / n``. Means use the sample
variance, proportions p(1 - p), ratio metrics and CUPED a linearised variable.
The difference between two arms, absolute or relative, is then one formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._checks import check_choice
from .arm import ArmStats

KINDS = ("mean", "proportion", "ratio")
DIFFERENCES = ("absolute", "relative")

# A 0/1 metric has sum == sum_squares; allow float noise from the database.
_BINARY_SLACK = 1e-9


@dataclass(frozen=True, slots=True)
class ArmEstimate:
    """An arm's estimate, the per-observation variance behind it, and its size."""

    mean: float
    variance: float
    n: int

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"n must be at least 2, got {self.n}")
        if not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean!r}")
        if not (math.isfinite(self.variance) and self.variance >= 0):
            raise ValueError(f"variance must be finite and non-negative, got {self.variance!r}")

    @property
    def standard_error_squared(self) -> float:
        return self.variance / self.n


@dataclass(frozen=True, slots=True)
class Difference:
    """candidate - baseline (or candidate / baseline - 1) with its variance.

    ``df`` is the Welch-Satterthwaite degrees of freedom for a t reference, or
    infinity where the reference distribution is the normal.
    """

    effect: float
    variance: float
    df: float
    baseline: ArmEstimate
    candidate: ArmEstimate

    @property
    def standard_error(self) -> float:
        return math.sqrt(self.variance)


def _require_n(role: str, arm: ArmStats) -> None:
    if not isinstance(arm, ArmStats):
        raise ValueError(f"{role} must be an ArmStats, got {type(arm).__name__}")
    if arm.n < 2:
        raise ValueError(f"{role}.n must be at least 2, got {arm.n}")


def check_binary(role: str, arm: ArmStats) -> None:
    """A proportion needs 0/1 observations: 0 <= sum <= n and sum of squares == sum."""
    if not (0.0 <= arm.sum <= arm.n):
        raise ValueError(f"{role}.sum must be between 0 and n={arm.n} for a proportion, got {arm.sum!r}")
    if abs(arm.sum_squares - arm.sum) > _BINARY_SLACK * max(arm.n, 1):
        raise ValueError(
            f"{role}.sum_squares must equal {role}.sum for a proportion of 0/1 values, "
            f"got {arm.sum_squares!r} and {arm.sum!r}"
        )


def arm_estimate(arm: ArmStats, *, kind: str, role: str = "arm") -> ArmEstimate:
    """Reduce an arm's sufficient statistics to its estimate for ``kind``."""
    check_choice("kind", kind, KINDS)
    _require_n(role, arm)
    if kind == "mean":
        return ArmEstimate(arm.mean, arm.variance, arm.n)
    if kind == "proportion":
        check_binary(role, arm)
        p = arm.sum / arm.n
        return ArmEstimate(p, p * (1.0 - p), arm.n)
    # Ratio metric sum(x) / sum(y) over units (e.g. tokens per request across
    # sessions). Delta method: the ratio's per-unit influence is
    # (x - R y) / mean(y), whose variance is (s_x^2 - 2 R s_xy + R^2 s_y^2) / mean(y)^2.
    if arm.sum_y == 0:
        raise ValueError(f"{role}.sum_y must be non-zero for a ratio metric (it is the denominator)")
    ratio = arm.sum / arm.sum_y
    mean_y = arm.mean_y
    linearised = arm.variance - 2.0 * ratio * arm.covariance_xy + ratio * ratio * arm.variance_y
    return ArmEstimate(ratio, max(linearised, 0.0) / (mean_y * mean_y), arm.n)


def cuped_theta(baseline: ArmStats, candidate: ArmStats) -> float:
    """theta = pooled within-arm cov(x, y) / pooled within-arm var(y).

    Pooling the centred cross-products of each arm (rather than the raw data of
    both arms together) keeps the treatment effect on x out of theta, while
    still using both arms so theta is the same for each (Deng et al. 2013, sec. 3).
    """
    sxy = (baseline.sum_xy - baseline.sum * baseline.sum_y / baseline.n) + (
        candidate.sum_xy - candidate.sum * candidate.sum_y / candidate.n
    )
    syy = max(baseline.sum_y_squares - baseline.sum_y**2 / baseline.n, 0.0) + max(
        candidate.sum_y_squares - candidate.sum_y**2 / candidate.n, 0.0
    )
    return sxy / syy if syy > 0 else 0.0


def cuped_estimates(baseline: ArmStats, candidate: ArmStats) -> tuple[ArmEstimate, ArmEstimate, float]:
    """CUPED-adjusted estimates of both arms, and the theta used.

    Each arm's mean becomes mean(x) - theta (mean_k(y) - mean_pooled(y)) and its
    variance var(x - theta y) = s_x^2 + theta^2 s_y^2 - 2 theta s_xy; theta is
    treated as known, which is the usual large-sample approximation.
    """
    _require_n("baseline", baseline)
    _require_n("candidate", candidate)
    theta = cuped_theta(baseline, candidate)
    pooled_mean_y = (baseline.sum_y + candidate.sum_y) / (baseline.n + candidate.n)
    adjusted = []
    for arm in (baseline, candidate):
        variance = arm.variance + theta * theta * arm.variance_y - 2.0 * theta * arm.covariance_xy
        mean = arm.mean - theta * (arm.mean_y - pooled_mean_y)
        adjusted.append(ArmEstimate(mean, max(variance, 0.0), arm.n))
    return adjusted[0], adjusted[1], theta


def welch_df(baseline: ArmEstimate, candidate: ArmEstimate) -> float:
    """Welch-Satterthwaite degrees of freedom of the absolute difference."""
    va = baseline.standard_error_squared
    vb = candidate.standard_error_squared
    denominator = va * va / (baseline.n - 1) + vb * vb / (candidate.n - 1)
    if denominator == 0:
        return math.inf
    return (va + vb) ** 2 / denominator


def arm_difference(
    baseline: ArmEstimate, candidate: ArmEstimate, *, relative: bool, t_reference: bool
) -> Difference:
    """The effect of candidate over baseline and its variance.

    Relative differences use the delta method on candidate / baseline - 1:
    Var = s_B^2 / (mean_A^2 n_B) + s_A^2 mean_B^2 / (mean_A^4 n_A), with the
    same degrees of freedom as the absolute difference (DESIGN.md, Statistics).
    """
    df = welch_df(baseline, candidate) if t_reference else math.inf
    if not relative:
        effect = candidate.mean - baseline.mean
        variance = baseline.standard_error_squared + candidate.standard_error_squared
        return Difference(effect, variance, df, baseline, candidate)
    if baseline.mean == 0:
        raise ValueError("baseline mean is 0: a relative difference is undefined (use difference='absolute')")
    mean_a = baseline.mean
    mean_b = candidate.mean
    effect = mean_b / mean_a - 1.0
    variance = candidate.variance / (mean_a * mean_a * candidate.n) + baseline.variance * mean_b * mean_b / (
        mean_a**4 * baseline.n
    )
    return Difference(effect, variance, df, baseline, candidate)
