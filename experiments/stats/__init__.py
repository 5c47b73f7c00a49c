"""Statistics for rollouts and experiments, from sufficient statistics.

Pure Python (numpy, scipy, statsmodels); nothing here imports Django or the
rest of the platform. The stable facade is ``ArmStats``, ``compare`` and
``srm_test`` (per-observation sums, DESIGN.md's contract).

What a rollout decides with (``rollouts.analysis.checks``): metrics as ratios
over sessions (``clustered``: the delta method, CUPED with theta pooled),
guardrails on them (``ratio_checks``: geometric means on the log scale, the
score test of two shares, evidence pooled over steps), shares and tails
against limits (``proportions``: the beta-binomial confidence sequence, the
quantile confidence sequence), the sequential sample-ratio check
(``srm.srm_sequential``), Benjamini-Hochberg over the metrics no check decides
on, and the planning of samples and N* (``planning``).

What it does not, and why:

- ``compare``, ``guardrail_check``, ``mean_slo_check``, ``tail_slo_check``,
  ``srm_check``: per-request versions, valid when requests are independent;
  the rollout's units are sessions. Kept as the per-observation facade.
- ``Monitor`` (running intersection of intervals): valid only if the effect
  is the same over time; load changes across steps make it drift, and the
  intersection would then lock in an early interval. Each look's confidence
  sequence is valid at every look by itself.
- ``holm``: a check's level would depend on the other checks' ranks at each
  look, so no check could be told its alpha in advance (the eval gate runs
  before any traffic) nor show one interval as the one it decided on
  (``rollouts.plans.alpha``).
- ``mann_whitney``/``hodges_lehmann_shift``, ``bootstrap_percentile_differences``,
  ``bayesian_summary``, ``sample_size_per_arm``: fixed-horizon or per-request
  summaries for a finished window's report; a decision taken at every look
  needs the always-valid bounds above (the experiments page's chance of being
  better is the session-level estimate's normal posterior instead).
"""

from __future__ import annotations

from ._checks import breach_level, smallest_enough
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
    "breach_level",
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
    "smallest_enough",
    "srm_check",
    "srm_sequential",
    "srm_test",
    "step_tuning_n",
    "tail_slo_check",
]
