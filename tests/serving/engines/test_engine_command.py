from __future__ import annotations

import sys

import pytest

from serving.engines.command import engine_env, vllm_command


def test_the_command_runs_the_api_server_module_with_the_agents_flags_then_the_versions() -> None:
    command = vllm_command(model="/models/adder-v1", served_model_name="adder-v1", port=8123,
                           engine_args=["--max-model-len", "64", "--dtype=float32"])
    assert command == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/models/adder-v1", "--served-model-name", "adder-v1",
        "--host", "127.0.0.1", "--port", "8123", "--enforce-eager", "--disable-uvicorn-access-log",
        "--max-model-len", "64", "--dtype=float32",
    ]


def test_enforce_eager_is_not_repeated_when_the_version_names_it() -> None:
    command = vllm_command(model="m", served_model_name="m", port=1, engine_args=["--enforce-eager"])
    assert command.count("--enforce-eager") == 1


def test_a_gpu_host_may_bind_elsewhere_and_use_another_python() -> None:
    command = vllm_command(model="org/model", served_model_name="m", port=9000, host="0.0.0.0", python="/opt/py")
    assert command[0] == "/opt/py"
    assert command[command.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("flag", ["--port", "--port=9", "--model", "--served-model-name", "--host=0.0.0.0"])
def test_engine_args_may_not_override_what_the_agent_probes(flag: str) -> None:
    with pytest.raises(ValueError, match=f"engine_args may not set {flag.split('=')[0]}"):
        vllm_command(model="m", served_model_name="m", port=1, engine_args=[flag, "9"])


def test_the_environment_keeps_the_callers_settings_and_fills_in_the_cpu_defaults() -> None:
    env = engine_env({"PATH": "/usr/bin", "VLLM_CPU_KVCACHE_SPACE": "4"})
    assert env["PATH"] == "/usr/bin"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert engine_env({})["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # The model runs in the engine-core process unless the caller asks for vLLM's worker process.
    assert engine_env({})["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_the_platforms_secrets_do_not_reach_the_engine() -> None:
    env = engine_env({"SECRET_KEY": "s", "DATABASE_URL": "postgres://u:p@h/db", "SLACK_BOT_TOKEN_FILE": "/run/t",
                      "HOME": "/root"})
    assert set(env) & {"SECRET_KEY", "DATABASE_URL", "SLACK_BOT_TOKEN_FILE"} == set()
    assert env["HOME"] == "/root"
