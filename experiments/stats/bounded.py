"""Always-valid bounds for the mean of values in [0, 1], in the order they arrived.

The predictable plug-in empirical-Bernstein confidence sequence of Waudby-Smith and Ramdas ("Estimating
means of bounded random variables by betting", JRSS B 86:1-27, 2024, Theorem 2 and eqs. 13-15), one side
at a time. With X_i in [0, 1] arriving in order and one common mean mu:

    mu_hat_t    = (1/2 + sum_{i<=t} X_i) / (t + 1)
    sigma2_hat_t = (1/4 + sum_{i<=t} (X_i - mu_hat_i)^2) / (t + 1)
    lambda_t    = min(sqrt(2 log(1/alpha) / (sigma2_hat_{t-1} t log(1 + t))), c)       (c = 1/2)
    v_t         = 4 (X_t - mu_hat_{t-1})^2,  psi_E(l) = (-log(1 - l) - l) / 4
    lower_t     = (sum lambda_i X_i - log(1/alpha) - sum v_i psi_E(lambda_i)) / sum lambda_i

and the upper bound mirrors it (1 - X). Each holds at every t at once with probability 1 - alpha, so
the running maximum of the lower bounds (minimum of the upper) is valid too, and a look may come at any
time. Nothing here needs a variance to be positive: ten equal scores give a bound about 0.5 wide, never a
zero-width interval. This is what the shadow-quality check reads (scores of the candidate's shadow
answers, each in [0, 1]); it suits any bounded per-unit value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._checks import check_alpha

LAMBDA_CAP = 0.5
MAX_PROJECTION = 10**7


@dataclass(frozen=True, slots=True)
class BoundedMeanBounds:
    """One-sided always-valid bounds of a [0, 1] mean, each wrong at some time with chance at most alpha."""

    n: int
    mean: float
    lower: float
    upper: float
    alpha: float

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.n < 0:
            raise ValueError(f"n must be at least 0, got {self.n}")
        if not 0.0 <= self.lower <= self.upper <= 1.0:
            raise ValueError(f"bounds must satisfy 0 <= lower <= upper <= 1, got {self.lower}, {self.upper}")


def _lower_path(x: np.ndarray, log_term: float) -> np.ndarray:
    """The lower bound after each observation (before the running maximum)."""
    t = np.arange(1, x.size + 1, dtype=float)
    mu_hat = (0.5 + np.cumsum(x)) / (t + 1.0)
    sq = (0.25 + np.cumsum((x - mu_hat) ** 2)) / (t + 1.0)
    # Predictable: the t-th lambda and v use estimates from the first t - 1 values only.
    mu_prev = np.r_[0.5, mu_hat[:-1]]
    sq_prev = np.r_[0.25, sq[:-1]]
    lam = np.minimum(np.sqrt(2.0 * log_term / (sq_prev * t * np.log1p(t))), LAMBDA_CAP)
    v = 4.0 * (x - mu_prev) ** 2
    psi = (-np.log1p(-lam) - lam) / 4.0
    weight = np.cumsum(lam)
    return np.asarray((np.cumsum(lam * x) - log_term - np.cumsum(v * psi)) / weight)


def bounded_mean_bounds(values: Sequence[float] | np.ndarray, *, alpha: float) -> BoundedMeanBounds:
    """Always-valid one-sided bounds (each at alpha) of the mean of `values`, given in arrival order."""
    alpha = check_alpha(alpha)
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError("values must be a flat sequence")
    if x.size == 0:
        return BoundedMeanBounds(0, math.nan, 0.0, 1.0, alpha)
    if not np.all(np.isfinite(x)) or np.any(x < 0.0) or np.any(x > 1.0):
        raise ValueError("values must be finite numbers in [0, 1]")
    log_term = math.log(1.0 / alpha)
    lower = float(np.max(_lower_path(x, log_term)))
    upper = 1.0 - float(np.max(_lower_path(1.0 - x, log_term)))
    mean = float(x.mean())
    return BoundedMeanBounds(int(x.size), mean, max(0.0, min(lower, mean)), min(1.0, max(upper, mean)), alpha)


def bounded_mean_n_needed(*, mean: float, sd: float, gap: float, alpha: float) -> int | None:
    """About how many values the sequence needs before its bound on one side is within `gap` of the mean,
    if the values to come keep this mean and standard deviation: the bound's width, computed along the way
    with the plug-in estimates held at their current values. None if it never gets there within 10^7."""
    alpha = check_alpha(alpha)
    if gap <= 0:
        return None
    log_term = math.log(1.0 / alpha)
    variance = max(float(sd) ** 2, 1e-6)
    n = 64
    while n <= MAX_PROJECTION:
        t = np.arange(1, n + 1, dtype=float)
        lam = np.minimum(np.sqrt(2.0 * log_term / (variance * t * np.log1p(t))), LAMBDA_CAP)
        # E[v psi_E(lambda)] with v = 4 (X - mu)^2: 4 variance psi_E(lambda).
        width = (log_term + np.cumsum(variance * (-np.log1p(-lam) - lam))) / np.cumsum(lam)
        reached = np.nonzero(width <= gap)[0]
        if reached.size:
            return int(reached[0]) + 1
        n *= 4
    return None
