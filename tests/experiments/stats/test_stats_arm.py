"""ArmStats: construction, validation and merging of sufficient statistics."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest

from experiments.stats import ArmStats


def test_from_values_matches_numpy_moments() -> None:
    rng = np.random.default_rng(7)
    x = rng.lognormal(3.0, 0.5, size=1000)
    arm = ArmStats.from_values(x)
    assert arm.n == 1000
    assert arm.mean == pytest.approx(x.mean(), rel=1e-12)
    assert arm.variance == pytest.approx(x.var(ddof=1), rel=1e-9)


def test_from_values_with_covariate_matches_numpy_covariance() -> None:
    rng = np.random.default_rng(8)
    y = rng.normal(5.0, 1.0, size=500)
    x = 2.0 * y + rng.normal(0.0, 1.0, size=500)
    arm = ArmStats.from_values(x, covariate=y)
    assert arm.mean_y == pytest.approx(y.mean(), rel=1e-12)
    assert arm.variance_y == pytest.approx(y.var(ddof=1), rel=1e-9)
    assert arm.covariance_xy == pytest.approx(np.cov(x, y, ddof=1)[0, 1], rel=1e-9)
    assert arm.has_y


def test_from_counts_is_a_zero_one_metric() -> None:
    arm = ArmStats.from_counts(30, 1000)
    assert (arm.n, arm.sum, arm.sum_squares) == (1000, 30.0, 30.0)
    assert arm.mean == pytest.approx(0.03)


def test_windows_add_up_to_the_whole() -> None:
    rng = np.random.default_rng(9)
    x = rng.integers(0, 100, size=300).astype(float)
    y = rng.integers(0, 10, size=300).astype(float)
    whole = ArmStats.from_values(x, covariate=y)
    parts = [ArmStats.from_values(x[i : i + 50], covariate=y[i : i + 50]) for i in range(0, 300, 50)]
    assert sum(parts) == whole
    assert sum(parts, ArmStats.empty()) == whole
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    assert merged == whole


def test_empty_is_the_identity() -> None:
    arm = ArmStats(10, 55.0, 385.0)
    assert arm + ArmStats.empty() == arm
    assert ArmStats.empty() + arm == arm


def test_database_number_types_are_accepted() -> None:
    # PostgreSQL hands SUM() back as Decimal and COUNT() may arrive as a float.
    arm = ArmStats(Decimal(3), Decimal("6.0"), Decimal("14.0"))  # type: ignore[arg-type]
    assert arm == ArmStats(3, 6.0, 14.0)
    assert ArmStats(3.0, 6, 14).n == 3  # type: ignore[arg-type]


def test_tiny_negative_variance_from_rounding_is_clamped() -> None:
    value = 0.1
    n = 10
    arm = ArmStats(n, value * n, (value * value) * n * (1 - 1e-15))
    assert arm.variance == 0.0


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"n": -1, "sum": 0, "sum_squares": 0}, "n"),
        ({"n": 2.5, "sum": 0, "sum_squares": 0}, "n"),
        ({"n": True, "sum": 0, "sum_squares": 0}, "n"),
        ({"n": "ten", "sum": 0, "sum_squares": 0}, "n"),
        ({"n": 3, "sum": math.nan, "sum_squares": 0}, "sum"),
        ({"n": 3, "sum": 1, "sum_squares": math.inf}, "sum_squares"),
        ({"n": 3, "sum": 1, "sum_squares": -1}, "sum_squares"),
        ({"n": 3, "sum": 30, "sum_squares": 10}, "negative variance"),
        ({"n": 0, "sum": 1, "sum_squares": 1}, "n is 0"),
        ({"n": 3, "sum": 3, "sum_squares": 3, "sum_y": 3, "sum_y_squares": 2}, "sum_y_squares"),
        ({"n": 3, "sum": 0, "sum_squares": 2, "sum_y": 0, "sum_y_squares": 2, "sum_xy": 5}, "sum_xy"),
    ],
)
def test_invalid_sums_are_rejected_with_the_parameter_named(kwargs: dict[str, object], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        ArmStats(**kwargs)  # type: ignore[arg-type]


def test_merging_other_types_is_refused() -> None:
    arm = ArmStats(2, 1.0, 1.0)
    with pytest.raises(TypeError):
        arm + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        arm.merge((2, 1.0, 1.0))  # type: ignore[arg-type]


def test_from_counts_refuses_more_successes_than_trials() -> None:
    with pytest.raises(ValueError, match="successes"):
        ArmStats.from_counts(11, 10)


def test_covariate_length_must_match() -> None:
    with pytest.raises(ValueError, match="covariate"):
        ArmStats.from_values([1.0, 2.0, 3.0], covariate=[1.0, 2.0])


def test_arm_stats_is_frozen() -> None:
    arm = ArmStats(2, 1.0, 1.0)
    with pytest.raises(AttributeError):
        arm.n = 3  # type: ignore[misc]
