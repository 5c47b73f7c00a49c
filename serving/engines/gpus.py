"""Which GPUs of a host a local engine gets (pure, but for reading the host's GPU list).

Each engine gets `gpu_count(engine_args)` whole GPUs of its own through CUDA_VISIBLE_DEVICES: two engines
on an 8-GPU host must not both land on GPU 0. An engine that needs more GPUs than the host has can never
start (refused at once, with the reason); one that needs more than are free now waits for a drain."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class GpuFitError(Exception):
    """The engine cannot have the GPUs it needs. `permanent`: it never could on this host."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def gpus_parse(raw: str) -> tuple[str, ...] | None:
    """ENGINE_GPUS: "" or "auto" (None: look at the host), "none" (no GPU), or a list like "0,1,2,3"
    (indexes or GPU UUIDs, as CUDA_VISIBLE_DEVICES takes them). Raises ValueError on a repeated entry."""
    raw = raw.strip()
    if raw in ("", "auto"):
        return None
    if raw == "none":
        return ()
    ids = tuple(part.strip() for part in raw.split(",") if part.strip())
    if len(set(ids)) != len(ids):
        raise ValueError(f"ENGINE_GPUS names a GPU twice: {raw!r}")
    return ids


def host_gpus(configured: tuple[str, ...] | None, env: Mapping[str, str]) -> tuple[str, ...]:
    """The GPUs this host's engines may use: ENGINE_GPUS when given, else the agent's own
    CUDA_VISIBLE_DEVICES (a container given some GPUs), else every GPU nvidia-smi lists, else none."""
    if configured is not None:
        return configured
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


@dataclass(frozen=True)
class GpuAssignment:
    gpu_ids: tuple[str, ...]

    @property
    def visible_devices(self) -> str:
        return ",".join(self.gpu_ids)


def gpus_assign(*, need: int, host: Sequence[str], held: Mapping[int, Sequence[str]]) -> GpuAssignment:
    """`need` GPUs of `host` that no engine in `held` (worker id -> its GPUs) has, lowest first."""
    if need < 1:
        raise ValueError("need must be at least 1")
    if not host:
        raise GpuFitError(
            "this host has no GPU (ENGINE_GPUS, CUDA_VISIBLE_DEVICES and nvidia-smi list none)",
            permanent=True,
        )
    if need > len(host):
        raise GpuFitError(f"needs {need} GPUs, this host has {len(host)} ({','.join(host)})", permanent=True)
    taken = {gpu: worker for worker, gpus in held.items() for gpu in gpus}
    free = [gpu for gpu in host if gpu not in taken]
    if need > len(free):
        holders = ", ".join(f"GPU {gpu}: engine {worker}" for gpu, worker in sorted(taken.items()))
        raise GpuFitError(f"waiting for {need} free GPUs ({len(free)} free; {holders})", permanent=False)
    return GpuAssignment(tuple(free[:need]))
