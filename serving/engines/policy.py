"""When to restart a crashed engine and when to give up on it (pure)."""

from __future__ import annotations


def restart_delay_s(*, failures: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before restarting after the `failures`-th failure in a row (1 is the first).

    Doubling from `base_s`, capped at `max_s`: an engine that fails at once does not spin the CPU that
    the other engines need, and one that failed once comes back quickly."""
    if failures < 1:
        raise ValueError(f"failures must be at least 1, got {failures}")
    if base_s < 0 or max_s < 0:
        raise ValueError("base_s and max_s must not be negative")
    # 2**n overflows a float past n = 1023; the cap is reached long before.
    exponent = min(failures - 1, 60)
    return min(max_s, base_s * 2.0**exponent)


def gives_up(*, failures: int, max_failures: int) -> bool:
    """After `max_failures` failures in a row the worker is FAILED and waits for a person."""
    return failures >= max_failures
