"""Argument checks shared by the public functions; every error names its parameter."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}") from None
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {alpha!r}")
    return value


def breach_level(alpha: float, breach_alpha: Any) -> float:
    """The alpha of a check's breach bound: `breach_alpha` checked like `check_alpha`, or `alpha` when it is
    None (both sides at one level)."""
    return alpha if breach_alpha is None else check_alpha(breach_alpha, "breach_alpha")


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)


def check_positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_non_negative(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return number


def check_finite(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def smallest_enough(enough: Callable[[int], bool], *, start: int = 1, limit: int = 10**10) -> int | None:
    """The smallest whole n >= start with enough(n), for a condition that stays true once true (a sample
    size): doubling, then bisection. None when even `limit` is not enough."""
    high = max(start, 1)
    while not enough(high):
        if high >= limit:
            return None
        high = min(high * 2, limit)
    low = start - 1
    while high - low > 1:
        mid = (low + high) // 2
        if enough(mid):
            high = mid
        else:
            low = mid
    return high


def boundary(
    is_past: Callable[[float], bool], *, before: float, past: float, steps: int = 60, geometric: bool = False
) -> tuple[float, float]:
    """Where a condition turns true between `before` (false there) and `past` (true there), halving the gap
    `steps` times (geometric halving for positive scale factors); returns the last (before, past) pair."""
    for _ in range(steps):
        mid = math.sqrt(before * past) if geometric else (before + past) / 2.0
        if mid in (before, past):
            break
        if is_past(mid):
            past = mid
        else:
            before = mid
    return before, past
