"""The always-valid bounds of a mean score over sessions (shadow quality): Wilson-like on single pairs, no
zero width, wider when the scores cluster by session."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.stats import RatioStats
from experiments.stats.bounded import session_mean_bounds


def test_scores_over_sessions_are_wilson_like_on_single_pairs_and_never_zero_wide() -> None:
    """session_mean_bounds: with every score its own session the bounds are a Wilson-like interval around the
    share; equal scores give a bound of some width; clustering widens it; under 30 sessions it is [0, 1]."""
    ones = np.ones(40)
    equal = session_mean_bounds(RatioStats.from_units(ones, ones), alpha=0.05)
    assert equal.mean == 1.0 and equal.upper == 1.0 and 0.5 < equal.lower < 0.97
    scores = (np.arange(400) % 10 != 0).astype(float)  # 90 %, single pairs
    single = session_mean_bounds(RatioStats.from_units(scores, np.ones(400)), alpha=0.05)
    assert single.units == single.n == 400 and single.lower < 0.9 < single.upper
    assert single.sd == pytest.approx(0.3, rel=0.01)
    # The same 400 scores in 40 sessions of 10, each session all right or all wrong: far wider.
    clustered = session_mean_bounds(RatioStats.from_units(10 * scores[:40], 10 * np.ones(40)), alpha=0.05)
    assert clustered.units == 40 and clustered.n == 400 and clustered.mean == pytest.approx(single.mean)
    assert clustered.upper - clustered.lower > 2.5 * (single.upper - single.lower)
    few = session_mean_bounds(RatioStats.from_units(ones[:29], ones[:29]), alpha=0.05)
    assert (few.lower, few.upper) == (0.0, 1.0)
