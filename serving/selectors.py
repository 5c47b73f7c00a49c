from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import BooleanField, CharField, F, QuerySet, Value
from django.db.models.expressions import Case, RawSQL, When
from django.db.models.functions import Concat

from config.errors import NotFound
from serving.engines.capacity import ArmCapacity, arm_capacity
from serving.engines.flavors import flavor_get
from serving.models import Alias, EngineWorker, ModelVersion, RequestRecord, ShadowPair


def model_version_get(*, ref: str | int) -> ModelVersion:
    """A model version by id or by label (`adder-v2`)."""
    found: ModelVersion | None = None
    if isinstance(ref, int) or ref.isdigit():
        found = ModelVersion.objects.filter(pk=int(ref)).first()
    else:
        # Names and versions may both hold dashes: try every split of the label.
        parts = ref.split("-")
        for cut in range(1, len(parts)):
            found = ModelVersion.objects.filter(name="-".join(parts[:cut]), version="-".join(parts[cut:])).first()
            if found is not None:
                break
    if found is None:
        raise NotFound(f"no model version {ref!r}")
    return found


def model_version_list() -> QuerySet[ModelVersion]:
    return ModelVersion.objects.order_by("name", "version")


def engine_workers_ready(*, model_version: ModelVersion) -> QuerySet[EngineWorker]:
    return EngineWorker.objects.filter(
        model_version=model_version,
        desired_state=EngineWorker.Desired.RUNNING,
        state__in=EngineWorker.ROUTABLE_STATES,
    )


@dataclass(frozen=True)
class ReplicaRow:
    """One place the gateway may send a request: a worker, or one pod of a Kubernetes worker."""

    replica_id: int  # unique among replicas: the worker's id, or a stable one for a pod
    worker_id: int
    model_version_id: int
    base_url: str
    api_key: str
    headers: tuple[str, ...]  # the key as the flavor wants it sent


def pod_replica_id(worker_id: int, pod: str) -> int:
    """A stable id for a pod: the same across route-table rebuilds (the gateway keeps its in-flight count
    and sessions stay on it), above every worker id (bit 62 set)."""
    digest = hashlib.blake2b(f"{worker_id}/{pod}".encode(), digest_size=8).digest()
    return (1 << 62) | (int.from_bytes(digest, "big") & ((1 << 62) - 1))


def engine_replicas_routable() -> list[ReplicaRow]:
    """What the gateway's route table is built from: every ready worker that should run, and for a
    Kubernetes worker each of its pods that serves and is not being drained."""
    rows: list[ReplicaRow] = []
    workers = EngineWorker.objects.filter(
        desired_state=EngineWorker.Desired.RUNNING, state__in=EngineWorker.ROUTABLE_STATES
    ).order_by("id").values("id", "model_version_id", "driver", "flavor", "base_url", "api_key", "pods")
    for worker in workers:
        headers = flavor_get(worker["flavor"]).header_lines(worker["api_key"])
        if worker["driver"] == EngineWorker.Driver.KUBERNETES:
            for pod in worker["pods"] or []:
                if pod.get("routable") and pod.get("url"):
                    rows.append(ReplicaRow(pod_replica_id(worker["id"], str(pod.get("name"))), worker["id"],
                                           worker["model_version_id"], str(pod["url"]), worker["api_key"], headers))
        elif worker["base_url"]:
            rows.append(ReplicaRow(worker["id"], worker["id"], worker["model_version_id"], worker["base_url"],
                                   worker["api_key"], headers))
    return rows


def engine_workers_failed_since(*, since: datetime) -> QuerySet[EngineWorker]:
    """Workers the agent gave up on (crash loop or a start that never became ready) since `since`."""
    return EngineWorker.objects.select_related("model_version").filter(
        state=EngineWorker.State.FAILED, state_changed_at__gte=since
    ).order_by("state_changed_at")


def engine_worker_list(*, model_version: ModelVersion | None = None, host_name: str | None = None) -> QuerySet[EngineWorker]:
    workers = EngineWorker.objects.select_related("model_version")
    if model_version is not None:
        workers = workers.filter(model_version=model_version)
    if host_name is not None:
        workers = workers.filter(host_name=host_name)
    return workers.order_by("id")


def engine_worker_get(*, worker_id: int) -> EngineWorker:
    worker = EngineWorker.objects.select_related("model_version").filter(pk=worker_id).first()
    if worker is None:
        raise NotFound(f"no engine worker {worker_id}")
    return worker


def model_version_is_ready(*, model_version: ModelVersion) -> bool:
    return engine_workers_ready(model_version=model_version).exists()


@dataclass(frozen=True)
class EngineEndpoint:
    """Where to call one ready engine of a version directly, for callers that bypass the gateway (eval runs,
    shadow mirrors): its base URL and its key in the header its flavor takes (`api-key` for Azure OpenAI,
    a bearer token for the others), as the gateway itself sends it."""

    base_url: str
    headers: dict[str, str]


def engine_endpoint_get(*, model_version: ModelVersion) -> EngineEndpoint:
    """One ready engine of the version, picked at random; NotFound when it has none."""
    worker = (
        engine_workers_ready(model_version=model_version).exclude(base_url="").order_by("?")
        .values("base_url", "api_key", "flavor").first()
    )
    if worker is None:
        raise NotFound(f"model version {model_version.label} has no ready engine")
    return EngineEndpoint(base_url=worker["base_url"], headers=flavor_get(worker["flavor"]).headers(worker["api_key"]))


@dataclass(frozen=True)
class AliasCapacity:
    """Where an alias with a GPU budget stands: the replicas of each arm, and whether the traffic the
    rollout asked for has moved yet (it waits for the candidate's replicas)."""

    budget: int
    target_weight: float
    weight: float
    weight_changed_at: datetime | None
    baseline: ArmCapacity
    candidate: ArmCapacity | None

    @property
    def waiting(self) -> str | None:
        """Why the traffic has not reached the target weight yet; None once it has."""
        if self.weight == self.target_weight:
            return None
        candidate = self.candidate
        if candidate is None:
            return None
        why = (f"waiting for the candidate's replicas before moving to {self.target_weight:.0%}: "
               f"{candidate.ready} of {candidate.target} ready, the baseline at {self.baseline.occupied} "
               f"going to {self.baseline.target} (GPU budget {self.budget})")
        return why + (f"; its engine failed: {candidate.failed}" if candidate.failed else "")


def alias_capacity(*, name: str) -> AliasCapacity | None:
    """The alias's GPU budget and replicas per arm; None when it has no budget."""
    alias = Alias.objects.filter(name=name).first()
    if alias is None or alias.gpu_budget is None:
        return None
    arms = arm_capacity(alias=alias)
    return AliasCapacity(
        budget=alias.gpu_budget, target_weight=alias.target_weight, weight=alias.candidate_weight,
        weight_changed_at=alias.weight_changed_at, baseline=arms[alias.baseline_id],
        candidate=arms.get(alias.candidate_id) if alias.candidate_id is not None else None,
    )  # fmt: skip


def model_version_scalable(*, model_version: ModelVersion) -> bool:
    """Has a Kubernetes or local worker a GPU budget can scale (from zero replicas too)."""
    return EngineWorker.objects.filter(
        model_version=model_version, driver__in=(EngineWorker.Driver.KUBERNETES, EngineWorker.Driver.LOCAL)
    ).exists()


def alias_get(*, name: str) -> Alias | None:
    return Alias.objects.select_related("baseline", "candidate").filter(name=name).first()


def request_records(*, rollout_id: int | None = None, alias: str | None = None) -> QuerySet[RequestRecord]:
    """Request records to aggregate (the analysis never loads them row by row)."""
    records = RequestRecord.objects.all()
    if rollout_id is not None:
        records = records.filter(rollout_id=rollout_id)
    if alias is not None:
        records = records.filter(alias=alias)
    return records


def record_commit_horizon() -> int:
    """The commit order below which every request record that will ever exist is already visible to the
    caller's next statement.

    PostgreSQL: the oldest transaction of this database still running. Transaction ids are the cluster's,
    so `pg_snapshot_xmin` (the oldest running anywhere) would let a long transaction in another database of
    the same server hold every look back; records are written by this database's transactions only, so the
    horizon is the oldest id among the snapshot's running transactions that belongs to a backend of this
    database (`pg_stat_activity.backend_xid`, or a prepared transaction of it) or is the caller's own (it
    may write records after this look, in the same transaction), else the snapshot's xmax.
    The order matters: the snapshot is taken first (the statement's), the backends are read after it, so a
    transaction of this database running at the snapshot either still shows in pg_stat_activity (and holds
    the horizon) or has ended (and the caller's next statement, with a later snapshot, sees its records). A
    batch that commits late has an order at or above the horizon it was missed by, and the next look past
    that horizon reads it. pg_stat_activity is read once per transaction unless its snapshot is cleared,
    hence pg_stat_clear_snapshot first.

    SQLite has one writer at a time and ids that only grow, so every id below the largest committed one's
    successor is settled."""
    return _commit_horizon(RequestRecord._meta.db_table, _commit_column())


def shadow_pair_commit_horizon() -> int:
    """`record_commit_horizon` for shadow pairs: on PostgreSQL the same (the writing transaction's id is
    their commit order too, serving migration 0010), on SQLite the pairs' own ids."""
    return _commit_horizon(ShadowPair._meta.db_table, _shadow_commit_column())


def _commit_horizon(table: str, column: str) -> int:
    with connection.cursor() as cursor:
        if column != "commit_xid":
            cursor.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}")
            return int(cursor.fetchone()[0])
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(_HORIZON_SQL)
        return int(cursor.fetchone()[0])


# backend_xid and pg_prepared_xacts give 32-bit ids; the snapshot's are 64-bit (epoch and id): running
# transactions are within 2^31 of each other, so the low 32 bits identify one among them.
_HORIZON_SQL = """
    SELECT LEAST(pg_snapshot_xmax(s.snap)::text::bigint, pg_current_xact_id_if_assigned()::text::bigint, (
        SELECT MIN(x::text::bigint) FROM pg_snapshot_xip(s.snap) x
        WHERE x::text::bigint % 4294967296 IN (
            SELECT backend_xid::text::bigint FROM pg_stat_activity
            WHERE datname = current_database() AND backend_xid IS NOT NULL
            UNION ALL
            SELECT transaction::text::bigint FROM pg_prepared_xacts WHERE database = current_database())))
    FROM (SELECT pg_current_snapshot() AS snap) s
"""


def request_records_committed(records: QuerySet[RequestRecord], *, start: int, end: int) -> QuerySet[RequestRecord]:
    """The records of `records` whose commit order is in [start, end) (see `record_commit_horizon`)."""
    return _committed(records, _commit_column(), start, end)


def shadow_pairs_committed(pairs: QuerySet[ShadowPair], *, start: int, end: int) -> QuerySet[ShadowPair]:
    """The pairs of `pairs` whose commit order is in [start, end) (see `shadow_pair_commit_horizon`)."""
    return _committed(pairs, _shadow_commit_column(), start, end)


def _committed(rows: QuerySet[Any], order: str, start: int, end: int) -> QuerySet[Any]:
    quote = connection.ops.quote_name
    column = f"{quote(rows.model._meta.db_table)}.{quote(order)}"
    return rows.filter(RawSQL(f"{column} >= %s AND {column} < %s", (start, end), output_field=BooleanField()))


@functools.cache
def _commit_column() -> str:
    # The partitioned PostgreSQL table carries the writing transaction's id (serving.partitions).
    from serving.partitions import partitioned

    return "commit_xid" if partitioned() else "id"


def _shadow_commit_column() -> str:
    # Added on PostgreSQL by serving migration 0010.
    return "commit_xid" if connection.vendor == "postgresql" else "id"


def shadow_pairs(*, rollout_id: int | None) -> QuerySet[ShadowPair]:
    """A rollout's shadow pairs (every rollout's with None)."""
    pairs = ShadowPair.objects.all()
    return pairs if rollout_id is None else pairs.filter(rollout_id=rollout_id)


def session_unit(*, session: str | None, request_id: str) -> Case | Concat:
    """The unit a request record or shadow pair is counted in (an expression over the fields named): its
    session hash, or "r:<request id>" when it has none. Every check that takes sessions as its units
    (experiments' analysis, evals' shadow quality) groups by this."""
    own = Concat(Value("r:"), F(request_id), output_field=CharField())
    if session is None:
        return own
    return Case(When(**{session: ""}, then=own), default=F(session), output_field=CharField())
