"""Fixed-horizon intervals and p-values: valid only when looked at once.

Means use Student's t with the Welch-Satterthwaite degrees of freedom, which
is exactly scipy.stats.ttest_ind(equal_var=False); proportions use the normal
with the unpooled variance p(1 - p), which is statsmodels' Wald test.
"""

from __future__ import annotations

import math

from scipy import special

from .estimators import Difference


def fixed_interval(diff: Difference, *, alpha: float) -> tuple[float, float, float]:
    """Two-sided (ci_low, ci_high, p_value) for H0: effect == 0 at level alpha."""
    se = diff.standard_error
    if se == 0:
        # No spread in either arm: the estimate is exact, so any non-zero effect is certain.
        return diff.effect, diff.effect, (1.0 if diff.effect == 0 else 0.0)
    statistic = abs(diff.effect) / se
    # scipy.special's ufuncs are what scipy.stats.t / norm call underneath, minus
    # the distribution-object overhead (this runs on every look of every rollout).
    if math.isinf(diff.df):
        p_value = 2.0 * float(special.ndtr(-statistic))
        critical = -float(special.ndtri(alpha / 2.0))
    else:
        p_value = 2.0 * float(special.stdtr(diff.df, -statistic))
        critical = float(special.stdtrit(diff.df, 1.0 - alpha / 2.0))
    return diff.effect - critical * se, diff.effect + critical * se, min(p_value, 1.0)
