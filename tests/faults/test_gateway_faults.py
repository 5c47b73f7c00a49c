"""The gateway as a production data plane, on real engines and real processes:

- a candidate whose engine refuses connections: its users are served by the baseline, the refusals are
  recorded as the candidate's errors, and the rollout's error guardrail rolls it back;
- an engine that stops answering (SIGSTOP) before its first byte: each request is tried on the other
  replica within the TTFB timeout, the stopped one is ejected after failing in a row, and it is back in
  routing once it answers its probe again (SIGCONT); the same engines carry one trace from the client
  through the gateway into vLLM;
- two gateway processes: both follow a route change within a second, and one key's rate limit is shared
  between them through Redis;
- a backlog of 10,000 shadow mirrors on its queue does not delay an analysis; mirrors expire;
- a gateway started while the database is unreachable serves on its last-known-good routes, says so on
  /readyz, and writes what it buffered once the database answers again."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from rollouts.actors import SYSTEM
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.services import rollout_create
from rollouts.tasks import analyse_rollout
from serving.models import Alias, RequestRecord, ShadowPair
from serving.services import KeyLimits, RouteSplit, alias_options_set, gateway_key_create, route_set
from tests.faults.conftest import (
    Platform,
    Traffic,
    adder_static,
    answered,
    database_is_local_postgres,
    records_for,
)
from tests.rollouts.helpers import both_arms, canary_plan, step_back, version
from tests.serving.gateway.conftest import route_generation
from tests.support.demo import EnginePool, static_worker_ready, version_register
from tests.support.engines import RunningEngine, free_port, running_engine
from tests.support.otlp_standin import OtlpStandin
from tests.support.processes import REPO_ROOT, VENV_BIN, celery_queues, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]


def chat(gateway_url: str, key: str, *, user: str, alias: str = "adder", max_tokens: int = 4,
         stream: bool = False, headers: dict[str, str] | None = None, timeout: float = 60.0) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "12+30"}], "max_tokens": max_tokens,
            "user": user, "stream": stream}
    return httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=timeout, trust_env=False,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})})


# --- a candidate that refuses connections -------------------------------------------------------------


@pytest.mark.engines
def test_a_candidate_refusing_connections_shows_up_as_candidate_errors_and_rolls_back(
    demo_engines: EnginePool, platform: Platform
) -> None:
    v1 = version_register(demo_engines.model("adder-v1"))
    v2 = version_register(demo_engines.model("adder-v2"))
    static_worker_ready(v1, demo_engines.get("adder-v1").base_url, agent="faults")
    # READY in the database (no agent checks it), but nothing listens there: every try is refused.
    static_worker_ready(v2, f"http://127.0.0.1:{free_port()}", agent="faults")
    key = gateway_key_create(name="faults").raw
    gateway = platform.gateway()
    platform.worker("analysis")
    platform.beat()
    plan = {
        "alias": "adder", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "canary",
        # Held by its duration: only a breach can end this step during the test.
        "steps": [{"weight": 0.5, "min_duration_s": 3600}],
        "guardrails": [{"metric": "error_rate", "margin": 0.05}],
    }  # fmt: skip
    rollout = rollout_create(plan=plan, actor=SYSTEM, start=True).rollout
    gateway.wait_for_routes()

    with Traffic(gateway.url, key, ["adder"], clients=3, max_tokens=2, pause_s=0.0) as traffic:
        wait_until(lambda: Rollout.objects.get(pk=rollout.pk).state == "rolled_back", timeout_s=180,
                   what="the rollout to roll back")
    sent = traffic.snapshot()
    rolled_back = Rollout.objects.get(pk=rollout.pk)
    assert rolled_back.state_reason.startswith("guardrail breached: error_rate is worse than the baseline"), \
        rolled_back.state_reason
    # Every user was served, the candidate's by the baseline.
    assert sent and all(s.status == 200 and s.completed for s in sent), [s for s in sent if not s.completed][:3]
    ids = answered(sent)
    assert records_for(ids) == ids
    refused = RequestRecord.objects.filter(request_id__in=ids, arm="candidate")
    assert refused.filter(error_kind="connect_refused").exists()
    # Refused three times in a row, the replica was ejected: later tries found no engine on the candidate.
    assert set(refused.values_list("outcome", "error_kind", "final", "assigned_arm")) <= {
        ("engine_error", "connect_refused", False, "candidate"), ("no_engine", "replicas_ejected", False, "candidate")}
    served = RequestRecord.objects.filter(request_id__in=refused.values("request_id"), final=True)
    assert set(served.values_list("arm", "outcome", "failover")) == {("baseline", "ok", True)}
    # The analysis saw them as the candidate's errors.
    look = RolloutAnalysis.objects.filter(rollout=rolled_back).order_by("-id").first()
    assert look is not None
    check = next(c for c in look.checks if c["metric"] == "error_rate")
    assert check["decision"] == "breach" and check["candidate"] > check["baseline"]


# --- a hung engine, ejection, traces ------------------------------------------------------------------


@pytest.fixture
def otlp() -> Iterator[OtlpStandin]:
    with OtlpStandin() as standin:
        yield standin


@pytest.fixture
def second_adder_v1(demo_engines: EnginePool, otlp: OtlpStandin) -> Iterator[RunningEngine]:
    """A second engine of adder-v1 (a second replica of the baseline), reporting its traces to the stand-in."""
    model = demo_engines.model("adder-v1")
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "vllm"}
    with running_engine(model_dir=model.path, served_name="adder-v1", log_dir=Path(settings.VAR_DIR) / "test-logs",
                        engine_args=[*model.engine_args, "--otlp-traces-endpoint", f"{otlp.url}/v1/traces"],
                        env_overrides=env) as engine:
        yield engine


def _signal_group(engine: RunningEngine, sig: signal.Signals) -> None:
    os.killpg(engine.proc.pid, sig)


@pytest.mark.engines
def test_an_engine_that_stops_answering_is_passed_over_within_the_ttfb_timeout_ejected_and_brought_back(
    demo_engines: EnginePool, second_adder_v1: RunningEngine, platform: Platform, otlp: OtlpStandin
) -> None:
    v1 = version_register(demo_engines.model("adder-v1"))
    first = static_worker_ready(v1, demo_engines.get("adder-v1").base_url, agent="faults")
    second = static_worker_ready(v1, second_adder_v1.base_url, agent="faults")
    route_set(alias_name="adder", split=RouteSplit(baseline=v1, candidate=None, candidate_weight=0.0,
                                                   shadow_rate=0.0, rollout_id=None))
    alias_options_set(alias=Alias.objects.get(name="adder"), store_prompts=False, ttfb_timeout_s=1.0)
    key = gateway_key_create(name="faults").raw
    gateway = platform.gateway(GATEWAY_EJECT_AFTER="2", GATEWAY_EJECT_BASE_S="2",
                               OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, OTEL_BSP_SCHEDULE_DELAY="200")
    gateway.wait_for_routes()

    # A trace from the client through the gateway into vLLM, while both answer: until a request lands on the
    # engine that reports its traces (sessions decide the replica).
    for n in range(20):
        parent_trace = f"4bf92f3577b34da6a3ce929d0e0e{n:04x}"
        traced = chat(gateway.url, key, user=f"traced-{n}",
                      headers={"traceparent": f"00-{parent_trace}-00f067aa0ba902b7-01"})
        assert traced.status_code == 200
        spans = otlp.wait_for(lambda s, t=parent_trace: any(x.name == "chat adder" and x.trace_id == t for x in s))
        client = next(s for s in spans if s.name == "chat adder-v1" and s.trace_id == parent_trace)
        if client.attributes["server.port"] == second_adder_v1.port:
            break
    else:
        raise AssertionError("no traced request went to the second replica")
    spans = otlp.wait_for(lambda s: any(x.name == "llm_request" and x.trace_id == parent_trace for x in s))
    server = next(s for s in spans if s.name == "chat adder" and s.trace_id == parent_trace)
    engine = next(s for s in spans if s.name == "llm_request" and s.trace_id == parent_trace)
    assert server.parent_span_id == "00f067aa0ba902b7" and client.parent_span_id == server.span_id
    assert engine.parent_span_id == client.span_id  # vLLM continued the gateway's try
    assert server.attributes["gen_ai.operation.name"] == "chat"
    assert server.attributes["gen_ai.request.model"] == "adder"
    assert server.attributes["gen_ai.response.model"] == "adder-v1"
    assert server.attributes["gen_ai.usage.output_tokens"] >= 1
    assert server.attributes["ramp.request_id"] == traced.headers["x-request-id"]

    _signal_group(second_adder_v1, signal.SIGSTOP)
    try:
        took = []
        for n in range(16):  # sessions spread over both replicas
            started = time.monotonic()
            response = chat(gateway.url, key, user=f"user-{n}", stream=n % 2 == 0)
            took.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
        timed_out = RequestRecord.objects.filter(engine_worker_id=second.pk, error_kind="ttfb_timeout")
        wait_until(lambda: timed_out.count() >= 2, timeout_s=15, what="the timed-out tries' records")
        # Each was tried again on the other replica within the TTFB timeout (1 s), and answered.
        assert max(took) < 1.0 + 3.0, took
        assert set(timed_out.values_list("status_code", "final")) == {(504, False)}
        assert all(900 <= (r.e2e_ms or 0) < 2500 for r in timed_out)
        retried = RequestRecord.objects.filter(request_id__in=timed_out.values("request_id"), final=True)
        assert set(retried.values_list("engine_worker_id", "outcome", "attempt")) == {(first.pk, "ok", 2)}
        # Two failures in a row ejected it: no try reached it after those two.
        assert timed_out.count() == 2
        assert gateway.metric("platform_gateway_ejections_total") == 1
    finally:
        _signal_group(second_adder_v1, signal.SIGCONT)

    # Its time out (2 s) over, a probe of /health answers and it takes traffic again.
    def back() -> bool:
        for n in range(6):
            chat(gateway.url, key, user=f"again-{time.monotonic_ns()}-{n}")
        return RequestRecord.objects.filter(engine_worker_id=second.pk, outcome="ok", final=True).exists()

    wait_until(back, timeout_s=30, what="the ejected replica to take traffic again", every_s=0.5)


# --- two gateway processes ------------------------------------------------------------------------------


def _limits_redis() -> str:
    url = settings.GATEWAY_LIMITS_REDIS_URL
    if not url:
        pytest.skip("needs Redis for shared limits (CI's CELERY_BROKER_URL, or GATEWAY_LIMITS_REDIS_URL)")
    return url


@pytest.mark.engines
def test_two_gateway_processes_follow_a_route_change_within_a_second_and_share_a_keys_rate_limit(
    demo_engines: EnginePool, platform: Platform
) -> None:
    redis_url = _limits_redis()
    adder = adder_static(demo_engines)
    route_set(alias_name="adder", split=RouteSplit(baseline=adder.v1, candidate=adder.v2, candidate_weight=0.0,
                                                   shadow_rate=0.0, rollout_id=None))
    limited = gateway_key_create(name="shared", limits=KeyLimits(rpm_limit=10)).raw
    gateways = [platform.gateway(GATEWAY_LIMITS_REDIS_URL=redis_url) for _ in range(2)]
    for gateway in gateways:
        gateway.wait_for_routes()

    # One bucket of ten a minute for both: sixteen quick requests, eight to each, and ten get through.
    statuses = [chat(gateways[n % 2].url, limited, user=f"u{n}", max_tokens=1).status_code for n in range(16)]
    assert sorted(statuses) == [200] * 10 + [429] * 6, statuses
    assert sum(g.metric("platform_gateway_throttled_total", key="shared", alias="adder", limit="rpm")
               for g in gateways) == 6

    # A route change reaches both within a second.
    unlimited = gateway_key_create(name="other").raw
    generation = route_generation()
    wait_until(lambda: all(g.metric("platform_gateway_route_generation") >= generation for g in gateways),
               timeout_s=5, what="both gateways to know the new key")
    changed = time.monotonic()
    route_set(alias_name="adder", split=RouteSplit(baseline=adder.v1, candidate=adder.v2, candidate_weight=1.0,
                                                   shadow_rate=0.0, rollout_id=None))
    generation = route_generation()
    wait_until(lambda: all(g.metric("platform_gateway_route_generation") >= generation for g in gateways),
               timeout_s=5, what="both gateways to load the change", every_s=0.02)
    assert time.monotonic() - changed < 1.0
    for gateway in gateways:
        response = chat(gateway.url, unlimited, user="someone", max_tokens=1)
        assert response.headers["x-rollout-arm"] == "candidate"


# --- the shadow backlog ---------------------------------------------------------------------------------


def _procfile(name: str) -> list[str]:
    """A Procfile line as argv, with this test process's queue names (tests under xdist suffix theirs)."""
    line = next(line for line in (REPO_ROOT / "Procfile").read_text().splitlines() if line.startswith(f"{name}:"))
    argv = shlex.split(line.split(":", 1)[1])
    argv[0] = str(VENV_BIN / Path(argv[0]).name)
    queues = argv.index("-Q") + 1
    argv[queues] = celery_queues(*argv[queues].split(","))
    node = argv.index("-n") + 1
    argv[node] = f"{name}-{os.getpid()}@%h"
    return argv


class _Blackhole:
    """A port that accepts connections and never answers: a candidate engine that hangs every mirror."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def _mirror(request_id: str, *, candidate_id: int, expires_s: float) -> None:
    from serving.gateway.shadow import shadow_enqueue

    shadow_enqueue({"request_id": request_id, "created_at": None, "alias": "adder", "rollout_id": None,
                    "endpoint": "chat.completions", "store_prompts": False, "candidate_version_id": candidate_id,
                    "baseline_version_id": None,
                    "body": {"model": "adder", "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 1}},
                   expires_s=expires_s)


def test_a_backlog_of_ten_thousand_shadow_mirrors_does_not_delay_an_analysis(owner: Any, platform: Platform) -> None:
    if not settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("10,000 queued tasks want a broker server (CI's Redis), not files")
    import redis

    version("adder-v1")
    candidate = version("adder-v2", ready=False)
    hole = _Blackhole()
    try:
        static_worker_ready(candidate, hole.url, agent="faults")
        rollout = rollout_create(plan=canary_plan(), actor=owner.user, start=True).rollout
        step_back(rollout, 30)
        both_arms(rollout, total=400, weight=0.1, seed=17)

        # The backlog: mirrors that each hang on the candidate until their time is up.
        started = time.monotonic()
        for n in range(10_000):
            _mirror(f"backlog-{n}", candidate_id=candidate.pk, expires_s=600)
        enqueued_s = time.monotonic() - started
        queue = celery_queues("shadow")
        broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        assert broker.llen(queue) == 10_000

        # The workers of `make run` (the Procfile's lines), one for the control plane, one for mirrors.
        platform._child("worker", _procfile("worker"), ready="ready.", env={})
        platform._child("shadow", _procfile("shadow"), ready="ready.", env={})
        wait_until(lambda: broker.llen(queue) <= 10_000 - 4, timeout_s=30, what="the shadow worker to be busy")

        delays = []
        for _ in range(3):
            looks = RolloutAnalysis.objects.filter(rollout=rollout).count()
            asked = time.monotonic()
            analyse_rollout.delay(rollout.pk)
            wait_until(lambda looks=looks: RolloutAnalysis.objects.filter(rollout=rollout).count() > looks,
                       timeout_s=30, what="the analysis to run", every_s=0.05)
            delays.append(time.monotonic() - asked)
        print(f"\n10,000 mirrors enqueued in {enqueued_s:.1f} s; analyses ran {', '.join(f'{d:.2f}' for d in delays)}"
              f" s after they were asked for, {broker.llen(queue)} mirrors still waiting")
        assert max(delays) < 10.0, delays
        assert broker.llen(queue) > 9_000  # the backlog was still there all along
        broker.delete(queue)
    finally:
        hole.close()


def test_shadow_mirrors_not_started_in_time_expire(platform: Platform) -> None:
    candidate = version("adder-v2")
    for n in range(20):
        _mirror(f"stale-{n}", candidate_id=candidate.pk, expires_s=1.0)
    time.sleep(1.5)  # they go stale while no worker is there
    worker = platform._child("shadow", _procfile("shadow"), ready="ready.", env={})
    dropped = "Discarding revoked task: serving.shadow_mirror"  # Celery's words for an expired task too
    wait_until(lambda: worker.text().count(dropped) >= 20, timeout_s=60, what="the worker to drop the stale mirrors")
    assert not ShadowPair.objects.filter(request_id__startswith="stale-").exists()


# --- a gateway started while the database is unreachable -----------------------------------------------


class _Relay:
    """A TCP relay to PostgreSQL that can be switched off (connections refused) and on: the database
    unreachable from the gateway, without stopping it for everyone else on the machine."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in self._conns:
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.mark.engines
def test_a_gateway_started_with_the_database_down_serves_its_last_routes(
    demo_engines: EnginePool, platform: Platform, tmp_path: Path
) -> None:
    if not database_is_local_postgres():
        pytest.skip("needs PostgreSQL (CI's DATABASE_URL): the relay stands between the gateway and its server")
    from django.db import connection

    adder = adder_static(demo_engines)
    route_set(alias_name="adder", split=RouteSplit(baseline=adder.v1, candidate=adder.v2, candidate_weight=0.5,
                                                   shadow_rate=0.0, rollout_id=None))
    cache = tmp_path / "routes.json"
    # A gateway that reached the database once kept its routes on disk.
    first = platform.gateway(GATEWAY_ROUTES_CACHE=str(cache))
    first.wait_for_routes()
    first.child.stop()
    assert cache.exists()

    db = connection.settings_dict
    relay = _Relay((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    url = f"postgres://{db['USER']}@127.0.0.1:{relay.port}/{db['NAME']}"
    try:
        gateway = platform.gateway(DATABASE_URL=url, GATEWAY_ROUTES_CACHE=str(cache), GATEWAY_RECORD_FLUSH_S="0.2")
        ready = gateway.get("/readyz").json()
        assert ready["status"] == "degraded" and ready["routes"]["source"] == "disk"
        assert ready["routes"]["database"].startswith("unreachable since ")
        assert gateway.metric("platform_gateway_routes_from_disk") == 1
        with Traffic(gateway.url, adder.key, ["adder"], clients=2, max_tokens=4) as traffic:
            traffic.wait_for(lambda sent: len(sent) >= 10, timeout_s=60, what="traffic on the routes from disk")
            relay.up()  # the database answers again
            wait_until(lambda: gateway.get("/readyz").json()["status"] == "ok", timeout_s=15,
                       what="the gateway to read its routes from the database again")
            traffic.wait_for(lambda sent: len(sent) >= 16, timeout_s=60, what="traffic after")
        sent = traffic.snapshot()
        assert all(s.status == 200 and s.completed for s in sent), [s for s in sent if not s.completed][:3]
        assert {s.arm for s in sent} == {"baseline", "candidate"}
        ids = answered(sent)
        assert records_for(ids) == ids  # what waited in the buffer was written, none lost
        assert "serving the last-known-good route table" in gateway.child.text()
    finally:
        relay.down()

