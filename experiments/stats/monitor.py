"""Running state of a sequential comparison across looks."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ._checks import check_alpha, check_choice, check_positive
from .arm import ArmStats
from .comparison import Comparison, compare
from .estimators import DIFFERENCES, KINDS


@dataclass
class Monitor:
    """Keeps the running intersection of intervals and the running minimum p-value.

    A confidence sequence covers the true effect at every look simultaneously,
    so the intersection of all intervals seen so far covers it as well, and the
    smallest p-value seen so far is still a valid p-value (the p-value is
    below x at some look only if the interval at level x excluded 0 at that
    look, which happens with probability at most x). Both only ever tighten, which
    keeps a decision from flip-flopping as new data arrive.

    The state is plain numbers, so ``dataclasses.asdict`` serialises it and the
    analysis task can keep it between looks. An interval that misses the
    running intersection entirely means the effect moved over time (or the
    1 - alpha guarantee failed); ``drift_detected`` records that and the
    intersection keeps its previous value.
    """

    kind: str = "mean"
    difference: str = "absolute"
    alpha: float = 0.05
    tuning_n: float = 5000
    looks: int = 0
    min_p_value: float = 1.0
    ci_low: float = -math.inf
    ci_high: float = math.inf
    effect: float = math.nan
    drift_detected: bool = False

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("difference", self.difference, DIFFERENCES)
        self.alpha = check_alpha(self.alpha)
        self.tuning_n = check_positive("tuning_n", self.tuning_n)
        if self.looks < 0:
            raise ValueError(f"looks must not be negative, got {self.looks}")
        if not (0.0 <= self.min_p_value <= 1.0):
            raise ValueError(f"min_p_value must be in [0, 1], got {self.min_p_value!r}")
        if self.ci_low > self.ci_high:
            raise ValueError(f"ci_low ({self.ci_low!r}) must not exceed ci_high ({self.ci_high!r})")

    def observe(self, baseline: ArmStats, candidate: ArmStats) -> Comparison:
        """Compare the cumulative statistics at this look and fold the result in.

        Returns this look's comparison with the running interval and the running
        minimum p-value in place of the look's own.
        """
        result = compare(
            baseline,
            candidate,
            kind=self.kind,
            difference=self.difference,
            method="sequential",
            alpha=self.alpha,
            tuning_n=self.tuning_n,
        )
        return self.fold(result)

    def fold(self, result: Comparison) -> Comparison:
        """Fold an already computed sequential comparison into the running state."""
        if result.method != "sequential":
            raise ValueError(
                "result must come from compare(..., method='sequential'): fixed-horizon intervals "
                "are not valid across looks, so their intersection is not either"
            )
        if (result.kind, result.difference, result.alpha) != (self.kind, self.difference, self.alpha):
            raise ValueError(
                "result must have the monitor's kind, difference and alpha "
                f"({self.kind}, {self.difference}, {self.alpha}), got "
                f"({result.kind}, {result.difference}, {result.alpha})"
            )
        low = max(self.ci_low, result.ci_low)
        high = min(self.ci_high, result.ci_high)
        if low > high:
            self.drift_detected = True
        else:
            self.ci_low, self.ci_high = low, high
        self.looks += 1
        self.min_p_value = min(self.min_p_value, result.p_value)
        self.effect = result.effect
        return replace(result, ci_low=self.ci_low, ci_high=self.ci_high, p_value=self.min_p_value)
