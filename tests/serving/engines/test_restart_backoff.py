from __future__ import annotations

import pytest

from serving.engines.policy import gives_up, restart_delay_s


def test_the_delay_doubles_from_the_base_after_each_failure_in_a_row() -> None:
    delays = [restart_delay_s(failures=n, base_s=5, max_s=300) for n in range(1, 6)]
    assert delays == [5, 10, 20, 40, 80]


def test_the_delay_is_capped_even_after_very_many_failures() -> None:
    assert restart_delay_s(failures=7, base_s=5, max_s=300) == 300
    assert restart_delay_s(failures=10_000, base_s=5, max_s=300) == 300


def test_a_zero_base_restarts_at_once() -> None:
    assert restart_delay_s(failures=3, base_s=0, max_s=300) == 0


@pytest.mark.parametrize("failures", [0, -1])
def test_there_is_no_delay_before_the_first_failure(failures: int) -> None:
    with pytest.raises(ValueError, match="failures must be at least 1"):
        restart_delay_s(failures=failures, base_s=5, max_s=300)


def test_the_agent_gives_up_at_the_configured_number_of_failures_in_a_row() -> None:
    assert not gives_up(failures=4, max_failures=5)
    assert gives_up(failures=5, max_failures=5)
    assert gives_up(failures=1, max_failures=1)
