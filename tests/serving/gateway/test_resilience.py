"""What keeps one gateway process serving: the route table's last-known-good copy on disk, redaction of
stored texts off the event loop, affinity of shared prompt prefixes. In process, on the loopback stand-in."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.gateway.app import Gateway
from serving.gateway.config import GatewayConfig
from serving.gateway.lastgood import route_rows_restore, route_rows_save
from serving.gateway.records import RecordDraft
from serving.gateway.routing import KeyRow, RouteRows, WorkerRow, route_table_build
from tests.serving.gateway.inprocess import CHAT, KEY_HASH, alias, asgi_post, rows, running, workers
from tests.support.fake_engine import FakeEngine


@pytest.fixture
def fake(standin_engine: Callable[..., FakeEngine]) -> FakeEngine:
    return standin_engine()


def test_the_last_known_good_table_round_trips(tmp_path: Path) -> None:
    # A worker with its key sent the flavor's way (every worker read from the database has its header lines).
    keyed = WorkerRow(id=2, model_version_id=1, base_url="http://10.0.0.2:8000", api_key="s3cret", worker_id=7,
                      headers=("Authorization: Bearer s3cret",))
    table = rows(alias(weight=0.25, store_prompts=True, ttfb=1.5), (*workers(1, "http://10.0.0.1:8000"), keyed),
                 key=KeyRow(KEY_HASH, ("adder",), name="shop", rpm_limit=5, tpm_limit=None, max_concurrency=2))
    path = tmp_path / "routes.json"
    route_rows_save(table, path)
    restored = route_rows_restore(path)
    assert restored == table
    assert restored is not None
    replica = route_table_build(restored).replicas[2]
    assert replica.worker_id == 7 and "Authorization: Bearer s3cret" in replica.headers
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("{not json")
    assert route_rows_restore(path) is None
    assert route_rows_restore(tmp_path / "absent.json") is None


def test_a_gateway_started_with_the_database_down_serves_its_last_routes_and_says_so(
    fake: FakeEngine, tmp_path: Path
) -> None:
    table = rows(alias(), workers(1, fake.base_url))
    cache = tmp_path / "routes.json"
    route_rows_save(table, cache)
    database_up = False

    def load() -> RouteRows:
        if not database_up:
            raise ConnectionRefusedError("the database is down")
        return table

    async def scenario() -> None:
        nonlocal database_up
        config = GatewayConfig(route_poll_s=0.05, routes_cache=cache, startup_database_wait_s=0.2)
        gateway = Gateway(config, rows_loader=load, version_reader=lambda: load().version,
                          records_writer=lambda batch: len(batch))
        await gateway.startup()
        try:
            assert gateway.routes.source == "disk"
            assert (await asgi_post(gateway, "/v1/chat/completions", CHAT)).status == 200
            status = gateway.routes_status()
            assert status["source"] == "disk" and status["database"].startswith("unreachable since ")
            database_up = True
            deadline = time.monotonic() + 5
            while gateway.routes.source != "database" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert gateway.routes_status() == {"source": "database", "generation": 1, "database": "ok"}
        finally:
            await gateway.shutdown()

    asyncio.run(scenario())


def test_stored_texts_are_redacted_in_their_own_thread(fake: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.redaction

    threads: list[str] = []
    real = serving.redaction.redact_in_slices

    def watched(text: str, **kwargs: int) -> str:
        threads.append(threading.current_thread().name)
        return real(text, **kwargs)

    monkeypatch.setattr(serving.redaction, "redact_in_slices", watched)
    table = rows(alias(store_prompts=True), workers(1, fake.base_url))
    big = "write to alice@example.com " + "lorem ipsum dolor sit amet " * 4000

    async def scenario() -> list[RecordDraft]:
        async with running(table) as gw:
            reply = await gw.call({**CHAT, "messages": [{"role": "user", "content": big}]})
            assert reply.status == 200
            return await gw.settled()

    (record,) = asyncio.run(scenario())
    assert "[EMAIL]" in record.prompt_text and "alice@example.com" not in record.prompt_text
    assert record.output_text == "444"  # the stand-in's streamed answer: non-streamed requests are asked as streams
    assert threads and all(name.startswith("gateway-redact") for name in threads)


PII = st.sampled_from(["bob@example.com", "4111 1111 1111 1111", "4111-1111-1111-1111", "+1 (555) 123-4567",
                       "sk-abcdefghijklmnopqrstuvwx", "0123456789abcdef0123456789abcdef", "555.123.4567"])
WORDS = st.sampled_from(["lorem", "ipsum", "12", "(a)", "x-y", "3.5", "+", "-", "\n", "  ", "é"])


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.one_of(PII, WORDS), min_size=1, max_size=200), size=st.integers(min_value=8, max_value=64))
def test_redacting_in_slices_gives_what_redacting_at_once_gives(pieces: list[str], size: int) -> None:
    from serving.redaction import redact, redact_in_slices

    text = " ".join(pieces)
    assert redact_in_slices(text, size=size) == redact(text)


def test_without_a_session_prompts_that_open_alike_go_to_the_same_replica(
    standin_engine: Callable[..., FakeEngine],
) -> None:
    engines = [standin_engine() for _ in range(3)]
    table = rows(alias(), workers(1, *[e.base_url for e in engines]))
    system = {"role": "system", "content": "You add two-digit numbers. Answer with the sum only. " * 8}

    async def scenario() -> None:
        async with running(table) as gw:
            for n in range(12):
                body = {**CHAT, "messages": [system, {"role": "user", "content": f"{10 + n}+{20 + n}"}]}
                assert (await gw.call(body)).status == 200
            for n in range(30):
                other = {"role": "system", "content": f"Persona {n}."}
                body = {**CHAT, "messages": [other, {"role": "user", "content": "1+1"}]}
                assert (await gw.call(body)).status == 200

    asyncio.run(scenario())
    shared = [sum(1 for r in e.seen.requests if r["messages"][0] == system) for e in engines]
    assert sorted(shared) == [0, 0, 12]  # one system prompt, one replica (one request at a time here)
    others = [sum(1 for r in e.seen.requests if r["messages"][0] != system) for e in engines]
    assert all(count > 0 for count in others)  # different prefixes spread


def test_the_mirror_that_travels_is_redacted_unless_the_alias_stores_prompts() -> None:
    from serving.gateway.shadow import shadow_payload_redact

    payload = {
        "request_id": "r1", "store_prompts": False, "prompt_text": "mail bob@example.com", "baseline_output": "ok",
        "body": {"model": "adder", "user": "user-42", "messages": [
            {"role": "user", "content": "mail bob@example.com"},
            {"role": "user", "content": [{"type": "text", "text": "card 4111 1111 1111 1111"}]},
        ]},
    }
    sent = shadow_payload_redact(payload)
    text = json.dumps(sent)
    assert "bob@example.com" not in text and "4111" not in text and "user-42" not in text
    assert sent["body"]["messages"][0]["content"] == "mail [EMAIL]"
    assert (sent["prompt_text"], sent["baseline_output"]) == ("", "")
    assert payload["body"]["messages"][0]["content"] == "mail bob@example.com"  # the caller's copy is untouched



def test_a_busy_thread_holds_the_gil_from_the_streams_for_half_a_millisecond_at_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The record writer's batches (and, in the combined server, Django's views) run Python in threads of
    the gateway's process: at Python's default switch interval a stream's next event could wait 5 ms for
    the GIL behind them."""
    import sys

    from serving.gateway.app import GIL_SWITCH_INTERVAL_S

    monkeypatch.setattr(sys, "setswitchinterval", lambda s: seen.append(s))
    monkeypatch.setattr(sys, "getswitchinterval", lambda: 0.005)
    seen: list[float] = []

    async def scenario() -> None:
        async with running(rows(alias(), ())):
            pass

    asyncio.run(scenario())
    # Lowered at start-up, put back at shutdown (a test process starts many gateways).
    assert seen == [GIL_SWITCH_INTERVAL_S, 0.005] and GIL_SWITCH_INTERVAL_S <= 0.0005
