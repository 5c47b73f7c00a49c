"""The in-memory route table and the choices made from it: which arm, which replica. Pure Python.

The table is rebuilt from database rows (`table.route_rows_load`) on the event loop's thread, so the
per-replica counters of outstanding requests are only ever touched by that one thread.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from serving.gateway.upstream import Endpoint

BASELINE = "baseline"
CANDIDATE = "candidate"

# A replica that refused a connection is skipped for this long (unless nothing else is left), so the
# gateway does not keep knocking on a dead engine until the agent marks it unhealthy.
REFUSED_BACKOFF_S = 2.0


@dataclass(frozen=True)
class VersionRow:
    id: int
    label: str
    served_model_name: str


@dataclass(frozen=True)
class AliasRow:
    name: str
    baseline: VersionRow
    candidate: VersionRow | None
    candidate_weight: float
    shadow_rate: float
    rollout_id: int | None
    failover_to_candidate: bool
    store_prompts: bool


@dataclass(frozen=True)
class WorkerRow:
    id: int
    model_version_id: int
    base_url: str
    api_key: str


@dataclass(frozen=True)
class KeyRow:
    key_hash: str
    aliases: tuple[str, ...]  # empty: every alias


@dataclass(frozen=True)
class RouteRows:
    """What the database says, read in one pass; `version` changes whenever routing changes."""

    version: tuple[int, str]
    aliases: tuple[AliasRow, ...]
    workers: tuple[WorkerRow, ...]
    keys: tuple[KeyRow, ...]


class Replica:
    """One ready engine worker, with the gateway's own count of requests in flight to it."""

    __slots__ = ("api_key", "base_url", "endpoint", "headers", "id", "outstanding", "refused_until")

    def __init__(self, worker_id: int, base_url: str, api_key: str) -> None:
        self.id = worker_id
        self.outstanding = 0
        self.refused_until = 0.0
        self.update(base_url, api_key)

    def update(self, base_url: str, api_key: str) -> None:
        """Raises ValueError for a URL that is not http(s)."""
        self.endpoint = Endpoint(base_url.rstrip("/"))
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.headers: tuple[str, ...] = ("Content-Type: application/json",)
        if api_key:
            self.headers += (f"Authorization: Bearer {api_key}",)

    def refused(self, now: float) -> None:
        self.refused_until = now + REFUSED_BACKOFF_S

    def __repr__(self) -> str:
        return f"Replica({self.id}, {self.base_url}, outstanding={self.outstanding})"


@dataclass(frozen=True)
class ArmRoute:
    arm: str
    version: VersionRow
    replicas: tuple[Replica, ...]


@dataclass(frozen=True)
class AliasRoute:
    name: str
    baseline: ArmRoute
    candidate: ArmRoute | None
    candidate_weight: float
    shadow_rate: float
    rollout_id: int | None
    failover_to_candidate: bool
    store_prompts: bool
    # Salt of the sticky hash: a new rollout on the same alias draws a fresh set of users.
    salt: bytes = b""

    def arm(self, name: str) -> ArmRoute | None:
        return self.baseline if name == BASELINE else self.candidate


@dataclass
class RouteTable:
    version: tuple[int, str] = (-1, "")
    aliases: dict[str, AliasRoute] = field(default_factory=dict)
    # key hash -> the aliases it may call (None: all of them)
    keys: dict[str, frozenset[str] | None] = field(default_factory=dict)
    replicas: dict[int, Replica] = field(default_factory=dict)

    @property
    def generation(self) -> int:
        return self.version[0]

    def aliases_for_key(self, key_hash: str) -> list[str]:
        allowed = self.keys.get(key_hash, frozenset())
        return sorted(name for name in self.aliases if allowed is None or name in allowed)


def route_table_build(rows: RouteRows, previous: RouteTable | None = None) -> RouteTable:
    """A table for `rows`, keeping the replica objects (and their in-flight counts) of `previous`."""
    old = previous.replicas if previous is not None else {}
    replicas: dict[int, Replica] = {}
    by_version: dict[int, list[Replica]] = {}
    for worker in rows.workers:
        if not worker.base_url:
            continue
        replica = old.get(worker.id)
        try:
            if replica is None:
                replica = Replica(worker.id, worker.base_url, worker.api_key)
            else:
                replica.update(worker.base_url, worker.api_key)
        except ValueError:
            continue  # not a URL the gateway can call; the engine's own checks will say why
        replicas[worker.id] = replica
        by_version.setdefault(worker.model_version_id, []).append(replica)

    def arm(name: str, version: VersionRow) -> ArmRoute:
        return ArmRoute(arm=name, version=version, replicas=tuple(by_version.get(version.id, ())))

    aliases = {
        row.name: AliasRoute(
            name=row.name,
            baseline=arm(BASELINE, row.baseline),
            candidate=arm(CANDIDATE, row.candidate) if row.candidate is not None else None,
            candidate_weight=row.candidate_weight if row.candidate is not None else 0.0,
            shadow_rate=row.shadow_rate if row.candidate is not None else 0.0,
            rollout_id=row.rollout_id,
            failover_to_candidate=row.failover_to_candidate,
            store_prompts=row.store_prompts,
            salt=f"{row.name}\x00{row.rollout_id or 0}\x00".encode(),
        )
        for row in rows.aliases
    }
    keys = {key.key_hash: (frozenset(key.aliases) if key.aliases else None) for key in rows.keys}
    return RouteTable(version=rows.version, aliases=aliases, keys=keys, replicas=replicas)


def _unit_hash(*parts: bytes) -> float:
    digest = hashlib.blake2b(b"".join(parts), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 18446744073709551616.0  # 2**64: uniform on [0, 1)


def arm_choose(route: AliasRoute, session: str | None, *, rng: random.Random | None = None) -> str:
    """Baseline or candidate: sticky for a session (the same user keeps the same arm for the whole step,
    and one who is on the candidate at weight w stays on it at any higher weight), random without one."""
    weight = route.candidate_weight
    if route.candidate is None or weight <= 0.0:
        return BASELINE
    if weight >= 1.0:
        return CANDIDATE
    if session is None:
        draw = (rng or random).random()
    else:
        draw = _unit_hash(route.salt, session.encode())
    return CANDIDATE if draw < weight else BASELINE


def replica_choose(replicas: tuple[Replica, ...], session: str | None, now: float) -> Replica | None:
    """Fewest outstanding requests; a session sticks to one replica (vLLM's prefix cache) while it takes
    traffic and is not far busier than the rest. None when no replica is left."""
    live = [r for r in replicas if r.refused_until <= now] or list(replicas)
    if not live:
        return None
    if len(live) == 1:
        return live[0]
    least = min(live, key=_outstanding)
    if session is None:
        return least
    # Rendezvous hashing: when a replica comes or goes, only the sessions that were on it move.
    key = session.encode()
    preferred = max(live, key=lambda r: _unit_hash(key, r.id.to_bytes(8, "big")))
    # Bounded load: keep the session where it is unless that replica is well above the average.
    total = sum(r.outstanding for r in live)
    bound = max(4, 2 * (total + len(live) - 1) // len(live))
    return preferred if preferred.outstanding < bound else least


def _outstanding(replica: Replica) -> int:
    return replica.outstanding


def session_of(user: object, header: str | None) -> str | None:
    """The stickiness key: the body's `user`, else the X-Session-Id header."""
    if isinstance(user, str) and user:
        return user
    return header or None

