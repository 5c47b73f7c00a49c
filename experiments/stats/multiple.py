"""Many metrics at once: Holm for guardrails, Benjamini-Hochberg for exploration.

Guardrails decide rollbacks, so a false alarm on any one of them is costly:
Holm controls the family-wise error rate. Exploratory metrics only inform a
report, where controlling the share of false discoveries (BH) is enough and
keeps more power. Both accept always-valid p-values: a stopped always-valid
p-value is a valid p-value, and Holm's union bound over the true nulls then
holds uniformly over looks as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from statsmodels.stats.multitest import multipletests

from ._checks import check_alpha, check_choice

# Our names -> statsmodels' method names.
_METHODS = {"holm": "holm", "benjamini-hochberg": "fdr_bh"}


@dataclass(frozen=True, slots=True)
class MultipleTestResult:
    reject: tuple[bool, ...]
    adjusted_p_values: tuple[float, ...]
    method: str
    alpha: float


def adjust_p_values(p_values: Sequence[float], *, method: str, alpha: float = 0.05) -> MultipleTestResult:
    """Adjust a family of p-values; ``method`` is "holm" or "benjamini-hochberg"."""
    check_choice("method", method, tuple(_METHODS))
    alpha = check_alpha(alpha)
    values = [float(p) for p in p_values]
    if not values:
        raise ValueError("p_values must not be empty")
    for i, p in enumerate(values):
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"p_values[{i}] must be in [0, 1], got {p_values[i]!r}")
    reject, adjusted, _, _ = multipletests(values, alpha=alpha, method=_METHODS[method])
    return MultipleTestResult(
        reject=tuple(bool(r) for r in reject),
        adjusted_p_values=tuple(float(p) for p in adjusted),
        method=method,
        alpha=alpha,
    )


def holm(p_values: Sequence[float], *, alpha: float = 0.05) -> MultipleTestResult:
    """Holm's step-down procedure (family-wise error rate <= alpha)."""
    return adjust_p_values(p_values, method="holm", alpha=alpha)


def benjamini_hochberg(p_values: Sequence[float], *, alpha: float = 0.05) -> MultipleTestResult:
    """Benjamini-Hochberg step-up procedure (false discovery rate <= alpha)."""
    return adjust_p_values(p_values, method="benjamini-hochberg", alpha=alpha)
