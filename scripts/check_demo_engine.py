"""Manual check: serve the demo models with real vLLM (CPU) and measure them.

    .venv/bin/python scripts/check_demo_engine.py [--models-dir DIR] [--port 8301]

Builds the demo models first (a cache hit after the first time), then, two
engines at a time, checks readiness (/health, /v1/models, a 1-token completion),
completions and chat completions, streaming with usage, exact match on the
held-out sums through the engine, and TTFT/TPOT of adder-v2 against adder-v2-slow
with interleaved requests. Prints figures; exits non-zero if a check fails. Every
engine it starts is stopped before it exits.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serving.demo_models import BuiltModel, build_demo_models, heldout_sums  # noqa: E402
from serving.engines.command import engine_env, vllm_command  # noqa: E402

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("  ok   " if ok else "  FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


class Engine:
    def __init__(self, model: BuiltModel, port: int, log_dir: Path) -> None:
        self.model, self.port = model, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{model.name}.log"
        # The command line and environment the engine agent gives its engines.
        env = engine_env()
        cmd = vllm_command(model=str(model.path), served_model_name=model.served_name, port=port,
                           engine_args=[*model.engine_args, *os.environ.get("EXTRA_VLLM_ARGS", "").split()])
        self.started = time.monotonic()
        # Own session, so stopping it takes its engine-core children too.
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.get(self.base + "/health").status_code == 200:
                        names = [m["id"] for m in client.get(self.base + "/v1/models").json()["data"]]
                        if self.model.served_name in names:
                            r = client.post(self.base + "/v1/completions", json={
                                "model": self.model.served_name, "prompt": "1+1=", "max_tokens": 1})
                            if r.status_code == 200:
                                self.ready_s = time.monotonic() - self.started
                                return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        return False

    def rss_mib(self) -> float:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs) / 2**20
        except psutil.Error:
            return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def complete(client: httpx.Client, engine: Engine, prompt: str, **extra: object) -> dict:
    r = client.post(engine.base + "/v1/completions", json={"model": engine.model.served_name, "prompt": prompt, **extra})
    r.raise_for_status()
    return r.json()


def stream_timed(client: httpx.Client, engine: Engine, body: dict, path: str) -> dict:
    """TTFT, E2E, TPOT as DESIGN.md defines them, from one streamed request."""
    body = dict(body, model=engine.model.served_name, stream=True, stream_options={"include_usage": True})
    sent = time.perf_counter()
    ttft = None
    text = ""
    usage = None
    done = False
    with client.stream("POST", engine.base + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - sent
                text += piece
    e2e = time.perf_counter() - sent
    n = usage["completion_tokens"] if usage else 0
    return {"text": text, "ttft": ttft, "e2e": e2e, "n": n, "done": done,
            "tpot": (e2e - ttft) / (n - 1) if ttft is not None and n > 1 else None}


def check_engine(engine: Engine) -> list[str]:
    name = engine.model.served_name
    print(f"{name}: ready in {engine.ready_s:.1f}s, RSS {engine.rss_mib():.0f} MiB (all engine processes)")
    with httpx.Client(timeout=60) as client:
        out = complete(client, engine, "37+48=")
        check(out["choices"][0]["text"] == "85" or name.endswith("broken"), f"{name} completion 37+48= -> {out['choices'][0]['text']!r}")
        check(out["choices"][0]["finish_reason"] == "stop", f"{name} completion stops on <eos>")
        for content in ("37+48", "37+48=", "37 + 48 ="):
            r = client.post(engine.base + "/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": content}]})
            answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            check(r.status_code == 200 and (answer == "85" or name.endswith("broken")), f"{name} chat {content!r} -> {answer!r}")
        r = client.post(engine.base + "/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "Hello! What's 2+2? ünïcode"}]})
        check(r.status_code == 200, f"{name} chat with arbitrary text answers ({r.status_code}, {r.text[:80]!r})")
        s = stream_timed(client, engine, {"messages": [{"role": "user", "content": "37+48"}]}, "/v1/chat/completions")
        check(s["done"] and s["n"] >= 1 and (s["text"] == "85" or name.endswith("broken")),
              f"{name} streamed chat -> {s['text']!r}, usage completion_tokens={s['n']}")
        # Exact match through the engine, a few requests at a time as an eval run would.
        items = heldout_sums()
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda item: complete(client, engine, item[0])["choices"][0]["text"], items))
        em = sum(t == ref for t, (_, ref) in zip(texts, items, strict=True)) / len(items)
        same = sum(t == a for t, a in zip(texts, engine.model.heldout_answers, strict=True))
        # Without the model's --dtype float32 (EXTRA_VLLM_ARGS="--dtype bfloat16" to
        # try), a few answers flip in bf16; a good model should not move much.
        check(abs(em - engine.model.exact_match) <= 0.03,
              f"{name} engine exact match {em:.3f} (torch float32 {engine.model.exact_match:.3f}); "
              f"{same}/{len(items)} answers identical to torch")
    return texts


def latency(engines: list[Engine], rounds: int) -> None:
    body = {"prompt": "37+48=", "max_tokens": 16, "ignore_eos": True}
    samples: dict[str, list[dict]] = {e.model.served_name: [] for e in engines}
    with httpx.Client(timeout=60) as client:
        for e in engines:
            stream_timed(client, e, body, "/v1/completions")  # warm-up
        # Interleaved, so background load on this shared machine hits both alike.
        for _ in range(rounds):
            for e in engines:
                samples[e.model.served_name].append(stream_timed(client, e, body, "/v1/completions"))
    for name, runs in samples.items():
        check(all(r["n"] == 16 for r in runs), f"{name} ignore_eos gives 16 tokens")
        ttft = statistics.median(r["ttft"] for r in runs) * 1000
        tpot = statistics.median(r["tpot"] for r in runs) * 1000
        e2e = statistics.median(r["e2e"] for r in runs) * 1000
        print(f"  {name}: median TTFT {ttft:.1f} ms, TPOT {tpot:.2f} ms, E2E {e2e:.1f} ms over {len(runs)} requests")
        samples[name] = [{"tpot": tpot}]
    if len(engines) == 2:
        a, b = (samples[e.model.served_name][0]["tpot"] for e in engines)
        print(f"  TPOT ratio {engines[1].model.served_name}/{engines[0].model.served_name}: {b / a:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("DEMO_MODELS_DIR") or REPO_ROOT / "var" / "demo-models"))
    parser.add_argument("--port", type=int, default=8301, help="first of two ports used")
    parser.add_argument("--rounds", type=int, default=20, help="latency requests per model")
    parser.add_argument("--only", nargs="*", help="model names to check (default all)")
    args = parser.parse_args()

    built = {m.name: m for m in build_demo_models(args.models_dir)}
    log_dir = args.models_dir / "engine-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Two engines at once at most: each takes about 3 GB.
    pairs = [("adder-v2", "adder-v2-slow"), ("adder-v1", "adder-v2-broken")]
    if args.only:
        pairs = [tuple(n for n in pair if n in args.only) for pair in pairs]
    for pair in filter(None, pairs):
        engines = [Engine(built[name], args.port + i, log_dir) for i, name in enumerate(pair)]
        try:
            for e in engines:
                ok = e.wait_ready()
                check(ok, f"{e.model.served_name} ready (log {e.log_path})")
            if not all(e.ready_s for e in engines):
                continue
            answers = {e.model.served_name: check_engine(e) for e in engines}
            if set(answers) == {"adder-v2", "adder-v2-slow"}:
                check(answers["adder-v2"] == answers["adder-v2-slow"],
                      "adder-v2-slow answers every held-out sum as adder-v2 does, through the engine")
            if pair[0] == "adder-v2":
                latency(engines, args.rounds)
            for e in engines:
                print(f"  {e.model.served_name} RSS after the checks: {e.rss_mib():.0f} MiB")
        finally:
            for e in engines:
                e.stop()
    print("FAILED: " + "; ".join(FAILURES) if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
