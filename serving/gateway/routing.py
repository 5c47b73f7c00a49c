"""The in-memory route table and the choices made from it: which arm, which replica. Pure Python.

The table is rebuilt from database rows (`table.route_rows_load`) on the event loop's thread, so the
per-replica counters of outstanding requests are only ever touched by that one thread.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from serving.gateway.upstream import Endpoint

BASELINE = "baseline"
CANDIDATE = "candidate"

# A replica that refused a connection is skipped for this long (unless nothing else is left), so the
# gateway does not keep knocking on a dead engine until the agent marks it unhealthy.
REFUSED_BACKOFF_S = 2.0
# How far above an even share of the load a replica may go to keep its sessions (bounded-load hashing).
LOAD_EPSILON = 0.25


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
    ttfb_timeout_s: float | None = None  # None: the gateway's GATEWAY_TTFB_TIMEOUT_S


@dataclass(frozen=True)
class WorkerRow:
    id: int  # the replica's id: the worker's, or a pod's (serving.selectors.pod_replica_id)
    model_version_id: int
    base_url: str
    api_key: str
    worker_id: int | None = None  # the engine worker it belongs to (None: `id`)
    headers: tuple[str, ...] | None = None  # how the key is sent (None: as a bearer token)


@dataclass(frozen=True)
class KeyRow:
    key_hash: str
    aliases: tuple[str, ...]  # empty: every alias
    name: str = ""
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True)
class RouteRows:
    """What the database says, read in one pass; `version` changes whenever routing changes."""

    version: tuple[int, str]
    aliases: tuple[AliasRow, ...]
    workers: tuple[WorkerRow, ...]
    keys: tuple[KeyRow, ...]


class Replica:
    """One ready engine worker, with the gateway's own view of it: requests in flight, recent failures
    (outlier ejection, `outliers`), and the engine's queue as last scraped (`queues`)."""

    __slots__ = (
        "api_key", "base_url", "consecutive_failures", "ejected_until", "ejections", "endpoint", "headers", "id",
        "last_ejected_at", "outstanding", "probing", "refused_until", "waiting", "waiting_outstanding", "worker_id",
    )

    def __init__(self, worker_id: int, base_url: str, api_key: str, *, engine_worker_id: int | None = None,
                 key_headers: tuple[str, ...] | None = None) -> None:
        self.id = worker_id
        self.worker_id = worker_id if engine_worker_id is None else engine_worker_id
        self.outstanding = 0
        self.refused_until = 0.0
        # Outlier ejection: out of routing while `ejected_until` is set (a float, even once passed, until a
        # probe succeeds); `ejections` in a row double the time out.
        self.consecutive_failures = 0
        self.ejected_until: float | None = None
        self.ejections = 0
        self.last_ejected_at = 0.0
        self.probing = False
        # The engine's own queue (vllm:num_requests_waiting) at the last scrape, and our in-flight count then.
        self.waiting: int | None = None
        self.waiting_outstanding = 0
        self.update(base_url, api_key, key_headers)

    def update(self, base_url: str, api_key: str, key_headers: tuple[str, ...] | None = None) -> None:
        """Raises ValueError for a URL that is not http(s)."""
        self.endpoint = Endpoint(base_url.rstrip("/"))
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.headers: tuple[str, ...] = ("Content-Type: application/json",)
        if key_headers is not None:
            self.headers += key_headers
        elif api_key:
            self.headers += (f"Authorization: Bearer {api_key}",)

    def refused(self, now: float) -> None:
        self.refused_until = now + REFUSED_BACKOFF_S

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def queued(self) -> int | None:
        """The engine's queue now, as well as we know it: the last scrape plus what we sent since."""
        if self.waiting is None:
            return None
        return self.waiting + max(0, self.outstanding - self.waiting_outstanding)

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
    ttfb_timeout_s: float | None = None

    def arm(self, name: str) -> ArmRoute | None:
        return self.baseline if name == BASELINE else self.candidate


@dataclass(frozen=True)
class KeyRoute:
    """A gateway key as the hot path needs it: what it may call, and its admission limits."""

    key_hash: str
    name: str
    allowed: frozenset[str] | None  # None: every alias
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_concurrency: int | None = None

    @property
    def limited(self) -> bool:
        return bool(self.rpm_limit or self.tpm_limit or self.max_concurrency)

    def may_call(self, alias: str) -> bool:
        return self.allowed is None or alias in self.allowed


@dataclass
class RouteTable:
    version: tuple[int, str] = (-1, "")
    aliases: dict[str, AliasRoute] = field(default_factory=dict)
    keys: dict[str, KeyRoute] = field(default_factory=dict)
    replicas: dict[int, Replica] = field(default_factory=dict)

    @property
    def generation(self) -> int:
        return self.version[0]

    def aliases_for_key(self, key_hash: str) -> list[str]:
        key = self.keys.get(key_hash)
        if key is None:
            return []
        return sorted(name for name in self.aliases if key.may_call(name))


def route_table_build(rows: RouteRows, previous: RouteTable | None = None) -> RouteTable:
    """A table for `rows`, keeping the replica objects (in-flight counts, ejections) of `previous`."""
    old = previous.replicas if previous is not None else {}
    replicas: dict[int, Replica] = {}
    by_version: dict[int, list[Replica]] = {}
    for worker in rows.workers:
        if not worker.base_url:
            continue
        replica = old.get(worker.id)
        try:
            if replica is None:
                replica = Replica(worker.id, worker.base_url, worker.api_key, engine_worker_id=worker.worker_id,
                                  key_headers=worker.headers)
            else:
                replica.update(worker.base_url, worker.api_key, worker.headers)
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
            ttfb_timeout_s=row.ttfb_timeout_s,
        )
        for row in rows.aliases
    }
    keys = {
        key.key_hash: KeyRoute(
            key_hash=key.key_hash, name=key.name, allowed=frozenset(key.aliases) if key.aliases else None,
            rpm_limit=key.rpm_limit or None, tpm_limit=key.tpm_limit or None,
            max_concurrency=key.max_concurrency or None,
        )
        for key in rows.keys
    }
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


def load_bound(total: int, replicas: int) -> int:
    """Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): with `total`
    requests in flight over `replicas`, a replica may take one more only while it holds fewer than
    ceil((1 + LOAD_EPSILON) * (total + 1) / replicas). Some replica is always under the bound (the least
    busy holds at most total / replicas), so no replica ever holds more than the bound."""
    return math.ceil((1.0 + LOAD_EPSILON) * (total + 1) / replicas)


def replica_choose(
    replicas: tuple[Replica, ...], affinity: str | None, now: float, *, exclude: frozenset[int] | set[int] = frozenset(),
) -> Replica | None:
    """Where to send a request among an arm's replicas; None when none is left to try.

    Ejected replicas and those in `exclude` (tried already for this request) are left out; one that
    refused a connection a moment ago only if there is nothing else. Without an affinity key the least
    busy replica takes it; with one (a session, or a hash of the prompt's leading messages) the same key
    goes to the same replica, for vLLM's prefix cache, unless that replica is over its share of the load
    (`load_bound`): then the next replica in the key's own order that is under it."""
    candidates = [r for r in replicas if r.ejected_until is None and r.id not in exclude]
    live = [r for r in candidates if r.refused_until <= now] or candidates
    if not live:
        return None
    if len(live) == 1:
        return live[0]
    if affinity is None:
        return min(live, key=_outstanding)
    # Rendezvous hashing: when a replica comes or goes, only the keys that were on it move.
    key = affinity.encode()
    ranked = sorted(live, key=lambda r: _unit_hash(key, r.id.to_bytes(8, "big")), reverse=True)
    bound = load_bound(sum(r.outstanding for r in live), len(live))
    for replica in ranked:
        if replica.outstanding < bound:
            return replica
    return min(live, key=_outstanding)  # unreachable (see load_bound); kept as the safe answer


def _outstanding(replica: Replica) -> int:
    return replica.outstanding


def session_of(user: object, header: str | None) -> str | None:
    """The stickiness key: the body's `user`, else the X-Session-Id header."""
    if isinstance(user, str) and user:
        return user
    return header or None

