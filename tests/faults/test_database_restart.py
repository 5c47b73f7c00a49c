"""PostgreSQL stops for a few seconds and starts again while the gateway is under load.

The gateway keeps answering from its in-memory route table; the records it cannot write wait in its
bounded buffer (GATEWAY_RECORD_BUFFER, 20000 by default) and are written once the database is back. The
test counts the requests the client was answered and the records in the database: the number lost is
printed, and must be zero (the outage holds far fewer requests than the buffer's bound). After the
restart the gateway follows route changes again."""

from __future__ import annotations

import time

import pytest
from django.db import connection

from serving.models import RequestRecord
from serving.services import RouteSplit, route_set
from tests.faults.conftest import (
    Platform,
    Traffic,
    adder_static,
    answered,
    database_is_local_postgres,
    postgres_ctl,
    postgres_up,
    records_for,
)
from tests.support.demo import EnginePool
from tests.support.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.engines, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(600)]

OUTAGE_S = 8.0


def test_the_gateway_serves_through_a_database_restart_and_loses_no_record(
    demo_engines: EnginePool, platform: Platform
) -> None:
    if not database_is_local_postgres():
        pytest.skip("needs PostgreSQL on this machine (CI's DATABASE_URL); SQLite is a file, not a server to restart")
    adder = adder_static(demo_engines)
    route_set(alias_name="adder", split=RouteSplit(baseline=adder.v1, candidate=adder.v2, candidate_weight=0.5,
                                                   shadow_rate=0.0, rollout_id=None))
    gateway = platform.gateway()

    with Traffic(gateway.url, adder.key, ["adder"], clients=3, max_tokens=8) as traffic:
        traffic.wait_for(lambda sent: len(sent) >= 20, timeout_s=60, what="traffic before the outage")
        try:
            postgres_ctl("stop")
            down_at = time.monotonic()
            time.sleep(OUTAGE_S)
        finally:
            postgres_ctl("start")
            wait_until(postgres_up, timeout_s=60, what="PostgreSQL to accept connections")
            up_at = time.monotonic()
            connection.close()  # this test's own connection died with the server
        traffic.wait_for(lambda sent: sum(s.started > up_at for s in sent) >= 20, timeout_s=60,
                         what="traffic after the outage")
    sent = traffic.snapshot()
    during = [s for s in sent if down_at <= s.started < up_at]
    print(f"\n{len(sent)} requests, {len(during)} of them while PostgreSQL was down ({up_at - down_at:.1f} s)")

    # Served all along, on the route table it had.
    assert len(during) >= 10
    assert all(s.status == 200 and s.completed for s in sent), [s for s in sent if not s.completed][:3]
    assert {s.arm for s in during} == {"baseline", "candidate"}

    ids = answered(sent)
    written = records_for(ids, timeout_s=60)
    lost = len(ids - written)
    dropped = gateway.metric("platform_gateway_records_dropped_total")
    print(f"records: {len(ids)} requests answered, {len(written)} written, {lost} lost, {dropped:.0f} dropped "
          f"by the buffer; {gateway.metric('platform_gateway_record_write_failures_total'):.0f} failed batch writes")
    assert lost == 0 and dropped == 0
    assert RequestRecord.objects.filter(request_id__in=[s.request_id for s in during], outcome="ok").count() == len(during)

    # Its route poll reconnected: a change made now reaches it.
    route_set(alias_name="adder", split=RouteSplit(baseline=adder.v1, candidate=adder.v2, candidate_weight=1.0,
                                                   shadow_rate=0.0, rollout_id=None))
    with Traffic(gateway.url, adder.key, ["adder"], clients=1, limit_s=30) as after:
        after.wait_for(lambda sent: len(sent) >= 3 and all(s.arm == "candidate" for s in sent[-3:]),
                       timeout_s=30, what="the gateway to follow a route change")
