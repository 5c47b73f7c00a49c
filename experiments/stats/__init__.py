"""Statistics for rollouts and experiments, from per-arm sufficient statistics.

Pure Python (numpy, scipy, statsmodels); nothing here imports Django or the
rest of the platform. The stable facade is ``ArmStats``, ``compare`` and
``srm_test``; the rest serves the rollout analysis, reports and planning.
"""

from __future__ import annotations

from .arm import ArmStats
from .bayes import BayesianSummary, bayesian_summary
from .clustered import CupedRatio, RatioStats, cuped_ratio_estimates, ratio_estimate
from .comparison import Comparison, compare
from .decisions import (
    Decision,
    GuardrailResult,
    SloResult,
    difference_check,
    effect_check,
    estimate_limit_check,
    growth_to_decide,
    guardrail_check,
    mean_slo_check,
    tail_slo_check,
)
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
from .planning import (
    SampleSizePlan,
    breach_tuning_n,
    limit_tuning_n,
    margin_tuning_n,
    planned_total_n,
    sample_size_per_arm,
    sequential_one_arm_size,
    sequential_sample_size,
    step_tuning_n,
)
from .proportions import (
    ProportionLimitResult,
    min_trials,
    mixture_weight,
    proportion_bounds,
    proportion_limit_check,
    quantile_cs_ranks,
)
from .ratio_checks import (
    DEFAULT_MIN_UNITS,
    RatioComparison,
    RatioGuardrailResult,
    design_effect,
    guardrail_more_factor,
    ratio_comparison,
    ratio_guardrail_check,
    ratio_limit_check,
)
from .sequential import (
    always_valid_p_value,
    half_width,
    half_width_multiplier,
    mixture_rho_squared,
    one_sided_multiplier,
    one_sided_p_value,
)
from .srm import SRM_P_THRESHOLD, SrmResult, srm_check, srm_sequential, srm_test

__all__ = [
    "DEFAULT_MIN_UNITS",
    "SRM_P_THRESHOLD",
    "ArmStats",
    "BayesianSummary",
    "Comparison",
    "CupedRatio",
    "Decision",
    "GuardrailResult",
    "MannWhitneyResult",
    "Monitor",
    "MultipleTestResult",
    "PercentileDifference",
    "ProportionLimitResult",
    "RatioComparison",
    "RatioGuardrailResult",
    "RatioStats",
    "SampleSizePlan",
    "SloResult",
    "SrmResult",
    "adjust_p_values",
    "always_valid_p_value",
    "bayesian_summary",
    "benjamini_hochberg",
    "bootstrap_percentile_differences",
    "breach_tuning_n",
    "compare",
    "cuped_ratio_estimates",
    "design_effect",
    "difference_check",
    "effect_check",
    "estimate_limit_check",
    "growth_to_decide",
    "guardrail_check",
    "guardrail_more_factor",
    "half_width",
    "half_width_multiplier",
    "hodges_lehmann_shift",
    "holm",
    "limit_tuning_n",
    "mann_whitney",
    "margin_tuning_n",
    "mean_slo_check",
    "min_trials",
    "mixture_rho_squared",
    "mixture_weight",
    "nearest_rank_percentile",
    "one_sided_multiplier",
    "one_sided_p_value",
    "planned_total_n",
    "proportion_bounds",
    "proportion_limit_check",
    "quantile_cs_ranks",
    "ratio_comparison",
    "ratio_estimate",
    "ratio_guardrail_check",
    "ratio_limit_check",
    "sample_size_per_arm",
    "sequential_one_arm_size",
    "sequential_sample_size",
    "srm_check",
    "srm_sequential",
    "srm_test",
    "step_tuning_n",
    "tail_slo_check",
]
