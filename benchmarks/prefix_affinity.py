"""Prefix affinity: TTFT on a shared-prefix workload through the gateway, with and without it, over two vLLM
replicas of one model, in interleaved rounds.

    .venv/bin/python benchmarks/prefix_affinity.py                 # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/prefix_affinity.py --rounds 2 --requests 150

Requests carry no session, so the gateway may place them as it likes. The workload is many long prompt
prefixes (say, one system prompt per customer), each followed by a short question, picked at random: more
distinct prefix tokens than one replica's KV cache holds, fewer than two hold. With affinity (the default,
GATEWAY_PREFIX_AFFINITY=1) a prefix always goes to the same replica, so each replica's cache holds half the
prefixes and keeps them; without it (=0, least-busy replica) both replicas see every prefix and evict each
other's. Before each round both engines' prefix caches are emptied (vLLM's /reset_prefix_cache), then a
warm-up pass, then the measured requests; the engines' own counters give the prefix-cache hit rate.

The demo models have a 256-token context and almost no compute, so a prefix cache saves them nothing worth
measuring: this benchmark builds its own model once (var/bench-models/prefix-cache, random weights, the demo
tokenizer, a 2048-token context, 8 layers), where a 1000-token prefill costs what a cache hit saves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gateway import (  # noqa: E402
    ALIAS,
    GATEWAY_KEY,
    bench_env,
    database_prepare,
    demo_model,
    median,
    percentile,
    process,
)
from tests.support.engines import free_port, running_engine  # noqa: E402
from tests.support.processes import server_flags  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MODEL_DIR = REPO / "var" / "bench-models" / "prefix-cache"
SERVED = "prefix-v1"
DIGITS = "0123456789+"


def model_build() -> Path:
    """A random-weight Llama with the demo tokenizer and a 2048-token context (built once, kept)."""
    if (MODEL_DIR / "config.json").exists():
        return MODEL_DIR
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = Path(demo_model("adder-v1"))
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(source / name, MODEL_DIR / name)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 2048
    (MODEL_DIR / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(MODEL_DIR)
    return MODEL_DIR


def engine_metric(url: str, name: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def prefixes(count: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(DIGITS) for _ in range(length)) for _ in range(count)]


def workload(prefix_list: list[str], requests: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(requests):
        yield rng.choice(prefix_list) + f"{rng.randint(10, 99)}+{rng.randint(10, 99)}="


def run(url: str, prompts: list[str], clients: int) -> list[float]:
    """TTFT (ms) of each prompt, `clients` at a time, through the gateway at `url` (no session)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(prompt: str) -> float:
        # Random weights may well pick tokens that decode to nothing: the first event after the prefill marks
        # the first token, whatever its text.
        body = {"model": ALIAS, "prompt": prompt, "max_tokens": 2, "stream": True, "temperature": 0,
                "ignore_eos": True}
        sent = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120, trust_env=False,
                          headers={"Authorization": f"Bearer {GATEWAY_KEY}"}) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {") and '"choices"' in line:
                    ttft = (time.perf_counter() - sent) * 1000
                    for _ in lines:  # the rest of the stream, from the same iterator (httpx streams it once)
                        pass
                    return ttft
        raise RuntimeError(f"no token from {url}: {response.status_code}")

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefixes", type=int, default=96, help="distinct shared prefixes")
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300, help="measured requests per round and variant")
    parser.add_argument("--warmup", type=int, default=192, help="unmeasured requests first, per round")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    model = model_build()
    tmp = Path(tempfile.mkdtemp(prefix="ramp-bench-prefix-"))
    env = bench_env(tmp)
    logs = tmp / "logs"
    logs.mkdir(parents=True)
    engine_env = {"VLLM_SERVER_DEV_MODE": "1"}  # for /reset_prefix_cache
    engine_args = ["--dtype", "float32", "--max-model-len", "2048", "--enable-prefix-caching"]
    with ExitStack() as stack:
        engines = [stack.enter_context(running_engine(model_dir=model, served_name=SERVED, log_dir=logs / f"e{i}",
                                                      engine_args=engine_args, env_overrides=engine_env))
                   for i in range(2)]
        database_prepare(env, str(model), SERVED, "prefix", {ALIAS: ("v1", [e.base_url for e in engines])})
        gateways = {}
        for name, flag in (("affinity", "1"), ("no-affinity", "0")):
            port = free_port()
            stack.enter_context(process(
                [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--port", str(port), *server_flags()],
                env={**env, "GATEWAY_PREFIX_AFFINITY": flag}, log=logs / f"gateway-{name}.log",
                ready_url=f"http://127.0.0.1:{port}/healthz"))
            gateways[name] = f"http://127.0.0.1:{port}"
        shared = prefixes(args.prefixes, args.prefix_tokens, seed=1)
        results: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "p50": [], "hit": []} for name in gateways}
        import httpx

        for round_index in range(args.rounds):
            order = list(gateways) if round_index % 2 == 0 else list(gateways)[::-1]
            for name in order:
                for engine in engines:
                    httpx.post(f"{engine.base_url}/reset_prefix_cache", timeout=30, trust_env=False).raise_for_status()
                run(gateways[name], list(workload(shared, args.warmup, seed=100 + round_index)), args.clients)
                before = [(engine_metric(e.base_url, "vllm:prefix_cache_hits_total"),
                           engine_metric(e.base_url, "vllm:prefix_cache_queries_total")) for e in engines]
                ttft = run(gateways[name], list(workload(shared, args.requests, seed=200 + round_index)), args.clients)
                hits = sum(engine_metric(e.base_url, "vllm:prefix_cache_hits_total") - h for e, (h, _) in zip(engines, before, strict=True))
                queries = sum(engine_metric(e.base_url, "vllm:prefix_cache_queries_total") - q for e, (_, q) in zip(engines, before, strict=True))
                results[name]["ttft"] += ttft
                results[name]["p50"].append(percentile(ttft, 50))
                results[name]["hit"].append(hits / queries if queries else float("nan"))
                print(f"round {round_index + 1}/{args.rounds} {name}: TTFT p50 {percentile(ttft, 50):.1f} ms, "
                      f"mean {statistics.fmean(ttft):.1f} ms, prefix-cache hit rate {results[name]['hit'][-1]:.2f}",
                      flush=True)
        print()
        print(f"two replicas of a random-weight 8-layer model ({args.prefix_tokens}-token prefixes, "
              f"{args.prefixes} of them, {args.clients} clients, no session), {args.rounds} interleaved rounds of "
              f"{args.requests} measured requests after {args.warmup} warm-up ones; load average at the end "
              + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
        print()
        print("| gateway | TTFT p50 | TTFT p90 | TTFT mean | round p50s | prefix-cache hit rate (tokens) |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {percentile(r['ttft'], 50):.1f} ms | {percentile(r['ttft'], 90):.1f} ms | "
                  f"{statistics.fmean(r['ttft']):.1f} ms | {', '.join(f'{x:.0f}' for x in r['p50'])} | "
                  f"{median(r['hit']):.2f} [{min(r['hit']):.2f}, {max(r['hit']):.2f}] |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
