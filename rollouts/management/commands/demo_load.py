"""A small background load for the demo: random two-digit sums to the demo aliases through the gateway.

Streams chat completions (so the gateway measures TTFT and TPOT) with sticky `user` ids drawn from a pool,
at a few requests per second in all, until stopped. Waits for the gateway to come up; an answer that fails
is counted, not fatal."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from typing import Any

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from rollouts.demo import DEMO_LOAD_SHARES, demo_gateway_key


class Command(BaseCommand):
    help = "Send a few requests per second of random two-digit sums to the demo aliases through the gateway."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rate", type=float, default=6.0, help="requests per second in all (default 6)")
        parser.add_argument("--url", default=None, help="the gateway (default: PUBLIC_URL)")
        parser.add_argument("--alias", action="append", dest="aliases",
                            help="an alias to load, each given an equal share (default: the demo's, half to adder)")
        parser.add_argument("--users", type=int, default=1000, help="size of the sticky user pool (default 1000)")
        parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: never)")
        parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default 8)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["rate"] <= 0:
            self.stderr.write("--rate must be positive")
            return
        key, _ = demo_gateway_key()
        url = (options["url"] or settings.PUBLIC_URL).rstrip("/")
        aliases = options["aliases"] or list(DEMO_LOAD_SHARES)
        self.stdout.write(f"demo load: {options['rate']:g} req/s to {', '.join(aliases)} at {url}/v1/")
        shares = [DEMO_LOAD_SHARES.get(alias, 1.0) if not options["aliases"] else 1.0 for alias in aliases]
        asyncio.run(_load(self, url=url, key=key, aliases=aliases, shares=shares, rate=options["rate"],
                          users=options["users"], duration=options["duration"], concurrency=options["concurrency"]))  # fmt: skip


async def _one(client: httpx.AsyncClient, alias: str, user: str, counts: Counter[str]) -> None:
    a, b = random.randint(10, 99), random.randint(10, 99)
    body = {
        "model": alias, "messages": [{"role": "user", "content": f"{a}+{b}"}], "user": user, "max_tokens": 8,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass  # read to the end: the gateway times the whole stream
            arm = response.headers.get("x-rollout-arm", "?")
            counts[f"{alias}:{arm}:{response.status_code}"] += 1
    except httpx.HTTPError:
        counts[f"{alias}:unreachable"] += 1


async def _load(command: BaseCommand, *, url: str, key: str, aliases: list[str], shares: list[float], rate: float,
                users: int, duration: float, concurrency: int) -> None:  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    limits = httpx.Limits(max_connections=concurrency)
    timeout = httpx.Timeout(60.0, connect=5.0)
    counts: Counter[str] = Counter()
    in_flight: set[asyncio.Task[None]] = set()
    pool = [f"demo-user-{i}" for i in range(max(1, users))]
    started = time.monotonic()
    last_report = started
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=timeout, trust_env=False) as client:  # fmt: skip
        await _wait_for_gateway(client, stop, command)
        while not stop.is_set():
            if duration and time.monotonic() - started >= duration:
                break
            if len(in_flight) < concurrency:
                alias = random.choices(aliases, weights=shares)[0]
                task = asyncio.create_task(_one(client, alias, random.choice(pool), counts))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            # Poisson arrivals at the asked rate.
            try:
                await asyncio.wait_for(stop.wait(), timeout=random.expovariate(rate))
            except TimeoutError:
                pass
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                command.stdout.write(f"demo load, last 30 s: {summary or 'nothing answered'}")
                counts.clear()
        for task in list(in_flight):
            task.cancel()


async def _wait_for_gateway(client: httpx.AsyncClient, stop: asyncio.Event, command: BaseCommand) -> None:
    said = False
    while not stop.is_set():
        try:
            response = await client.get("/v1/models")
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not said:
            command.stdout.write("demo load: waiting for the gateway")
            said = True
        try:
            await asyncio.wait_for(stop.wait(), timeout=2.0)
        except TimeoutError:
            pass
