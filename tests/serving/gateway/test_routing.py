"""Arm and replica choice, without engines or a database; the bounded-load rule as a property over 1-16
replicas (hypothesis)."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.gateway.routing import (
    BASELINE,
    CANDIDATE,
    AliasRow,
    KeyRow,
    Replica,
    RouteRows,
    VersionRow,
    WorkerRow,
    _unit_hash,
    arm_choose,
    load_bound,
    replica_choose,
    route_table_build,
    session_of,
)

V1 = VersionRow(id=1, label="adder-v1", served_model_name="adder-v1")
V2 = VersionRow(id=2, label="adder-v2", served_model_name="adder-v2")


def rows(*, weight: float, rollout_id: int | None = 7, workers: tuple[WorkerRow, ...] = (), version: int = 1) -> RouteRows:
    alias = AliasRow(
        name="adder", baseline=V1, candidate=V2, candidate_weight=weight, shadow_rate=0.0, rollout_id=rollout_id,
        failover_to_candidate=False, store_prompts=False,
    )
    return RouteRows(version=(version, ""), aliases=(alias,), workers=workers, keys=(KeyRow("h", ()),))


def candidate_share(weight: float, users: int = 20000, rollout_id: int | None = 7) -> float:
    route = route_table_build(rows(weight=weight, rollout_id=rollout_id)).aliases["adder"]
    return sum(arm_choose(route, f"user-{i}") == CANDIDATE for i in range(users)) / users


def test_sessions_split_by_the_weight() -> None:
    for weight in (0.1, 0.5, 0.9):
        share = candidate_share(weight)
        # 99.9 % binomial interval around the weight.
        assert abs(share - weight) < 3.3 * math.sqrt(weight * (1 - weight) / 20000)


def test_a_session_keeps_its_arm_and_stays_on_the_candidate_as_the_weight_grows() -> None:
    low = route_table_build(rows(weight=0.1)).aliases["adder"]
    high = route_table_build(rows(weight=0.5)).aliases["adder"]
    on_candidate = [f"u{i}" for i in range(2000) if arm_choose(low, f"u{i}") == CANDIDATE]
    assert on_candidate
    for user in on_candidate:
        assert arm_choose(low, user) == CANDIDATE
        assert arm_choose(high, user) == CANDIDATE


def test_a_new_rollout_draws_a_new_set_of_users() -> None:
    first = route_table_build(rows(weight=0.5, rollout_id=1)).aliases["adder"]
    second = route_table_build(rows(weight=0.5, rollout_id=2)).aliases["adder"]
    users = [f"u{i}" for i in range(1000)]
    same = sum(arm_choose(first, u) == arm_choose(second, u) for u in users)
    assert 400 < same < 600  # independent draws agree about half the time


def test_without_a_session_the_arm_is_random() -> None:
    route = route_table_build(rows(weight=0.5)).aliases["adder"]
    rng = random.Random(3)
    arms = {arm_choose(route, None, rng=rng) for _ in range(50)}
    assert arms == {BASELINE, CANDIDATE}


def test_weights_at_the_ends_and_no_candidate() -> None:
    assert candidate_share(0.0, users=500) == 0.0
    assert candidate_share(1.0, users=500) == 1.0
    alias = AliasRow(name="solo", baseline=V1, candidate=None, candidate_weight=0.0, shadow_rate=0.0, rollout_id=None,
                     failover_to_candidate=False, store_prompts=False)
    table = route_table_build(RouteRows(version=(1, ""), aliases=(alias,), workers=(), keys=()))
    assert arm_choose(table.aliases["solo"], "anyone") == BASELINE


def test_user_field_wins_over_the_session_header() -> None:
    assert session_of("alice", "s-1") == "alice"
    assert session_of(None, "s-1") == "s-1"
    assert session_of("", None) is None
    assert session_of(42, None) is None


def workers(*ids: int, version: int = 1) -> tuple[WorkerRow, ...]:
    return tuple(WorkerRow(id=i, model_version_id=version, base_url=f"http://127.0.0.1:{9000 + i}", api_key="") for i in ids)


def test_replicas_without_a_session_go_to_the_least_busy() -> None:
    table = route_table_build(rows(weight=0.0, workers=workers(1, 2, 3)))
    replicas = table.aliases["adder"].baseline.replicas
    replicas[0].outstanding, replicas[1].outstanding, replicas[2].outstanding = 3, 1, 2
    assert replica_choose(replicas, None, now=0.0) is replicas[1]


def test_a_session_sticks_to_one_replica_until_it_is_far_busier() -> None:
    table = route_table_build(rows(weight=0.0, workers=workers(1, 2, 3)))
    replicas = table.aliases["adder"].baseline.replicas
    chosen = {replica_choose(replicas, "alice", now=0.0) for _ in range(20)}
    assert len(chosen) == 1
    home = chosen.pop()
    assert home is not None
    # Sessions spread over the replicas.
    homes = {replica_choose(replicas, f"user-{i}", now=0.0) for i in range(100)}
    assert len(homes) == 3
    home.outstanding = 50
    assert replica_choose(replicas, "alice", now=0.0) is not home


def test_a_replica_that_refused_is_skipped_for_a_while() -> None:
    table = route_table_build(rows(weight=0.0, workers=workers(1, 2)))
    first, second = table.aliases["adder"].baseline.replicas
    first.refused(now=100.0)
    assert {replica_choose((first, second), f"u{i}", now=100.5) for i in range(30)} == {second}
    # With nothing else left it is tried again rather than giving up.
    second.refused(now=100.0)
    assert replica_choose((first, second), None, now=100.5) is not None
    assert replica_choose((), None, now=0.0) is None


def test_a_rebuild_keeps_the_in_flight_counts_of_replicas_that_stay() -> None:
    before = route_table_build(rows(weight=0.0, workers=workers(1, 2)))
    before.replicas[1].outstanding = 5
    after = route_table_build(rows(weight=0.0, workers=workers(1, 3), version=2), before)
    assert after.replicas[1] is before.replicas[1]
    assert after.replicas[1].outstanding == 5
    assert set(after.replicas) == {1, 3}
    assert after.generation == 2


def test_keys_limit_the_aliases_listed() -> None:
    table = route_table_build(RouteRows(
        version=(1, ""),
        aliases=rows(weight=0.0).aliases,
        workers=(),
        keys=(KeyRow("all", ()), KeyRow("other", ("else",))),
    ))
    assert table.aliases_for_key("all") == ["adder"]
    assert table.aliases_for_key("other") == []
    assert table.aliases_for_key("unknown") == []


# --- bounded loads, for any number of replicas -------------------------------------------------------


def replicas_with(loads: list[int]) -> tuple[Replica, ...]:
    made = tuple(Replica(i + 1, f"http://127.0.0.1:{9000 + i}", "") for i in range(len(loads)))
    for replica, load in zip(made, loads, strict=True):
        replica.outstanding = load
    return made


@settings(max_examples=300, deadline=None)
@given(loads=st.lists(st.integers(min_value=0, max_value=64), min_size=1, max_size=16), session=st.text(min_size=1))
def test_a_session_goes_where_it_hashes_unless_that_replica_is_over_the_bound(loads: list[int], session: str) -> None:
    replicas = replicas_with(loads)
    chosen = replica_choose(replicas, session, now=0.0)
    assert chosen is not None
    bound = load_bound(sum(loads), len(loads))
    # Whatever the loads, the choice stays under the bound (one is always there)...
    assert len(loads) == 1 or chosen.outstanding < bound
    # ...and it is the first replica in the session's own order that is.
    if len(loads) > 1:
        ranked = sorted(replicas, key=lambda r: _rank(session, r), reverse=True)
        assert chosen is next(r for r in ranked if r.outstanding < bound)


def _rank(session: str, replica: Replica) -> float:
    return _unit_hash(session.encode(), replica.id.to_bytes(8, "big"))


@settings(max_examples=100, deadline=None)
@given(count=st.integers(min_value=1, max_value=16), arrivals=st.integers(min_value=1, max_value=400),
       sessions=st.integers(min_value=1, max_value=5))
def test_no_replica_ever_holds_more_than_the_bound_however_few_the_sessions(count: int, arrivals: int, sessions: int) -> None:
    """The rule of the old code (bound = max(4, 2 * average)) never moved a session off its replica with two
    replicas; with a handful of heavy sessions every replica count must still spread the load."""
    replicas = replicas_with([0] * count)
    for n in range(arrivals):
        total = sum(r.outstanding for r in replicas)
        chosen = replica_choose(replicas, f"session-{n % sessions}", now=0.0)
        assert chosen is not None
        chosen.outstanding += 1
        assert max(r.outstanding for r in replicas) <= load_bound(total, count)


def test_with_two_replicas_a_single_busy_session_spills_over() -> None:
    first, second = replicas_with([0, 0])
    for _ in range(20):
        chosen = replica_choose((first, second), "one-heavy-user", now=0.0)
        assert chosen is not None
        chosen.outstanding += 1
    # Twenty in flight, ten each on average: the session's replica holds at most 1.25 times that.
    assert sorted([first.outstanding, second.outstanding]) == [7, 13]


def test_ejected_replicas_are_left_out_and_an_arm_of_only_ejected_ones_has_none() -> None:
    first, second = replicas_with([0, 0])
    first.ejected_until = 5.0
    assert {replica_choose((first, second), f"u{i}", now=0.0) for i in range(20)} == {second}
    second.ejected_until = 5.0
    assert replica_choose((first, second), "u1", now=10.0) is None  # out until a probe brings them back
