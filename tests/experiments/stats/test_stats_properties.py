"""Property tests: merge order, intervals around their estimate, monotonicity in alpha."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.stats import ArmStats, compare, guardrail_check

# Whole numbers keep every float sum exact, so "any order" can be checked with ==.
_integers = st.lists(st.integers(min_value=-1000, max_value=1000), min_size=1, max_size=40)
_reals = st.lists(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False), min_size=2, max_size=60
)
_positive = st.lists(st.floats(min_value=0.001, max_value=1e3, allow_nan=False), min_size=2, max_size=60)
_alpha = st.floats(min_value=0.001, max_value=0.5)
_kind = st.sampled_from(["mean", "proportion"])
_difference = st.sampled_from(["absolute", "relative"])
_method = st.sampled_from(["fixed", "sequential"])


@settings(deadline=None, max_examples=60)
@given(windows=st.lists(_integers, min_size=1, max_size=8), data=st.data())
def test_merging_in_any_order_gives_the_same_statistics(
    windows: list[list[int]], data: st.DataObject
) -> None:
    arms = [
        ArmStats.from_values([float(v) for v in w], covariate=[float(v * v % 7) for v in w]) for w in windows
    ]
    order = data.draw(st.permutations(range(len(arms))))
    forward = sum(arms, ArmStats.empty())
    shuffled = sum((arms[i] for i in order), ArmStats.empty())
    nested = ArmStats.empty()
    for i in reversed(order):
        nested = arms[i].merge(nested)
    assert forward == shuffled == nested
    everything = ArmStats.from_values(
        [float(v) for w in windows for v in w], covariate=[float(v * v % 7) for w in windows for v in w]
    )
    assert forward == everything


@settings(deadline=None, max_examples=60)
@given(windows=st.lists(_reals, min_size=2, max_size=6), data=st.data())
def test_merge_order_does_not_change_a_comparison(windows: list[list[float]], data: st.DataObject) -> None:
    arms = [ArmStats.from_values(w) for w in windows]
    order = data.draw(st.permutations(range(len(arms))))
    baseline = ArmStats.from_values([1.0, 2.0, 3.0, 5.0])
    a = compare(baseline, sum(arms, ArmStats.empty()), method="fixed")
    b = compare(baseline, sum((arms[i] for i in order), ArmStats.empty()), method="fixed")
    for field in ("effect", "ci_low", "ci_high", "p_value"):
        x, y = getattr(a, field), getattr(b, field)
        assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6), field


def _arm(kind: str, values: list[float], ones: int, n: int) -> ArmStats:
    return ArmStats.from_values(values) if kind == "mean" else ArmStats.from_counts(ones, n)


@settings(deadline=None, max_examples=100)
@given(
    kind=_kind,
    difference=_difference,
    method=_method,
    alpha=_alpha,
    a=_positive,
    b=_positive,
    ones=st.tuples(st.integers(1, 500), st.integers(0, 500)),
    n=st.tuples(st.integers(2, 500), st.integers(2, 500)),
)
def test_intervals_contain_the_estimate(
    kind: str,
    difference: str,
    method: str,
    alpha: float,
    a: list[float],
    b: list[float],
    ones: tuple[int, int],
    n: tuple[int, int],
) -> None:
    baseline = _arm(kind, a, min(ones[0], n[0]), n[0])
    candidate = _arm(kind, b, min(ones[1], n[1]), n[1])
    result = compare(baseline, candidate, kind=kind, difference=difference, method=method, alpha=alpha)
    assert result.ci_low <= result.effect <= result.ci_high
    assert 0.0 <= result.p_value <= 1.0


@settings(deadline=None, max_examples=100)
@given(
    kind=_kind,
    difference=_difference,
    method=_method,
    alphas=st.tuples(_alpha, _alpha),
    a=_positive,
    b=_positive,
    ones=st.tuples(st.integers(1, 500), st.integers(0, 500)),
    n=st.tuples(st.integers(2, 500), st.integers(2, 500)),
    tuning_n=st.floats(min_value=10, max_value=1e6),
)
def test_a_larger_alpha_never_gives_a_wider_interval(
    kind: str,
    difference: str,
    method: str,
    alphas: tuple[float, float],
    a: list[float],
    b: list[float],
    ones: tuple[int, int],
    n: tuple[int, int],
    tuning_n: float,
) -> None:
    small, large = sorted(alphas)
    baseline = _arm(kind, a, min(ones[0], n[0]), n[0])
    candidate = _arm(kind, b, min(ones[1], n[1]), n[1])
    kwargs = {"kind": kind, "difference": difference, "method": method, "tuning_n": tuning_n}
    narrow = compare(baseline, candidate, alpha=large, **kwargs)  # type: ignore[arg-type]
    wide = compare(baseline, candidate, alpha=small, **kwargs)  # type: ignore[arg-type]
    slack = 1e-9 * (abs(wide.ci_high) + abs(wide.ci_low) + 1e-300)
    assert narrow.ci_high - narrow.ci_low <= wide.ci_high - wide.ci_low + slack


@settings(deadline=None, max_examples=100)
@given(
    a=_positive,
    b=_positive,
    margin=st.floats(min_value=0.0, max_value=1.0),
    relative=st.booleans(),
    direction=st.sampled_from(["lower_is_better", "higher_is_better"]),
)
def test_guardrail_decision_agrees_with_its_bounds(
    a: list[float], b: list[float], margin: float, relative: bool, direction: str
) -> None:
    result = guardrail_check(
        ArmStats.from_values(a),
        ArmStats.from_values(b),
        margin=margin,
        relative=relative,
        direction=direction,
        min_n=2,
    )
    if math.isnan(result.effect):
        assert result.decision == "undecided"
        return
    assert result.lower_bound <= result.effect <= result.bound
    if result.decision == "breach":
        assert result.lower_bound > margin
    elif result.decision == "safe":
        assert result.bound <= margin
    else:
        assert result.lower_bound <= margin < result.bound
