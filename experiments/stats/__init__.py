"""Statistics for rollouts and experiments, from per-arm sufficient statistics.

Pure Python (numpy, scipy, statsmodels); nothing here imports Django or the
rest of the platform. The stable facade is ``ArmStats``, ``compare`` and
``srm_test``; the rest serves the rollout analysis, reports and planning.
"""

from __future__ import annotations

from .arm import ArmStats
from .bayes import BayesianSummary, bayesian_summary
from .comparison import Comparison, compare
from .decisions import Decision, GuardrailResult, SloResult, guardrail_check, mean_slo_check, tail_slo_check
from .distributions import (
    MannWhitneyResult,
    PercentileDifference,
    bootstrap_percentile_differences,
    hodges_lehmann_shift,
    mann_whitney,
    nearest_rank_percentile,
)
from .monitor import Monitor
from .multiple import MultipleTestResult, adjust_p_values, benjamini_hochberg, holm
from .planning import SampleSizePlan, sample_size_per_arm, step_tuning_n
from .sequential import (
    always_valid_p_value,
    half_width,
    half_width_multiplier,
    mixture_rho_squared,
    one_sided_multiplier,
    one_sided_p_value,
)
from .srm import SRM_P_THRESHOLD, SrmResult, srm_check, srm_test

__all__ = [
    "SRM_P_THRESHOLD",
    "ArmStats",
    "BayesianSummary",
    "Comparison",
    "Decision",
    "GuardrailResult",
    "MannWhitneyResult",
    "Monitor",
    "MultipleTestResult",
    "PercentileDifference",
    "SampleSizePlan",
    "SloResult",
    "SrmResult",
    "adjust_p_values",
    "always_valid_p_value",
    "bayesian_summary",
    "benjamini_hochberg",
    "bootstrap_percentile_differences",
    "compare",
    "guardrail_check",
    "half_width",
    "half_width_multiplier",
    "hodges_lehmann_shift",
    "holm",
    "mann_whitney",
    "mean_slo_check",
    "mixture_rho_squared",
    "nearest_rank_percentile",
    "one_sided_multiplier",
    "one_sided_p_value",
    "sample_size_per_arm",
    "srm_check",
    "srm_test",
    "step_tuning_n",
    "tail_slo_check",
]
