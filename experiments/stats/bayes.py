"""Bayesian summary for the UI: chance to win and expected loss.

Gaussian model: the estimated effect is normal around the true effect with the
comparison's standard error, and the prior on the true effect is flat (or
normal, if given). The posterior is then normal and both numbers are closed
form. They summarise, they do not decide: rollouts decide on the sequential tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import special

from ._checks import check_alpha, check_choice, check_finite, check_positive
from .arm import ArmStats
from .comparison import compare
from .decisions import DIRECTIONS


@dataclass(frozen=True, slots=True)
class BayesianSummary:
    """Posterior of the effect (candidate vs baseline) and what it implies.

    ``expected_loss`` is what choosing the candidate costs on average when it
    is in fact worse, E[max(0, -gain)], in the effect's units;
    ``expected_loss_baseline`` the same for keeping the baseline.
    """

    chance_to_win: float
    expected_loss: float
    expected_loss_baseline: float
    posterior_mean: float
    posterior_sd: float
    credible_low: float
    credible_high: float
    direction: str
    difference: str


def _normal_shortfall(mean: float, sd: float) -> float:
    """E[max(0, -G)] for G ~ N(mean, sd^2)."""
    if sd == 0:
        return max(0.0, -mean)
    z = mean / sd
    density = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return sd * density - mean * float(special.ndtr(-z))


def bayesian_summary(
    baseline: ArmStats,
    candidate: ArmStats,
    *,
    kind: str = "mean",
    difference: str = "relative",
    direction: str = "higher_is_better",
    prior_mean: float = 0.0,
    prior_sd: float | None = None,
    credible_level: float = 0.95,
) -> BayesianSummary:
    """Chance that the candidate is better, and the expected loss of each choice.

    With ``prior_sd`` set, the effect gets a N(prior_mean, prior_sd^2) prior
    and the posterior is the precision-weighted average; without, a flat prior.
    """
    check_choice("direction", direction, DIRECTIONS)
    prior_mean = check_finite("prior_mean", prior_mean)
    level = 1.0 - check_alpha(1.0 - float(credible_level), "1 - credible_level")
    result = compare(baseline, candidate, kind=kind, difference=difference, method="fixed")
    mean, sd = result.effect, result.standard_error
    if prior_sd is not None:
        prior_sd = check_positive("prior_sd", prior_sd)
        if sd == 0:
            pass  # the data pin the effect exactly; the prior adds nothing
        else:
            precision = 1.0 / prior_sd**2 + 1.0 / sd**2
            mean = (prior_mean / prior_sd**2 + mean / sd**2) / precision
            sd = math.sqrt(1.0 / precision)
    gain_mean = mean if direction == "higher_is_better" else -mean
    if sd == 0:
        chance = 1.0 if gain_mean > 0 else (0.5 if gain_mean == 0 else 0.0)
    else:
        chance = float(special.ndtr(gain_mean / sd))
    z = -float(special.ndtri((1.0 - level) / 2.0))
    return BayesianSummary(
        chance_to_win=chance,
        expected_loss=_normal_shortfall(gain_mean, sd),
        expected_loss_baseline=_normal_shortfall(-gain_mean, sd),
        posterior_mean=mean,
        posterior_sd=sd,
        credible_low=mean - z * sd,
        credible_high=mean + z * sd,
        direction=direction,
        difference=difference,
    )
