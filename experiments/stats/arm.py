"""Sufficient statistics of one arm.

Every test in this package works from sums the database can compute in one
pass (``COUNT``, ``SUM(x)``, ``SUM(x*x)``, and the same for a covariate or a
ratio denominator ``y``). Sums add, so per-interval windows merge into the
cumulative totals a sequential test needs without touching raw rows again.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Sums of squares come from float arithmetic (in the database or here), so
# ``sum_squares - sum**2 / n`` can dip a few ulps below zero for data whose
# variance is really zero. Anything further below zero than this share of the
# sum of squares is an input error, not rounding.
_ROUNDING_SLACK = 1e-9


def _as_float(name: str, value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def _as_count(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer count, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        # Databases hand back counts as Decimal or float; accept whole numbers only.
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer count, got {value!r}") from None
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
        result = int(as_float)
    if result < 0:
        raise ValueError(f"{name} must not be negative, got {result}")
    return result


def _centered(name: str, n: int, total: float, squares: float) -> float:
    """Return sum((v - mean)^2), rejecting sums that imply a negative variance."""
    if squares < 0:
        raise ValueError(f"{name} must not be negative, got {squares!r}")
    if n == 0:
        return 0.0
    centered = squares - total * total / n
    if centered < -_ROUNDING_SLACK * max(squares, 1.0):
        raise ValueError(
            f"{name}={squares!r} is smaller than sum**2/n={total * total / n!r}: the sums imply a negative variance"
        )
    return max(centered, 0.0)


@dataclass(frozen=True, slots=True)
class ArmStats:
    """Sufficient statistics of one arm: n, sum(x), sum(x^2) and optionally y sums.

    ``x`` is the metric. ``y`` is either a pre-period covariate (CUPED) or the
    denominator of a ratio metric; leave its sums at zero when there is none.
    An arm with fewer than two observations is allowed here so that empty or
    tiny windows can be merged; the tests themselves require n >= 2.
    """

    n: int
    sum: float
    sum_squares: float
    sum_y: float = 0.0
    sum_y_squares: float = 0.0
    sum_xy: float = 0.0

    def __post_init__(self) -> None:
        n = _as_count("n", self.n)
        object.__setattr__(self, "n", n)
        for field in ("sum", "sum_squares", "sum_y", "sum_y_squares", "sum_xy"):
            object.__setattr__(self, field, _as_float(field, getattr(self, field)))
        if n == 0 and any((self.sum, self.sum_squares, self.sum_y, self.sum_y_squares, self.sum_xy)):
            raise ValueError("n is 0 but the sums are not: an empty arm has all sums equal to 0")
        sxx = _centered("sum_squares", n, self.sum, self.sum_squares)
        syy = _centered("sum_y_squares", n, self.sum_y, self.sum_y_squares)
        if n > 0:
            sxy = self.sum_xy - self.sum * self.sum_y / n
            # Cauchy-Schwarz: |cov(x, y)| <= sd(x) sd(y); sums that break it did not come from data.
            if sxy * sxy > sxx * syy * (1 + 1e-6) + _ROUNDING_SLACK * max(
                self.sum_squares * self.sum_y_squares, 1.0
            ):
                raise ValueError(
                    "sum_xy is inconsistent with sum_squares and sum_y_squares (|corr(x, y)| > 1)"
                )

    # -- construction -----------------------------------------------------

    @classmethod
    def empty(cls) -> ArmStats:
        """The identity for ``+``: no observations."""
        return cls(0, 0.0, 0.0)

    @classmethod
    def from_values(cls, values: Iterable[float], covariate: Iterable[float] | None = None) -> ArmStats:
        """Summarise raw observations (and an optional paired covariate or denominator)."""
        x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
        if x.ndim != 1:
            raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
        if covariate is None:
            return cls(int(x.size), float(x.sum()), float(np.dot(x, x)))
        y = np.asarray(list(covariate) if not isinstance(covariate, np.ndarray) else covariate, dtype=float)
        if y.shape != x.shape:
            raise ValueError(f"covariate must have the same length as values ({x.size}), got {y.size}")
        return cls(
            int(x.size),
            float(x.sum()),
            float(np.dot(x, x)),
            sum_y=float(y.sum()),
            sum_y_squares=float(np.dot(y, y)),
            sum_xy=float(np.dot(x, y)),
        )

    @classmethod
    def from_counts(cls, successes: int, n: int) -> ArmStats:
        """A 0/1 metric (error, pass, over-threshold) from its count of ones."""
        successes = _as_count("successes", successes)
        n = _as_count("n", n)
        if successes > n:
            raise ValueError(f"successes must be at most n={n}, got {successes}")
        return cls(n, float(successes), float(successes))

    # -- merging ----------------------------------------------------------

    def merge(self, other: ArmStats) -> ArmStats:
        """Statistics of the union of two disjoint sets of observations."""
        if not isinstance(other, ArmStats):
            raise TypeError(f"can only merge ArmStats, got {type(other).__name__}")
        return ArmStats(
            self.n + other.n,
            self.sum + other.sum,
            self.sum_squares + other.sum_squares,
            sum_y=self.sum_y + other.sum_y,
            sum_y_squares=self.sum_y_squares + other.sum_y_squares,
            sum_xy=self.sum_xy + other.sum_xy,
        )

    def __add__(self, other: object) -> ArmStats:
        if not isinstance(other, ArmStats):
            return NotImplemented
        return self.merge(other)

    def __radd__(self, other: object) -> ArmStats:
        # Lets the builtin sum() start from its default 0.
        if other == 0:
            return self
        if not isinstance(other, ArmStats):
            return NotImplemented
        return other.merge(self)

    # -- moments ----------------------------------------------------------

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Sample variance of x with the n - 1 denominator."""
        if self.n < 2:
            return math.nan
        return max(self.sum_squares - self.sum * self.sum / self.n, 0.0) / (self.n - 1)

    @property
    def mean_y(self) -> float:
        return self.sum_y / self.n if self.n else math.nan

    @property
    def variance_y(self) -> float:
        if self.n < 2:
            return math.nan
        return max(self.sum_y_squares - self.sum_y * self.sum_y / self.n, 0.0) / (self.n - 1)

    @property
    def covariance_xy(self) -> float:
        if self.n < 2:
            return math.nan
        return (self.sum_xy - self.sum * self.sum_y / self.n) / (self.n - 1)

    @property
    def has_y(self) -> bool:
        return bool(self.sum_y or self.sum_y_squares or self.sum_xy)
