"""The two drivers. `local` runs vLLM as a child process of the agent; `static` is an endpoint someone
else runs, which the agent only probes (it never starts or stops a process for it)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from serving.engines.command import SERVER_MODULE, artifact_is_local, engine_env, vllm_command

LOG_TAIL_LINES = 50
LOG_TAIL_BYTES = 64 * 1024
# A per-engine log past this is rotated (one old copy kept) when the engine starts again.
LOG_ROTATE_BYTES = 20 * 1024 * 1024

PR_SET_PDEATHSIG = 1

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
    _prctl = None


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: SIGTERM the engine when the agent dies, however it dies.

    SIGTERM, not SIGKILL: vLLM's API server takes its EngineCore and worker processes down with it on
    SIGTERM (about 3 s), while a SIGKILLed API server leaves them running as orphans holding gigabytes.
    Only async-signal-safe work here: the libc function was looked up before the fork."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # The agent may have died between fork and prctl; then nobody would send the signal.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalEngine:
    """A vLLM process this agent started. The process leads its own process group (its pid is the
    group id), so one signal reaches the API server, its EngineCore and its workers."""

    worker_id: int
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    gpus: tuple[str, ...] = ()
    started: float = field(default_factory=time.monotonic)
    term_sent: float | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        """None while it runs (the agent's main thread alone calls this: it reaps)."""
        return self.proc.poll()

    def terminate(self) -> None:
        if self.term_sent is None:
            self.term_sent = time.monotonic()
        process_group_signal(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        self.killed = True
        process_group_signal(self.pid, signal.SIGKILL)

    def reap_group(self) -> None:
        """After the API server exited, its EngineCore and workers may live on: kill what is left."""
        process_group_signal(self.pid, signal.SIGKILL)


def process_group_signal(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if nothing was left to signal."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _rotate(log_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_suffix(log_path.suffix + ".1"))


def cpus_check(cpus: Collection[int]) -> None:
    """Raise ValueError unless this process may run on every CPU in `cpus` (so may an engine it starts)."""
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - allowed)
    if not cpus or missing:
        raise ValueError(f"ENGINE_CPUS names CPUs this host does not offer: {missing or 'none given'}; "
                         f"available: {sorted(allowed)}")


def spawn_engine(command: Sequence[str], *, log_path: Path, header: str = "", die_with_parent: bool = True,
                 cpus: Collection[int] | None = None, env_overrides: Mapping[str, str] | None = None,
                 offline: bool = True) -> subprocess.Popen[bytes]:
    """Launch an engine as the leader of its own process group, output appended to `log_path`.

    `die_with_parent` arms PR_SET_PDEATHSIG, which fires when the *thread* that forked the child exits:
    launch from a thread that lives as long as the engine should (the agent's main thread). `cpus` pins
    the engine, and every process it starts, to those CPUs (vLLM's CPU worker binds its threads within
    them). `env_overrides` are set in the engine's environment over this process's and the engine defaults;
    `offline` keeps the hub out of reach (local weights)."""
    parent = os.getpid()
    cpu_set = None if cpus is None else set(cpus)
    if cpu_set is not None:
        cpus_check(cpu_set)

    def before_exec() -> None:
        if cpu_set is not None:
            os.sched_setaffinity(0, cpu_set)
        if die_with_parent:
            _die_with_parent(parent)

    with log_path.open("ab") as log:
        if header:
            log.write(header.encode() + b"\n")
            log.flush()
        return subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=engine_env({**os.environ, **(env_overrides or {})}, offline=offline),
            start_new_session=True, close_fds=True,
            preexec_fn=before_exec if (die_with_parent or cpu_set is not None) else None,
        )


def local_start(
    *,
    worker_id: int,
    model: str,
    served_model_name: str,
    engine_args: Sequence[str],
    host: str,
    port: int,
    log_dir: Path,
    cpus: Collection[int] | None = None,
    build: str = "cpu",
    gpus: Sequence[str] = (),
    api_key: str = "",
) -> LocalEngine:
    """Launch vLLM for one worker, output appended to `log_dir/engine-<id>.log`. From the main thread.

    On the CPU build with --enforce-eager; on a GPU build on `gpus` alone (CUDA_VISIBLE_DEVICES). The engine
    wants `api_key` on its /v1 routes: given in its environment (VLLM_API_KEY, what --api-key would set), not
    on its command line, which `ps` and the log's first line show. The hub is out of reach when the weights
    are a local directory, and within reach for a hub id."""
    command = vllm_command(model=model, served_model_name=served_model_name, port=port, host=host,
                           engine_args=engine_args, enforce_eager=build == "cpu")
    overrides = {"VLLM_API_KEY": api_key} if api_key else {}
    if gpus:
        overrides["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"engine-{worker_id}.log"
    _rotate(log_path)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    pinned = f" (CPUs {','.join(map(str, sorted(cpus)))})" if cpus is not None else ""
    on_gpus = f" (GPUs {','.join(gpus)})" if gpus else ""
    proc = spawn_engine(command, log_path=log_path, cpus=cpus, env_overrides=overrides, offline=artifact_is_local(model),
                        header=f"--- {stamp} agent {os.getpid()} starts{pinned}{on_gpus}: {' '.join(command)}")
    return LocalEngine(worker_id=worker_id, proc=proc, port=port, log_path=log_path, gpus=tuple(gpus))


def log_tail(log_path: Path, *, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of an engine's log ("" before it wrote any)."""
    try:
        with log_path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            data = handle.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    # vLLM redraws progress bars with carriage returns: keep what a terminal would show.
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    if size > LOG_TAIL_BYTES and shown:
        shown = shown[1:]  # the first line was cut
    return "\n".join(shown[-lines:])


def stale_engine_kill(*, pid: int, port: int | None) -> bool:
    """Kill an engine a dead agent on this machine left behind, if `pid` still is that engine.

    Engines die with their agent (PDEATHSIG), so this is a safety net; the command line is checked so a
    reused pid is never killed."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [part.decode(errors="replace") for part in cmdline]
    if SERVER_MODULE not in args or (port is not None and str(port) not in args):
        return False
    return process_group_signal(pid, signal.SIGKILL)
