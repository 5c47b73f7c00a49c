"""ENGINE_CPUS: local engines, and every process they start, run on the CPUs named; bad lists are refused."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from config.env import EnvError, cpu_set_parse, env_cpus
from serving.engines.drivers import cpus_check, spawn_engine

# The engine stand-in starts a child of its own (as vLLM's API server starts its EngineCore and workers)
# and writes both processes' CPU sets to the log.
_REPORT = (
    "import os, subprocess, sys\n"
    "child = subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'],"
    " capture_output=True, text=True).stdout.strip()\n"
    "print('engine', sorted(os.sched_getaffinity(0)), 'child', child, flush=True)\n"
)


def _spawned_report(tmp_path: Path, cpus: set[int] | None) -> str:
    log = tmp_path / "engine.log"
    proc = spawn_engine([sys.executable, "-c", _REPORT], log_path=log, die_with_parent=False, cpus=cpus)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while "engine" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return log.read_text()


def test_an_engine_and_its_children_run_on_the_cpus_named(tmp_path: Path) -> None:
    one = min(os.sched_getaffinity(0))
    assert f"engine [{one}] child [{one}]" in _spawned_report(tmp_path, {one})


def test_without_cpus_an_engine_may_run_anywhere_the_agent_may(tmp_path: Path) -> None:
    everywhere = sorted(os.sched_getaffinity(0))
    assert f"engine {everywhere} child {everywhere}" in _spawned_report(tmp_path, None)


def test_env_overrides_reach_the_engine_over_the_defaults_and_the_agents_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    log = tmp_path / "engine.log"
    script = ("import os; print('env', os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'], "
              "os.environ['VLLM_CPU_KVCACHE_SPACE'], os.environ['HF_HUB_OFFLINE'], flush=True)")
    proc = spawn_engine([sys.executable, "-c", script], log_path=log, die_with_parent=False,
                        env_overrides={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert proc.wait(timeout=60) == 0
    assert "env 1 3 1" in log.read_text()
    # Without overrides, the defaults and the agent's own environment.
    proc = spawn_engine([sys.executable, "-c", script], log_path=log, die_with_parent=False)
    assert proc.wait(timeout=60) == 0
    assert "env 0 3 1" in log.read_text()


def test_cpus_the_host_does_not_offer_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not offer: \[4000\]"):
        spawn_engine([sys.executable, "-c", "pass"], log_path=tmp_path / "engine.log", die_with_parent=False,
                     cpus={min(os.sched_getaffinity(0)), 4000})
    assert not (tmp_path / "engine.log").exists()
    with pytest.raises(ValueError, match="none given"):
        cpus_check(set())


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0,2", {0, 2}), ("0-3", {0, 1, 2, 3}), ("4-5, 1", {1, 4, 5}), ("3-3", {3})],
)
def test_cpu_lists_are_read_as_taskset_writes_them(text: str, cpus: set[int]) -> None:
    assert cpu_set_parse(text) == cpus


@pytest.mark.parametrize(("text", "reason"), [("a", "'a' is not a CPU number"), ("3-1", "'3-1' runs backwards"),
                                               ("0,", "'' is not a CPU number"), ("1-", "'1-' is not a CPU")])
def test_a_bad_cpu_list_names_the_variable_and_the_part(monkeypatch: pytest.MonkeyPatch, text: str, reason: str) -> None:
    monkeypatch.setenv("ENGINE_CPUS", text)
    with pytest.raises(EnvError) as raised:
        env_cpus("ENGINE_CPUS")
    assert str(raised.value).startswith("ENGINE_CPUS: expected a CPU list such as 0 or 0-3,6: ")
    assert reason in str(raised.value)


def test_an_unset_cpu_list_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_CPUS", raising=False)
    assert env_cpus("ENGINE_CPUS") is None
