"""Reading the route table's rows from the database (called in the gateway's database thread)."""

from __future__ import annotations

from django.db import InterfaceError, OperationalError, connection

from serving.gateway.routing import AliasRow, KeyRow, RouteRows, VersionRow, WorkerRow
from serving.models import Alias, GatewayKey, ModelVersion, RouteGeneration
from serving.selectors import engine_replicas_routable

_VERSION_SQL = ""


def route_version_read() -> tuple[int, str]:
    """(generation, changed_at): the timestamp tells a reset row (a fresh database) from an unchanged one.

    Every gateway process runs this a few times a second, so it is one prepared statement rather than a
    queryset compiled each time (which cost several milliseconds of CPU per poll)."""
    global _VERSION_SQL
    if not _VERSION_SQL:
        quote = connection.ops.quote_name
        _VERSION_SQL = (
            f"SELECT {quote('generation')}, {quote('changed_at')} FROM {quote(RouteGeneration._meta.db_table)} "
            f"WHERE {quote('id')} = 1"
        )
    try:
        with connection.cursor() as cursor:
            cursor.execute(_VERSION_SQL)
            row = cursor.fetchone()
    except (OperationalError, InterfaceError):
        connection.close()
        raise
    if row is None:
        return (0, "")
    return (int(row[0]), str(row[1] or ""))


def route_rows_load() -> RouteRows:
    try:
        return _load()
    except (OperationalError, InterfaceError):
        connection.close()
        raise


def _load() -> RouteRows:
    # The version is read first: a change landing during the reads below bumps it again, so the next
    # poll rebuilds once more rather than keeping a table older than its version.
    version = route_version_read()
    versions = {
        mv.id: VersionRow(id=mv.id, label=mv.label, served_model_name=mv.served_model_name)
        for mv in ModelVersion.objects.only("id", "name", "version", "served_model_name")
    }
    aliases = tuple(
        AliasRow(
            name=alias.name,
            baseline=versions[alias.baseline_id],
            candidate=versions.get(alias.candidate_id) if alias.candidate_id else None,
            candidate_weight=alias.candidate_weight,
            shadow_rate=alias.shadow_rate,
            rollout_id=alias.rollout_id,
            failover_to_candidate=alias.failover_to_candidate,
            store_prompts=alias.store_prompts,
            ttfb_timeout_s=alias.ttfb_timeout_s,
        )
        for alias in Alias.objects.all()
        if alias.baseline_id in versions
    )
    # One row per replica: a worker, or each serving pod of a Kubernetes worker.
    workers = tuple(
        WorkerRow(id=r.replica_id, model_version_id=r.model_version_id, base_url=r.base_url, api_key=r.api_key,
                  worker_id=r.worker_id, headers=r.headers)
        for r in engine_replicas_routable()
    )
    keys = tuple(
        KeyRow(key_hash=k["key_hash"], aliases=tuple(k["aliases"] or ()), name=k["name"], rpm_limit=k["rpm_limit"],
               tpm_limit=k["tpm_limit"], max_concurrency=k["max_concurrency"])
        for k in GatewayKey.objects.filter(revoked_at__isnull=True).values(
            "key_hash", "aliases", "name", "rpm_limit", "tpm_limit", "max_concurrency"
        )
    )
    return RouteRows(version=version, aliases=aliases, workers=workers, keys=keys)
