"""The gateway in front of two real vLLM engines (adder-v1 baseline, adder-v2 candidate), driven by the
official `openai` SDK and plain HTTP. The engine-killing test is last in the file; the `engines` fixture
starts a killed engine again for whatever runs after it."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI
from scipy.stats import binom

from serving.gateway.shadow import shadow_pair_mirror
from serving.models import RequestRecord, ShadowPair
from serving.services import route_set
from tests.serving.gateway.conftest import (
    AdderEngines,
    AdderRoutes,
    GatewayProcess,
    records_wait,
    route_generation,
    split,
)
from tests.support.processes import celery_worker

pytestmark = [pytest.mark.engines, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def gateway(adder_routes: AdderRoutes, gateway_process: Callable[..., GatewayProcess]) -> GatewayProcess:
    process = gateway_process()
    process.key = adder_routes.key
    return process


def sdk(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=120)


def reroute(gateway: GatewayProcess, routes: AdderRoutes, **kwargs: object) -> None:
    route_set(alias_name="adder", split=split(routes.v1, routes.v2, **kwargs))  # type: ignore[arg-type]
    gateway.wait_for_generation(route_generation())


def ask(client: httpx.Client, user: str | None = None, *, session: str | None = None) -> httpx.Response:
    body: dict[str, object] = {"model": "adder", "prompt": "12+30=", "max_tokens": 1}
    if user is not None:
        body["user"] = user
    headers = {"X-Session-Id": session} if session else {}
    response = client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def test_the_openai_sdk_streams_and_not_through_the_gateway(gateway: GatewayProcess) -> None:
    client = sdk(gateway)
    messages = [{"role": "user", "content": "37+48"}]

    raw = client.chat.completions.with_raw_response.create(model="adder", messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert raw.headers["x-rollout-arm"] == "baseline"
    assert raw.headers["x-model-version"] == "adder-v1"
    chat = raw.parse()
    answer = chat.choices[0].message.content
    assert answer and answer.isdigit()

    # Streamed without asking for usage: the usage chunk the gateway asked for never reaches the client.
    chunks = list(client.chat.completions.create(model="adder", messages=messages, max_tokens=4, temperature=0, stream=True))  # type: ignore[call-overload]
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer

    # Asked for: it arrives, last, with the token count.
    chunks = list(client.chat.completions.create(  # type: ignore[call-overload]
        model="adder", messages=messages, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    streamed_tokens = chunks[-1].usage.completion_tokens

    completion = client.completions.create(model="adder", prompt="37+48=", max_tokens=4, temperature=0)
    assert completion.choices[0].text == answer
    pieces = list(client.completions.create(model="adder", prompt="37+48=", max_tokens=4, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == answer

    assert [m.id for m in client.models.list()] == ["adder"]

    records = records_wait(5, alias="adder")
    assert len(records) == 5
    assert [(r.endpoint, r.stream) for r in records] == [
        ("chat.completions", False), ("chat.completions", True), ("chat.completions", True),
        ("completions", False), ("completions", True),
    ]
    for record in records:
        assert (record.arm, record.model_version_id, record.status_code, record.outcome) == (
            "baseline", gateway_version_id("adder-v1"), 200, RequestRecord.Outcome.OK)
        assert record.completion_tokens == streamed_tokens
        assert record.prompt_tokens and record.prompt_chars > 0 and len(record.prompt_hash) == 32
        assert record.e2e_ms and record.e2e_ms > 0
        # Prompts are not kept unless the alias opts in.
        assert record.prompt_text == "" and record.output_text == ""
    # Non-streamed requests are asked of the engine as streams: timed the same way.
    assert all(r.ttft_ms is not None and r.ttft_ms <= r.e2e_ms for r in records)


def without_nulls(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


CHAT_ASKED = {"messages": [{"role": "user", "content": "37+48"}], "max_tokens": 6}
TEXT_ASKED = {"prompt": ["37+48=", "12+30="], "max_tokens": 6}


@pytest.mark.parametrize(("path", "body", "choices"), [
    ("/v1/chat/completions", {**CHAT_ASKED, "temperature": 0, "logprobs": True, "top_logprobs": 2}, 1),
    # vLLM takes n > 1 only when sampling: a seed makes the sample the same both ways.
    ("/v1/chat/completions", {**CHAT_ASKED, "temperature": 1.0, "seed": 7, "n": 2}, 2),
    ("/v1/completions", {**TEXT_ASKED, "temperature": 0, "logprobs": 2}, 2),
    ("/v1/completions", {**TEXT_ASKED, "temperature": 1.0, "seed": 7, "n": 2, "logprobs": 1}, 4),
], ids=["chat", "chat-n2", "completion", "completion-n2"])
def test_a_non_streamed_answer_is_the_one_the_engine_gives_unstreamed(
    gateway: GatewayProcess, engines: AdderEngines, path: str, body: dict[str, object], choices: int
) -> None:
    """The gateway asks the engine for a stream and sends the client the answer it adds up to: the same, field
    by field, as the engine's own non-streamed answer (but for its id and time, and vLLM's null fields)."""
    client = sdk(gateway)
    if path == "/v1/chat/completions":
        raw = client.chat.completions.with_raw_response.create(model="adder", **body)  # type: ignore[call-overload]
    else:
        raw = client.completions.with_raw_response.create(model="adder", **body)  # type: ignore[call-overload]
    through = json.loads(raw.text)
    parsed = raw.parse()  # the SDK's own models take it
    assert parsed.usage is not None and parsed.usage.completion_tokens == through["usage"]["completion_tokens"]
    with httpx.Client(base_url=engines["adder-v1"].base_url, timeout=60, trust_env=False) as engine:
        reply = engine.post(path, json={**body, "model": "adder-v1"})
    assert reply.status_code == 200, reply.text
    own = reply.json()
    for answer in (through, own):
        answer.pop("id"), answer.pop("created")
    assert without_nulls(through) == without_nulls(own)
    assert len(through["choices"]) == choices


def gateway_version_id(label: str) -> int:
    from serving.selectors import model_version_get

    return model_version_get(ref=label).id


def test_recorded_timings_agree_with_what_the_client_saw(gateway: GatewayProcess) -> None:
    client = sdk(gateway)
    sent = time.perf_counter()
    first_token = None
    stream = client.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
        model="adder", messages=[{"role": "user", "content": "12+13"}], max_tokens=16, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    request_id = stream.headers["x-request-id"]
    usage = None
    for chunk in stream.parse():
        if first_token is None and chunk.choices and chunk.choices[0].delta.content:
            first_token = time.perf_counter()
        usage = chunk.usage or usage
    ended = time.perf_counter()
    assert first_token is not None and usage is not None
    client_ttft_ms = (first_token - sent) * 1000
    client_e2e_ms = (ended - sent) * 1000

    (record,) = records_wait(1, request_id=request_id)
    assert record.completion_tokens == usage.completion_tokens == 16
    assert record.ttft_ms is not None and record.e2e_ms is not None and record.tpot_ms is not None
    # The gateway's clock starts after the client's and stops before it: it can only see less.
    assert 0 < record.ttft_ms <= client_ttft_ms
    assert record.ttft_ms < record.e2e_ms <= client_e2e_ms
    # ...but not much less: most of the client's time is the engine's.
    assert record.e2e_ms > 0.5 * client_e2e_ms
    assert record.tpot_ms == pytest.approx((record.e2e_ms - record.ttft_ms) / 15)


def split_counts(client: httpx.Client, users: list[str]) -> Counter[str]:
    with ThreadPoolExecutor(6) as pool:
        return Counter(r.headers["x-rollout-arm"] for r in pool.map(lambda u: ask(client, u), users))


def test_the_split_follows_the_weight_and_a_change_shows_within_a_second(
    gateway: GatewayProcess, adder_routes: AdderRoutes
) -> None:
    client = gateway.client()
    n = 200
    for weight, tag in ((0.5, "a"), (0.9, "b")):
        route_set(alias_name="adder", split=split(adder_routes.v1, adder_routes.v2, weight=weight))
        # Every gateway process sees a routing change within a second.
        time.sleep(1.0)
        counts = split_counts(client, [f"user-{tag}-{i}" for i in range(n)])
        low, high = binom.interval(0.99, n, weight)
        assert low <= counts["candidate"] <= high, (weight, counts)
        assert counts["baseline"] + counts["candidate"] == n

    records = records_wait(2 * n, alias="adder")
    assert len(records) == 2 * n
    assert {(r.arm, r.model_version_id) for r in records} == {
        ("baseline", adder_routes.v1.id), ("candidate", adder_routes.v2.id)}
    assert all(r.rollout_id == 1 and len(r.session_hash) == 32 for r in records)


def test_users_and_sessions_keep_their_arm(gateway: GatewayProcess, adder_routes: AdderRoutes) -> None:
    reroute(gateway, adder_routes, weight=0.5)
    client = gateway.client()
    arms_by_user = {user: {ask(client, user).headers["x-rollout-arm"] for _ in range(3)} for user in
                    [f"sticky-{i}" for i in range(12)]}
    assert all(len(arms) == 1 for arms in arms_by_user.values())
    assert {arm for arms in arms_by_user.values() for arm in arms} == {"baseline", "candidate"}
    for session in ("s-1", "s-2", "s-3", "s-4"):
        assert len({ask(client, session=session).headers["x-rollout-arm"] for _ in range(3)}) == 1
    # The same user on the same arm is the same session in the records.
    records = records_wait(48, alias="adder")
    by_hash: dict[str, set[str]] = {}
    for record in records:
        by_hash.setdefault(record.session_hash, set()).add(record.arm)
    assert len(by_hash) == 16 and all(len(arms) == 1 for arms in by_hash.values())


def test_a_client_that_goes_away_cancels_the_engine_request(gateway: GatewayProcess, engines: AdderEngines) -> None:
    engine = engines["adder-v1"]

    def finished_by_length() -> float:
        for line in httpx.get(engine.base_url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:request_success_total{") and 'finished_reason="length"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def running() -> float:
        for line in httpx.get(engine.base_url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:num_requests_running{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = finished_by_length()
    body = {"model": "adder", "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 240, "stream": True,
            "ignore_eos": True}
    with gateway.client().stream("POST", "/v1/chat/completions", json=body) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break  # one token seen: leave
    # Had the request gone on, it would end by running into max_tokens ("length").
    (record,) = records_wait(1, request_id=request_id)
    assert record.outcome == RequestRecord.Outcome.CANCELLED
    deadline = time.monotonic() + 60
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert finished_by_length() == before


def test_the_openai_sdk_gets_429_with_retry_after_and_its_own_retry_succeeds(
    gateway: GatewayProcess, adder_routes: AdderRoutes
) -> None:
    from serving.services import KeyLimits, gateway_key_create

    limited = gateway_key_create(name="checkout", limits=KeyLimits(rpm_limit=6)).raw
    gateway.wait_for_generation(route_generation())
    seen: list[tuple[int, str | None]] = []

    def remember(response: httpx.Response) -> None:
        seen.append((response.status_code, response.headers.get("retry-after")))

    body = {"model": "adder", "prompt": "1+1=", "max_tokens": 1}
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {limited}"}, trust_env=False) as burst:
        statuses = [burst.post("/v1/completions", json=body).status_code for _ in range(7)]
    assert statuses == [200] * 6 + [429]  # a minute's worth at once, then one every 10 s

    http = httpx.Client(event_hooks={"response": [remember]}, trust_env=False, timeout=60)
    client = OpenAI(base_url=gateway.url + "/v1", api_key=limited, max_retries=2, http_client=http)
    started = time.monotonic()
    completion = client.completions.create(model="adder", prompt="12+30=", max_tokens=4, temperature=0)
    waited = time.monotonic() - started
    assert completion.choices[0].text
    # The SDK was refused first, waited what Retry-After said (the bucket's next token), and got through.
    assert [status for status, _ in seen] == [429, 200], seen
    assert seen[0][1] is not None and 5 <= int(seen[0][1]) <= 10
    assert waited >= 4.0
    assert gateway.metric("platform_gateway_throttled_total", key="checkout", alias="adder", limit="rpm") == 2


def test_metrics_add_up_over_several_server_workers(adder_routes: AdderRoutes, tmp_path: object) -> None:
    """`uvicorn --workers 2` with PROMETHEUS_MULTIPROC_DIR: whichever worker answers /metrics counts all."""
    from pathlib import Path

    from tests.serving.gateway.conftest import LOG_DIR
    from tests.support.engines import free_port
    from tests.support.processes import SERVER_FLAGS, VENV_BIN, child_env, child_process

    port = free_port()
    multiproc = Path(str(tmp_path)) / "metrics"
    multiproc.mkdir()
    args = [str(VENV_BIN / "uvicorn"), "serving.gateway.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "2", *SERVER_FLAGS]
    log = LOG_DIR / f"gateway-workers-{port}.log"
    with child_process(args, log_path=log, env=child_env(PROMETHEUS_MULTIPROC_DIR=str(multiproc)),
                       ready="Uvicorn running on", timeout_s=90):
        deadline = time.monotonic() + 90
        while log.read_text().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, "two workers never started"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        pids = set()
        with_content = 0  # TTFT is the first non-empty content: an answer of only an end token has none
        for n in range(12):
            # A new connection each time: the kernel hands them to either worker. Two-digit sums, the adder's
            # own domain: out of it (say 110+1) a model build may answer with nothing at all.
            response = httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=60,
                                  headers={"Authorization": f"Bearer {adder_routes.key}", "Connection": "close"},
                                  json={"model": "adder", "messages": [{"role": "user", "content": f"{10 + n}+{20 + n}"}],
                                        "max_tokens": 2, "stream": True, "temperature": 0})
            assert response.status_code == 200
            with_content += any(line.startswith("data: {") and json.loads(line[6:])["choices"]
                                and json.loads(line[6:])["choices"][0]["delta"].get("content")
                                for line in response.text.splitlines())
        for _ in range(8):
            text = httpx.get(f"{url}/metrics", trust_env=False, headers={"Connection": "close"}).text
            lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
            assert float(lines['platform_gateway_requests_total{alias="adder",arm="baseline",outcome="ok"}']) == 12
            assert float(lines['platform_gateway_e2e_seconds_count{alias="adder",arm="baseline",version="adder-v1"}']) == 12
            assert float(lines['platform_gateway_ttft_seconds_count{alias="adder",arm="baseline",version="adder-v1"}']) \
                == with_content > 0
            pids.update(p.name.split("_")[-1] for p in multiproc.glob("*.db"))
        assert len(pids) >= 2  # both workers wrote series


def test_shadow_traffic_reaches_the_candidate_and_never_the_client(
    gateway: GatewayProcess, adder_routes: AdderRoutes
) -> None:
    from serving.models import Alias
    from serving.services import alias_options_set

    alias_options_set(alias=Alias.objects.get(name="adder"), store_prompts=True, ttfb_timeout_s=None)
    reroute(gateway, adder_routes, weight=0.0, shadow=1.0)
    client = sdk(gateway)
    served: dict[str, str] = {}
    with celery_worker(name="gateway-shadow"):
        for prompt in ("37+48", "12+30", "55+55"):
            raw = client.chat.completions.with_raw_response.create(model="adder", messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0)  # type: ignore[arg-type]
            assert (raw.headers["x-rollout-arm"], raw.headers["x-model-version"]) == ("baseline", "adder-v1")
            chat = raw.parse()
            assert chat.model == "adder-v1"  # the baseline answered, and only it
            served[raw.headers["x-request-id"]] = chat.choices[0].message.content or ""
        stream = client.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
            model="adder", messages=[{"role": "user", "content": "20+22"}], max_tokens=4, temperature=0, stream=True)
        chunks = list(stream.parse())
        assert {c.model for c in chunks} == {"adder-v1"}
        served[stream.headers["x-request-id"]] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        deadline = time.monotonic() + 90
        while ShadowPair.objects.filter(request_id__in=served).count() < len(served):
            assert time.monotonic() < deadline, "shadow pairs never arrived"
            time.sleep(0.3)

    for pair in ShadowPair.objects.filter(request_id__in=served):
        assert pair.baseline_version_id == adder_routes.v1.id
        assert pair.candidate_version_id == adder_routes.v2.id
        assert pair.rollout_id == 1 and pair.alias == "adder"
        assert pair.baseline_output == served[pair.request_id]
        assert pair.candidate_outcome == "ok" and pair.candidate_output.isdigit()
        assert pair.candidate_ttft_ms is not None and pair.candidate_e2e_ms is not None
        assert pair.prompt_text.startswith("user: ")
        # The baseline was asked the same request beside the candidate, timed by the same code.
        assert pair.baseline_replay_outcome == "ok"
        assert pair.baseline_replay_ttft_ms is not None and pair.baseline_replay_e2e_ms is not None
        assert pair.baseline_replay_e2e_ms >= pair.baseline_replay_ttft_ms > 0
    assert gateway.metric("platform_gateway_shadow_enqueued_total") == len(served)

    # An alias that does not store prompts: the pair keeps timings and outcomes, and no text.
    alias_options_set(alias=Alias.objects.get(name="adder"), store_prompts=False, ttfb_timeout_s=None)
    reroute(gateway, adder_routes, weight=0.0, shadow=1.0)
    with celery_worker(name="gateway-shadow-unstored"):
        raw = client.chat.completions.with_raw_response.create(model="adder", messages=[{"role": "user", "content": "11+11"}], max_tokens=4, temperature=0)  # type: ignore[arg-type]
        request_id = raw.headers["x-request-id"]
        deadline = time.monotonic() + 90
        while not ShadowPair.objects.filter(request_id=request_id).exists():
            assert time.monotonic() < deadline, "the shadow pair never arrived"
            time.sleep(0.3)
    unstored = ShadowPair.objects.get(request_id=request_id)
    assert (unstored.prompt_text, unstored.baseline_output, unstored.candidate_output) == ("", "", "")
    assert unstored.texts_stored is False and unstored.candidate_outcome == "ok"
    assert unstored.candidate_ttft_ms is not None and unstored.candidate_completion_tokens

    # Mirroring is safe to repeat: a second run of the same request id stores nothing new.
    payload = {"request_id": next(iter(served)), "candidate_version_id": adder_routes.v2.id, "endpoint": "completions",
               "store_prompts": True, "body": {"model": "adder", "prompt": "1+1=", "max_tokens": 2}}
    assert shadow_pair_mirror(payload=payload, final_attempt=True) is False
    fresh = {**payload, "request_id": "replayed-twice", "alias": "adder", "prompt_text": "1+1= mail me at a@b.example"}
    assert shadow_pair_mirror(payload=fresh, final_attempt=True) is True
    assert shadow_pair_mirror(payload=fresh, final_attempt=True) is False
    pair = ShadowPair.objects.get(request_id="replayed-twice")
    assert "a@b.example" not in pair.prompt_text and "[EMAIL]" in pair.prompt_text


def test_stored_prompts_are_redacted(gateway: GatewayProcess, adder_routes: AdderRoutes) -> None:
    from serving.models import Alias
    from serving.services import alias_options_set

    alias_options_set(alias=Alias.objects.get(name="adder"), store_prompts=True, ttfb_timeout_s=None)
    reroute(gateway, adder_routes, weight=0.0)
    response = gateway.client().post("/v1/chat/completions", json={
        "model": "adder", "max_tokens": 3, "messages": [{"role": "user", "content": "12+30 from jane@corp.example"}]})
    assert response.status_code == 200
    (record,) = records_wait(1, request_id=response.headers["x-request-id"])
    assert "jane@corp.example" not in record.prompt_text and "[EMAIL]" in record.prompt_text
    assert record.output_text == response.json()["choices"][0]["message"]["content"]


# --- last: it kills an engine -------------------------------------------------------------------


def test_requests_fail_over_to_the_baseline_when_the_candidate_dies(
    gateway: GatewayProcess, adder_routes: AdderRoutes, engines: AdderEngines
) -> None:
    reroute(gateway, adder_routes, weight=1.0)
    client = gateway.client()
    body = {"model": "adder", "messages": [{"role": "user", "content": "12+13"}], "max_tokens": 8, "stream": True,
            "ignore_eos": True}
    results: list[tuple[float, str, bool]] = []  # (started, arm, completed)
    stop = threading.Event()

    def traffic() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                with client.stream("POST", "/v1/chat/completions", json={**body, "user": f"u{n}"}) as response:
                    arm = response.headers.get("x-rollout-arm", "")
                    text = "".join(response.iter_text())
                completed = response.status_code == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text
            except httpx.HTTPError:
                arm, completed = "", False
            results.append((started, arm, completed))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for _, arm, ok in results if ok and arm == "candidate") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        engines["adder-v2"].kill()  # mid-run: requests are in flight
        killed_at = time.monotonic()
        while sum(1 for started, _, _ in results if started > killed_at + 0.05) < 8:
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)

    after = [(arm, ok) for started, arm, ok in results if started > killed_at + 0.05]
    # Every request sent after the candidate died was served, by the baseline.
    assert after and all(ok and arm == "baseline" for arm, ok in after), after
    failed_over = records_wait(1, failover=True)
    assert failed_over and all(r.arm == "baseline" and r.outcome == RequestRecord.Outcome.OK for r in failed_over)
    assert gateway.metric("platform_gateway_failovers_total", alias="adder") >= len(after)
