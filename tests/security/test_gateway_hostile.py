"""The gateway against hostile clients: the real gateway process (uvicorn, as production runs it) in front of a
fake engine on loopback. Each abuse gets an OpenAI-shaped error or is cut off, and the process stays small."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from serving.models import RequestRecord
from tests.security.conftest import Gateway, rss_bytes
from tests.serving.gateway.conftest import records_wait
from tests.support.fake_engine import FakeEngine

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "adder", "messages": [{"role": "user", "content": "12+30"}], "max_tokens": 4}
MB = 1 << 20
# What a hostile client may add to the gateway's resident memory, at most.
RSS_BOUND = 50 * MB


def post(gw: Gateway, body: bytes | dict[str, Any], *, timeout: float = 30.0) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + "/v1/chat/completions", content=content, timeout=timeout, trust_env=False,
                      headers={"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json"})


def openai_error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]


def head(gw: Gateway, method: str, path: str, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {gw.host}:{gw.port}\r\nAuthorization: Bearer {gw.key}\r\n"
            f"{extra}\r\n").encode()


def read_response(sock: socket.socket, timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (what the gateway sends for its errors)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """True once the other side closed (EOF or reset), reading and dropping whatever comes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            if not sock.recv(65536):
                return True
        except ConnectionError:
            return True
    return False


def wait_steady(read: Callable[[], int], *, settle_s: float = 1.5, timeout_s: float = 60.0) -> int:
    """The value once it stopped changing for settle_s."""
    deadline = time.monotonic() + timeout_s
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return now
    raise AssertionError(f"still changing after {timeout_s}s (last {last})")


# --- bad bodies -----------------------------------------------------------------------------------


NESTED = b'{"model": "adder", "messages": [{"role": "user", "content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
LONE_SURROGATE = b'{"model": "adder", "messages": [{"role": "user", "content": "12\\ud800+30"}]}'
BAD_BODIES: list[tuple[str, bytes | dict[str, Any], str | None]] = [
    ("malformed JSON", b'{"model": "adder", "messages": [', None),
    ("invalid UTF-8", b'{"model": "adder", "messages": [{"role": "user", "content": "\xff\xfe12+30"}]}', None),
    ("an unpaired surrogate", LONE_SURROGATE, None),
    ("100 000 levels of nesting", NESTED, None),
    ("an empty body", b"", None),
    ("a JSON array", b"[1, 2]", None),
    ("model as a number", {**CHAT, "model": 7}, "model"),
    ("messages as a string", {**CHAT, "messages": "12+30"}, "messages"),
    ("a message that is a string", {**CHAT, "messages": ["12+30"]}, "messages[0]"),
    ("max_tokens negative", {**CHAT, "max_tokens": -1}, "max_tokens"),
    ("max_tokens zero", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("max_tokens as a string", {**CHAT, "max_tokens": "4"}, "max_tokens"),
    ("max_tokens as a boolean", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("max_tokens as a float", {**CHAT, "max_tokens": 4.5}, "max_tokens"),
    ('stream as "yes"', {**CHAT, "stream": "yes"}, "stream"),
    ("stream_options as a string", {**CHAT, "stream": True, "stream_options": "usage"}, "stream_options"),
    ("user as a number", {**CHAT, "user": 42}, "user"),
]


def test_bad_bodies_get_a_400_naming_the_problem_and_never_reach_the_engine(
    gateway: Callable[..., Gateway], fake_engine: FakeEngine
) -> None:
    gw = gateway(GATEWAY_MAX_BODY_BYTES=str(MB))
    for what, body, param in BAD_BODIES:
        response = post(gw, body)
        assert response.status_code == 400, (what, response.status_code, response.text[:300])
        error = openai_error(response)
        assert (error["type"], error["param"]) == ("invalid_request_error", param), (what, error)
    assert fake_engine.seen.requests == []
    # Nothing escaped the app as an exception (that would be uvicorn's bare 500, and a lost record).
    assert "Exception in ASGI application" not in gw.log_text()


def test_what_only_the_engine_can_judge_comes_back_as_the_engine_said(
    gateway: Callable[..., Gateway], fake_engine: FakeEngine
) -> None:
    gw = gateway(GATEWAY_MAX_BODY_BYTES=str(MB))
    # max_tokens past the model's context: the gateway does not know the window; the engine's 400 passes through.
    huge = post(gw, {**CHAT, "max_tokens": 10**12})
    assert huge.status_code == 400 and "context window" in huge.text
    # Thousands of messages, within the body limit: proxied whole, answered, recorded.
    many = {**CHAT, "messages": [{"role": "user", "content": str(i)} for i in range(5000)]}
    answered = post(gw, many)
    assert answered.status_code == 200, answered.text[:300]
    assert len(fake_engine.seen.requests[-1]["messages"]) == 5000
    records = {r.request_id: r for r in records_wait(2)}
    assert records[huge.headers["x-request-id"]].outcome == RequestRecord.Outcome.CLIENT_ERROR
    assert records[answered.headers["x-request-id"]].outcome == RequestRecord.Outcome.OK
    # Non-ASCII and escaped emoji (a surrogate pair) are fine.
    emoji = post(gw, b'{"model": "adder", "messages": [{"role": "user", "content": "\\ud83d\\ude00 \xc3\xa9"}]}')
    assert emoji.status_code == 200
    assert fake_engine.seen.requests[-1]["messages"][0]["content"] == "\U0001f600 é"


# --- huge bodies ----------------------------------------------------------------------------------


def test_a_declared_huge_body_gets_413_before_a_byte_of_it_is_sent(gateway: Callable[..., Gateway]) -> None:
    gw = gateway(GATEWAY_MAX_BODY_BYTES=str(64 * 1024))
    with gw.connect() as sock:
        sock.sendall(head(gw, "POST", "/v1/chat/completions",
                          "Content-Type: application/json\r\nContent-Length: 10000000000\r\n"))
        status, _, body = read_response(sock)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_counted_as_it_comes_and_refused_past_the_limit(gateway: Callable[..., Gateway]) -> None:
    gw = gateway(GATEWAY_MAX_BODY_BYTES=str(64 * 1024))
    before = rss_bytes(gw.pid)
    chunk = b'{"pad": "' + b"a" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with gw.connect() as sock:
        sock.sendall(head(gw, "POST", "/v1/chat/completions",
                          "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"))
        try:
            # Up to 256 MB, unless the gateway answers (or hangs up) first.
            while sent < 256 * MB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(frame)
                sent += len(chunk)
        except ConnectionError:
            pass
        status, _, body = read_response(sock)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert sent < 64 * MB, f"the gateway took {sent / MB:.0f} MB before refusing"
    assert rss_bytes(gw.pid) - before < RSS_BOUND


# --- clients that misbehave on a stream -----------------------------------------------------------


def test_a_client_that_never_reads_holds_the_gateway_and_engine_to_a_bounded_buffer(
    gateway: Callable[..., Gateway], fake_engine: FakeEngine
) -> None:
    gw = gateway()
    post(gw, CHAT)  # warm: the first request loads what every request needs
    before = rss_bytes(gw.pid)
    body = json.dumps({**CHAT, "stream": True, "messages": [{"role": "user", "content": "flood"}]}).encode()
    sock = gw.connect(receive_buffer=4096)
    sock.sendall(head(gw, "POST", "/v1/chat/completions",
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n") + body)
    # The engine streams as fast as it is let; the gateway must stop taking once its client stops reading.
    taken = wait_steady(lambda: fake_engine.seen.flood_bytes)
    grown = rss_bytes(gw.pid) - before
    assert taken < 64 * MB, f"the engine got {taken / MB:.0f} MB out before the gateway stopped reading"
    assert grown < RSS_BOUND, f"the gateway grew by {grown / MB:.0f} MB"
    # Still serving everyone else meanwhile.
    assert post(gw, CHAT).status_code == 200
    sock.close()
    assert fake_engine.wait_for(lambda seen: seen.cancelled == 1 and seen.streams_open == 0)
    records = records_wait(3)
    flooded = [r for r in records if r.stream]
    assert [(r.outcome, r.status_code) for r in flooded] == [(RequestRecord.Outcome.CANCELLED, 200)]


def test_a_client_that_leaves_mid_stream_cancels_the_engine_request(
    gateway: Callable[..., Gateway], fake_engine: FakeEngine
) -> None:
    gw = gateway()
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "slow"}]}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {gw.key}"}) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if '"content": "4"' in line:
                break  # one token: leave
    # 400 tokens at 50 ms would take 20 s; the engine hears of it at once instead.
    assert fake_engine.wait_for(lambda seen: seen.cancelled == 1 and seen.streams_open == 0)
    (record,) = records_wait(1, request_id=request_id)
    assert (record.outcome, record.error_kind, record.status_code) == (
        RequestRecord.Outcome.CANCELLED, "client_disconnected", 200)


# --- slow and endless heads -----------------------------------------------------------------------


def test_slow_and_endless_request_heads_are_cut_off(gateway: Callable[..., Gateway]) -> None:
    gw = gateway(HTTP_HEAD_TIMEOUT_S="2")
    before = rss_bytes(gw.pid)

    # Slow-loris: a head one byte every 0.25 s would take over a minute; it is refused with a 408 long before.
    slow = head(gw, "GET", "/v1/models", "X-Padding: " + "a" * 200 + "\r\n")
    with gw.connect() as sock:
        finished = True
        for byte in slow:
            try:
                sock.sendall(bytes([byte]))
            except ConnectionError:
                finished = False
                break
            if select.select([sock], [], [], 0.25)[0]:
                finished = False
                break
        assert not finished, "a slow-loris head was waited for to its end"
        status, _, _ = read_response(sock)
        assert status == 408

    # A connection opened and never used is closed too.
    with gw.connect() as sock:
        assert closed_by_peer(sock, 30)

    # An endless header: 431 at the head limit, not a buffer that grows with it.
    with gw.connect() as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            for _ in range(4096):  # 256 MB
                sock.sendall(b"a" * 65536)
        except ConnectionError:
            pass
        status, _, _ = read_response(sock)
        assert status == 431
    assert rss_bytes(gw.pid) - before < RSS_BOUND

    # A keep-alive connection left idle after its response is closed (uvicorn's --timeout-keep-alive).
    with gw.connect() as sock:
        sock.sendall(head(gw, "GET", "/v1/models"))
        status, _, _ = read_response(sock)
        assert status == 200
        assert closed_by_peer(sock, 30)

    # And the gateway serves as before.
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {gw.key}"}, trust_env=False).status_code == 200
