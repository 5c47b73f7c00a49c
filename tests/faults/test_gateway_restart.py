"""A gateway process restarts: it builds its route table before it accepts a connection, so the first
request after the restart gets the current split (not a 404, 401 or 503); and a clean stop with requests
in flight finishes them and writes their records.

While the gateway is down the routes change under it (everyone to the candidate, a new alias, a new
key); a client knocks on the port from before the new process starts."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from serving.services import RouteSplit, gateway_key_create, route_set
from tests.faults.conftest import Platform, Traffic, adder_static, answered, records_for
from tests.support.demo import EnginePool

pytestmark = [pytest.mark.faults, pytest.mark.engines, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(600)]


@pytest.mark.parametrize("combined", [False, True], ids=["gateway", "combined-server"])
def test_a_restarted_gateway_serves_the_current_routes_from_its_first_request(
    demo_engines: EnginePool, platform: Platform, combined: bool
) -> None:
    adder = adder_static(demo_engines)
    route_set(alias_name="adder", split=RouteSplit(baseline=adder.v1, candidate=adder.v2, candidate_weight=0.0,
                                                   shadow_rate=0.0, rollout_id=None))
    # A stop waits for the streams in flight however long they take (200 tokens take a second here, and over
    # ten when the machine is busy): the point is that they finish, not how fast.
    gateway = platform.gateway(combined=combined, graceful_shutdown_s=120)

    # Stopped with requests in flight: they finish, and the records of everything it answered are written.
    with Traffic(gateway.url, adder.key, ["adder"], clients=3, stream=True, max_tokens=200, pause_s=0.0) as before:
        before.wait_for(lambda sent: len(sent) >= 6, timeout_s=60, what="traffic")
        gateway.child.stop()
    assert {s.arm for s in before.sent if s.status} == {"baseline"}
    served = [s for s in before.sent if s.status == 200]
    cut = [s for s in before.sent if s.status and not s.completed]
    assert served and not cut, cut
    ids = answered(before.sent)
    assert records_for(ids) == ids

    # Down: everyone goes to the candidate, a new alias, a new key.
    route_set(alias_name="adder", split=RouteSplit(baseline=adder.v1, candidate=adder.v2, candidate_weight=1.0,
                                                   shadow_rate=0.0, rollout_id=None))
    route_set(alias_name="adder-next", split=RouteSplit(baseline=adder.v2, candidate=None, candidate_weight=0.0,
                                                        shadow_rate=0.0, rollout_id=None))
    key = gateway_key_create(name="issued while the gateway was down").raw

    answers: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def knock() -> None:
        body = {"messages": [{"role": "user", "content": "12+13"}], "max_tokens": 4}
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                          trust_env=False) as client:
            while not stop.is_set():
                for alias in ("adder", "adder-next"):
                    try:
                        response = client.post("/v1/chat/completions", json={**body, "model": alias})
                    except httpx.TransportError:
                        time.sleep(0.01)  # not listening yet
                        continue
                    answers.append((alias, response.status_code, response.headers.get("x-model-version", "")))

    thread = threading.Thread(target=knock)
    thread.start()
    try:
        time.sleep(0.5)
        assert not answers  # nobody listens while it is down
        gateway.child.start()
        deadline = time.monotonic() + 60
        while len(answers) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert len(answers) >= 10
    # From the very first answer: the new split, the new alias, the new key.
    assert answers[0][1:] == (200, "adder-v2"), answers[:5]
    assert {(alias, status, version) for alias, status, version in answers} == {
        ("adder", 200, "adder-v2"), ("adder-next", 200, "adder-v2")
    }
