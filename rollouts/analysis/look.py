"""What one look at a rollout found and decided: the record both the checks and the policy fill in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rollouts.models import Rollout, RolloutAnalysis

State = Rollout.State
D = RolloutAnalysis.Decision

# Gateways see a route change within a second; requests in the first seconds of a step may still have
# been split by the previous weights, which would read as a sample ratio mismatch.
ROUTE_SETTLE = timedelta(seconds=2)
# A look's lease on its rollout, renewed every third of it while the look runs (`apply.LeaseKept`, up to
# ROLLOUT_LOOK_MAX_S): a worker that dies holding it delays the next look by at most this.
LEASE_S = 60.0


@dataclass
class Look:
    decision: str
    reason: str
    window_start: datetime | None = None
    arms: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    srm: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    alpha: dict[str, Any] | None = None  # the rollout's alpha split (`checks.alpha_split`)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # exploratory: reported, never decided on
    # The step's planned sample and what reaching it undecided did (the plan's on_inconclusive).
    inconclusive: dict[str, Any] | None = None
    # Bookkeeping the look asks the rollout to keep (rollout_analysis_release): the step's planned sample.
    keep: dict[str, Any] = field(default_factory=dict)

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arms": self.arms, "checks": self.checks}
        if self.srm is not None:
            out["srm"] = self.srm
        if self.window_start is not None:
            out["window_start"] = self.window_start.isoformat()
        if self.gate is not None:
            out["eval_gate"] = self.gate
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.inconclusive is not None:
            out["inconclusive"] = self.inconclusive
        return out


def num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")

