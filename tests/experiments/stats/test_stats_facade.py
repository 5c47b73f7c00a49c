"""The facade other apps use, its bad-input errors, and the no-Django rule."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
from pathlib import Path

import pytest

import experiments.stats
from experiments.stats import ArmStats, compare, srm_test

STATS_DIR = Path(experiments.stats.__file__).parent
ALLOWED_TOP_LEVEL = {"numpy", "scipy", "statsmodels"} | set(sys.stdlib_module_names)


def test_facade_contract() -> None:
    a = ArmStats(1000, 30_000.0, 1_000_000.0)
    b = ArmStats(900, 27_500.0, 920_000.0)
    for kind, arms in (
        ("mean", (a, b)),
        ("proportion", (ArmStats.from_counts(10, 1000), ArmStats.from_counts(15, 900))),
    ):
        for difference in ("absolute", "relative"):
            for method in ("fixed", "sequential"):
                result = compare(
                    *arms, kind=kind, difference=difference, method=method, alpha=0.05, tuning_n=5000
                )
                assert dataclasses.is_dataclass(result)
                for field in ("effect", "ci_low", "ci_high", "p_value"):
                    assert isinstance(getattr(result, field), float)
                with pytest.raises(dataclasses.FrozenInstanceError):
                    result.effect = 0.0  # type: ignore[misc]
    assert isinstance(srm_test([500, 520], [0.5, 0.5]), float)


def test_every_public_name_is_exported() -> None:
    for name in experiments.stats.__all__:
        assert hasattr(experiments.stats, name), name


def test_the_package_imports_nothing_but_numpy_scipy_statsmodels_and_the_stdlib() -> None:
    for path in sorted(STATS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in ALLOWED_TOP_LEVEL, f"{path.name} imports {module}"


A = ArmStats(100, 1000.0, 11_000.0)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: compare(ArmStats(1, 1.0, 1.0), A), "baseline.n"),
        (lambda: compare(A, ArmStats(1, 1.0, 1.0)), "candidate.n"),
        (lambda: compare(A, A, alpha=0.0), "alpha"),
        (lambda: compare(A, A, alpha=1.0), "alpha"),
        (lambda: compare(A, A, alpha=math.nan), "alpha"),
        (lambda: compare(A, A, alpha="0.05x"), "alpha"),
        (lambda: compare(A, A, kind="median"), "kind"),
        (lambda: compare(A, A, difference="ratio"), "difference"),
        (lambda: compare(A, A, method="bayes"), "method"),
        (lambda: compare(A, A, tuning_n=0), "tuning_n"),
        (lambda: compare(A, A, kind="proportion"), "baseline.sum"),
        (lambda: compare(ArmStats(10, 5.0, 4.0), ArmStats(10, 5.0, 5.0), kind="proportion"), "sum_squares"),
        (lambda: compare(A, A, kind="ratio"), "sum_y"),
        (lambda: compare(A, A, kind="proportion", cuped=True), "cuped"),
        (lambda: compare(ArmStats(10, 0.0, 0.0), A, difference="relative"), "baseline mean"),
        (lambda: compare(A, (100, 1000.0, 11_000.0)), "candidate"),  # type: ignore[arg-type]
        (lambda: ArmStats(10, 100.0, 5.0), "negative variance"),
        (lambda: srm_test([10, 20], [0.5, 0.6]), "weights must sum to 1"),
        (lambda: srm_test([10, 20, 30], [0.5, 0.5]), "weights"),
        (lambda: srm_test([10], [1.0]), "counts"),
        (lambda: srm_test([10, -1], [0.5, 0.5]), r"counts\[1\]"),
        (lambda: srm_test([10, 10], [1.0, 0.0]), r"weights\[1\]"),
        (lambda: experiments.stats.guardrail_check(A, A, margin=-0.1), "margin"),
        (lambda: experiments.stats.guardrail_check(A, A, margin=0.1, direction="up"), "direction"),
        (lambda: experiments.stats.guardrail_check(A, A, margin=0.1, alpha=2), "alpha"),
        (lambda: experiments.stats.guardrail_check(A, A, margin=0.1, min_n=1), "min_n"),
        (lambda: experiments.stats.tail_slo_check(A, max_share=0.01), "exceedances.sum"),
        (lambda: experiments.stats.tail_slo_check(ArmStats.from_counts(1, 10), max_share=1.5), "max_share"),
        (lambda: experiments.stats.mean_slo_check(A, threshold=math.inf), "threshold"),
        (lambda: experiments.stats.holm([0.5, 1.2]), r"p_values\[1\]"),
        (lambda: experiments.stats.holm([]), "p_values"),
        (lambda: experiments.stats.adjust_p_values([0.1], method="bonferroni"), "method"),
        (lambda: experiments.stats.mann_whitney([], [1.0]), "baseline"),
        (lambda: experiments.stats.mann_whitney([1.0], [math.nan]), "candidate"),
        (
            lambda: experiments.stats.bootstrap_percentile_differences(
                [1.0, 2.0], [1.0, 2.0], percentiles=[100]
            ),
            "percentiles",
        ),
        (
            lambda: experiments.stats.bootstrap_percentile_differences([1.0, 2.0], [1.0, 2.0], n_resamples=5),
            "n_resamples",
        ),
        (lambda: experiments.stats.Monitor(alpha=1.5), "alpha"),
        (
            lambda: experiments.stats.half_width(variance=-1.0, n_total=10, alpha=0.05, tuning_n=100),
            "variance",
        ),
        (lambda: experiments.stats.bayesian_summary(A, A, prior_sd=0.0), "prior_sd"),
        (lambda: experiments.stats.step_tuning_n(candidate_share=1.5, min_candidate_requests=50), "candidate_share"),
        (lambda: experiments.stats.step_tuning_n(candidate_share=0.1, min_candidate_requests=-1),
         "min_candidate_requests"),
    ],
)
def test_nonsense_input_raises_value_error_naming_the_parameter(call, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=name):
        call()
