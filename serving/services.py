"""Every write to serving's models that other code makes goes through here (the engine agent has its own
state transitions in `serving.engines.services`, the gateway its record writer in `serving.gateway`)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from config.errors import Conflict, DomainError
from serving.lineage import lineage_of
from serving.models import Alias, EngineWorker, GatewayKey, ModelVersion, RouteGeneration, ShadowPair

GATEWAY_KEY_PREFIX = "gw_"


def route_generation_bump() -> None:
    """Tell every gateway process to rebuild its route table. Call inside the transaction that changed routing."""
    updated = RouteGeneration.objects.filter(pk=1).update(generation=F("generation") + 1, changed_at=timezone.now())
    if not updated:
        RouteGeneration.objects.get_or_create(pk=1, defaults={"generation": 1})


@transaction.atomic
def model_version_register(
    *,
    name: str,
    version: str,
    artifact: str,
    served_model_name: str = "",
    engine_args: list[str] | None = None,
    sampling_defaults: dict[str, Any] | None = None,
    deployment: dict[str, Any] | None = None,
    description: str = "",
    price_input_per_million: Decimal | float = 0,
    price_output_per_million: Decimal | float = 0,
    created_by: AbstractBaseUser | None = None,
    idempotency_key: str = "",
    idempotency_fingerprint: str = "",
) -> ModelVersion:
    if ModelVersion.objects.filter(name=name, version=version).exists():
        raise Conflict(f"model version {name}-{version} is already registered", field="version")
    from serving.engines.command import gpu_count, reserved_flag_in
    from serving.engines.kubernetes.spec import DeploymentSpec, SpecError

    engine_args = list(engine_args or [])
    if not all(isinstance(arg, str) for arg in engine_args):
        raise DomainError("engine_args must be a list of strings", field="engine_args")
    reserved = reserved_flag_in(engine_args)
    if reserved is not None:
        raise DomainError(f"{reserved} is set by the engine agent; leave it out", field="engine_args")
    try:
        gpu_count(engine_args)
    except ValueError as exc:
        raise DomainError(str(exc), field="engine_args") from None
    try:
        DeploymentSpec.from_dict(deployment or {})
    except SpecError as exc:
        raise DomainError(exc.message, field=exc.field) from None
    sampling_defaults = dict(sampling_defaults or {})
    lineage = lineage_of(artifact, sampling_defaults=sampling_defaults)
    return ModelVersion.objects.create(
        name=name,
        version=version,
        artifact=artifact,
        served_model_name=served_model_name or f"{name}-{version}",
        engine_args=engine_args,
        sampling_defaults=sampling_defaults,
        deployment=dict(deployment or {}),
        description=description,
        lineage=lineage,
        lineage_hash=lineage["lineage_hash"],
        price_input_per_million=Decimal(str(price_input_per_million)),
        price_output_per_million=Decimal(str(price_output_per_million)),
        # By id: the user model is whatever AUTH_USER_MODEL says.
        created_by_id=created_by.pk if created_by is not None else None,
        idempotency_key=_idempotency_key_take(ModelVersion, created_by, idempotency_key),
        idempotency_fingerprint=idempotency_fingerprint if idempotency_key else "",
    )


def _idempotency_key_take(model: type[ModelVersion] | type[EngineWorker], user: AbstractBaseUser | None,
                          key: str) -> str:
    """The key to store on a new object; an older object holding it (past the key's lifetime) lets go."""
    if not key or user is None:
        return ""
    model.objects.filter(created_by_id=user.pk, idempotency_key=key).update(idempotency_key="")
    return key


@transaction.atomic
def model_version_artifact_update(*, model_version: ModelVersion, artifact: str) -> ModelVersion:
    """Point a version at a rebuilt artifact and recompute its lineage (the demo models after a recipe change).

    Engines already running keep serving what they loaded until they restart."""
    locked = ModelVersion.objects.select_for_update().get(pk=model_version.pk)
    lineage = lineage_of(artifact, sampling_defaults=locked.sampling_defaults)
    locked.artifact = artifact
    locked.lineage = lineage
    locked.lineage_hash = lineage["lineage_hash"]
    locked.save(update_fields=["artifact", "lineage", "lineage_hash"])
    return locked


@transaction.atomic
def engine_worker_create(
    *,
    model_version: ModelVersion,
    driver: str = EngineWorker.Driver.LOCAL,
    host_name: str | None = None,
    base_url: str = "",
    api_key: str = "",
    flavor: str = EngineWorker.Flavor.VLLM,
    replicas: int = 1,
    created_by: AbstractBaseUser | None = None,
    idempotency_key: str = "",
    idempotency_fingerprint: str = "",
) -> EngineWorker:
    """A worker desired to run, for the agent of `host_name` (default: this server's ENGINE_AGENT_HOST; for a
    Kubernetes worker, the reconciler started with that host name)."""
    from serving.engines.flavors import base_url_normalise
    from serving.engines.kubernetes.spec import DeploymentSpec, SpecError

    Driver = EngineWorker.Driver
    if driver not in Driver.values:
        raise DomainError(f"driver must be one of {', '.join(Driver.values)}", field="driver")
    if flavor not in EngineWorker.Flavor.values:
        raise DomainError(f"flavor must be one of {', '.join(EngineWorker.Flavor.values)}", field="flavor")
    if driver != Driver.STATIC and flavor != EngineWorker.Flavor.VLLM:
        raise DomainError(f"a {driver} engine is vLLM; flavor is for static endpoints", field="flavor")
    if driver == Driver.STATIC:
        if not base_url:
            raise DomainError("a static engine needs the base_url of its OpenAI-compatible endpoint", field="base_url")
        try:
            base_url = base_url_normalise(base_url, flavor=flavor)
        except ValueError as exc:
            raise DomainError(str(exc), field="base_url") from None
    elif base_url or api_key:
        raise DomainError(f"only a static engine takes {'base_url' if base_url else 'api_key'}; "
                          f"the platform sets a {driver} engine's", field="base_url" if base_url else "api_key")
    if replicas < 1 or (replicas > 1 and driver != Driver.KUBERNETES):
        raise DomainError("replicas must be at least 1, and more than 1 only for a kubernetes engine",
                          field="replicas")
    if driver == Driver.KUBERNETES:
        try:
            DeploymentSpec.from_dict(model_version.deployment)
        except SpecError as exc:
            raise DomainError(f"model version {model_version.label}: {exc}", field="model_version") from None
    return EngineWorker.objects.create(
        model_version=model_version,
        driver=driver,
        host_name=host_name or settings.ENGINE_AGENT_HOST,
        base_url=base_url,
        api_key=api_key,
        flavor=flavor,
        replicas=replicas,
        desired_state=EngineWorker.Desired.RUNNING,
        state=EngineWorker.State.PENDING,
        state_changed_at=timezone.now(),
        created_by_id=created_by.pk if created_by is not None else None,
        idempotency_key=_idempotency_key_take(EngineWorker, created_by, idempotency_key),
        idempotency_fingerprint=idempotency_fingerprint if idempotency_key else "",
    )


@transaction.atomic
def engine_worker_set_desired(*, worker: EngineWorker, desired: str, reason: str = "") -> EngineWorker:
    """Ask the worker's agent to run or stop it (`reason`: why it stops, shown on the worker)."""
    if desired not in EngineWorker.Desired.values:
        raise DomainError(f"desired_state must be one of {', '.join(EngineWorker.Desired.values)}", field="desired_state")
    worker = EngineWorker.objects.select_for_update().get(pk=worker.pk)
    # Asking a failed worker to run again is a retry, though it was never asked to stop.
    retry = desired == EngineWorker.Desired.RUNNING and worker.state == EngineWorker.State.FAILED
    if worker.desired_state == desired and not retry:
        return worker
    worker.desired_state = desired
    fields = ["desired_state"]
    if desired == EngineWorker.Desired.STOPPED and worker.state == EngineWorker.State.READY:
        # Stop routing at once; the agent drains and stops the process.
        worker.state = EngineWorker.State.DRAINING
        worker.state_reason = (reason or "stop requested")[:500]
        worker.state_changed_at = timezone.now()
        fields += ["state", "state_reason", "state_changed_at"]
        route_generation_bump()
    elif desired == EngineWorker.Desired.RUNNING and worker.state in (
        EngineWorker.State.STOPPED, EngineWorker.State.FAILED
    ):
        worker.state = EngineWorker.State.PENDING
        worker.consecutive_failures = 0
        worker.next_start_at = None
        worker.state_changed_at = timezone.now()
        fields += ["state", "consecutive_failures", "next_start_at", "state_changed_at"]
    worker.save(update_fields=fields)
    return worker


@transaction.atomic
def alias_ensure(*, name: str, stable: ModelVersion, store_prompts: bool = False) -> Alias:
    """Create the alias serving `stable`, or return it unchanged if it exists."""
    alias, created = Alias.objects.get_or_create(name=name, defaults={"baseline": stable, "store_prompts": store_prompts})
    if created:
        route_generation_bump()
    return alias


@dataclass(frozen=True)
class RouteSplit:
    baseline: ModelVersion
    candidate: ModelVersion | None
    candidate_weight: float
    shadow_rate: float
    rollout_id: int | None
    failover_to_candidate: bool = False
    # Replicas of the alias's versions together (serving.engines.capacity); None: no budget.
    gpu_budget: int | None = None


@transaction.atomic
def route_set(*, alias_name: str, split: RouteSplit) -> Alias:
    """Set how an alias splits its traffic. Gateways see it within a second (RouteGeneration).

    With a `gpu_budget` the split's weight is a target: the arms are scaled to fit the budget (the baseline
    gives up replicas first) and a higher candidate weight reaches the gateways only once the candidate's
    replicas for it are ready (`alias_capacity` says how far it is); a lower one at once."""
    if not 0.0 <= split.candidate_weight <= 1.0:
        raise DomainError("candidate_weight must be between 0 and 1", field="candidate_weight")
    if not 0.0 <= split.shadow_rate <= 1.0:
        raise DomainError("shadow_rate must be between 0 and 1", field="shadow_rate")
    if split.candidate is None and (split.candidate_weight > 0 or split.shadow_rate > 0):
        raise DomainError("a weight or shadow rate needs a candidate", field="candidate")
    from serving.engines.capacity import CapacityError, capacity_check, capacity_sync_locked

    if split.gpu_budget is not None:
        try:
            capacity_check(budget=split.gpu_budget, weight=split.candidate_weight, has_candidate=split.candidate is not None)
        except CapacityError as exc:
            raise DomainError(str(exc), field="gpu_budget") from None
    alias = Alias.objects.select_for_update().filter(name=alias_name).first()
    if alias is None:
        alias = Alias(name=alias_name)
    same_candidate = alias.pk is not None and alias.candidate_id == (split.candidate.pk if split.candidate else None)
    previous_weight = alias.candidate_weight if same_candidate else 0.0
    alias.baseline = split.baseline
    alias.candidate = split.candidate
    alias.shadow_rate = split.shadow_rate
    alias.rollout_id = split.rollout_id
    alias.failover_to_candidate = split.failover_to_candidate
    alias.target_weight = split.candidate_weight
    alias.gpu_budget = split.gpu_budget
    if split.gpu_budget is None:
        alias.capacity_targets = {}
        alias.candidate_weight = split.candidate_weight
    else:
        # Held where it was (0 for a new candidate) until capacity_sync finds the candidate's replicas ready.
        alias.candidate_weight = min(previous_weight, split.candidate_weight)
    if alias.candidate_weight != previous_weight or not same_candidate:
        alias.weight_changed_at = timezone.now()
    alias.save()
    capacity_sync_locked(alias)
    route_generation_bump()
    return alias


@dataclass(frozen=True)
class IssuedGatewayKey:
    key: GatewayKey
    raw: str


def gateway_key_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class KeyLimits:
    """A gateway key's admission limits; None is no limit."""

    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_concurrency: int | None = None

    def check(self) -> None:
        for name in ("rpm_limit", "tpm_limit", "max_concurrency"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DomainError(f"{name} must be a whole number, at least 1 (or none for no limit)", field=name)


@transaction.atomic
def gateway_key_create(
    *, name: str, aliases: list[str] | None = None, raw: str | None = None, limits: KeyLimits | None = None
) -> IssuedGatewayKey:
    """A new gateway key; `raw` lets the operator choose it (PLATFORM_DEMO_GATEWAY_KEY), else it is generated."""
    limits = limits or KeyLimits()
    limits.check()
    raw = raw or GATEWAY_KEY_PREFIX + secrets.token_urlsafe(24)
    digest = gateway_key_digest(raw)
    existing = GatewayKey.objects.filter(key_hash=digest).first()
    if existing is not None:
        return IssuedGatewayKey(key=existing, raw=raw)
    key = GatewayKey.objects.create(
        name=name, key_hash=digest, prefix=raw[:10], aliases=list(aliases or []), rpm_limit=limits.rpm_limit,
        tpm_limit=limits.tpm_limit, max_concurrency=limits.max_concurrency,
    )
    route_generation_bump()
    return IssuedGatewayKey(key=key, raw=raw)


@transaction.atomic
def gateway_key_limits_set(*, key: GatewayKey, limits: KeyLimits) -> GatewayKey:
    """Change a key's admission limits; every gateway applies them within a second."""
    limits.check()
    locked = GatewayKey.objects.select_for_update().get(pk=key.pk)
    locked.rpm_limit, locked.tpm_limit, locked.max_concurrency = limits.rpm_limit, limits.tpm_limit, limits.max_concurrency
    locked.save(update_fields=["rpm_limit", "tpm_limit", "max_concurrency"])
    route_generation_bump()
    return locked


TTFB_TIMEOUT_MIN_S, TTFB_TIMEOUT_MAX_S = 0.05, 3600.0


@transaction.atomic
def alias_options_set(*, alias: Alias, store_prompts: bool, ttfb_timeout_s: float | None) -> Alias:
    """An alias's own gateway options (what the rollouts' splits leave alone); gateways see them within a second."""
    if ttfb_timeout_s is not None and not (TTFB_TIMEOUT_MIN_S <= ttfb_timeout_s <= TTFB_TIMEOUT_MAX_S):
        raise DomainError(f"ttfb_timeout_s must be between {TTFB_TIMEOUT_MIN_S:g} and {TTFB_TIMEOUT_MAX_S:g} seconds "
                          "(or none for the default)", field="ttfb_timeout_s")
    locked = Alias.objects.select_for_update().get(pk=alias.pk)
    locked.store_prompts, locked.ttfb_timeout_s = store_prompts, ttfb_timeout_s
    locked.save(update_fields=["store_prompts", "ttfb_timeout_s", "updated_at"])
    route_generation_bump()
    return locked


@transaction.atomic
def gateway_key_revoke(*, key: GatewayKey) -> None:
    GatewayKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    route_generation_bump()


def shadow_pair_scores_set(*, pair: ShadowPair, scores: dict[str, float | bool | None]) -> None:
    """Scores of a shadow pair, by scorer label (written by the evals app's shadow scoring; a pairwise
    judge also writes "<label>#flipped")."""
    with transaction.atomic():
        locked = ShadowPair.objects.select_for_update().get(pk=pair.pk)
        locked.scores = {**locked.scores, **scores}
        locked.save(update_fields=["scores"])
