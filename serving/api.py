"""REST API of serving (/api/v1/model-versions, /api/v1/engines): register and list model versions,
create engine workers and set whether they should run.

Reads need a viewing role (CanView), writes a release manager (CanManage). A create POST honours an
`Idempotency-Key` header (config.idempotency): a retried CI step gets the first object back (200,
`Idempotent-Replayed: true`) instead of a second one or a 409."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import CanManage, CanView
from config.errors import Conflict, DomainError, NotFound
from config.idempotency import IDEMPOTENCY_TTL, idempotency_key_from, idempotent_create, request_fingerprint
from config.pagination import PaginatedListApi
from serving import selectors, services
from serving.models import EngineWorker, ModelVersion
from serving.serializers import (
    EngineDesiredStateInput,
    EngineWorkerCreateInput,
    EngineWorkerDetailOutput,
    EngineWorkerOutput,
    ModelVersionDetailOutput,
    ModelVersionOutput,
    ModelVersionRegisterInput,
)

IDEMPOTENCY_PARAMETER = OpenApiParameter(
    "Idempotency-Key", str, location=OpenApiParameter.HEADER, required=False,
    description="Retrying with the same key and body returns the object the first request made (200).",
)


class ReadWriteApi(APIView):
    """GET needs a viewing role; every other method a release manager."""

    def get_permissions(self) -> list[BasePermission]:
        permission = CanView if self.request.method in ("GET", "HEAD", "OPTIONS") else CanManage
        return [permission()]


def _user(request: Request) -> AbstractBaseUser:
    # The permission classes admitted only authenticated users with a role.
    assert isinstance(request.user, AbstractBaseUser)
    return request.user


def _created(data: Any, *, replayed: bool) -> Response:
    if replayed:
        return Response(data, status=status.HTTP_200_OK, headers={"Idempotent-Replayed": "true"})
    return Response(data, status=status.HTTP_201_CREATED)


# --- model versions -------------------------------------------------------------------------------


class ModelVersionsApi(PaginatedListApi, ReadWriteApi):
    @extend_schema(operation_id="model_versions_list",
                   parameters=[OpenApiParameter("name", str, description="Only this model family's versions.")],
                   responses=ModelVersionOutput(many=True))
    def get(self, request: Request) -> Response:
        versions = selectors.model_version_list().select_related("created_by")
        if name := request.query_params.get("name"):
            versions = versions.filter(name=name)
        return self.paginated(request, versions, ModelVersionOutput)

    @extend_schema(
        operation_id="model_versions_register",
        description="Register a model version. Its lineage (hashes of weights, tokenizer, chat template and "
                    "sampling defaults) is computed from the artifact. 409 if name and version are taken.",
        parameters=[IDEMPOTENCY_PARAMETER],
        request=ModelVersionRegisterInput,
        responses={201: ModelVersionDetailOutput, 200: ModelVersionDetailOutput},
    )
    def post(self, request: Request) -> Response:
        key = idempotency_key_from(request)
        data = ModelVersionRegisterInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        fingerprint = request_fingerprint(values)
        user = _user(request)

        def find() -> ModelVersion | None:
            return ModelVersion.objects.filter(created_by_id=user.pk, idempotency_key=key,
                                               created_at__gte=timezone.now() - IDEMPOTENCY_TTL).first()

        def create() -> ModelVersion:
            try:
                return services.model_version_register(
                    **values, created_by=user, idempotency_key=key or "", idempotency_fingerprint=fingerprint)
            except Conflict:
                # The same key's first request registered this very version a moment ago: replay it.
                if key is not None and find() is not None:
                    raise IntegrityError("idempotency key raced") from None
                raise

        result = idempotent_create(key=key, fingerprint=fingerprint, find=find,
                                   fingerprint_of=lambda version: version.idempotency_fingerprint, create=create)
        return _created(_version_detail(result.obj), replayed=result.replayed)


def _version_detail(version: ModelVersion) -> Any:
    ready = selectors.engine_workers_ready(model_version=version).count()
    return ModelVersionDetailOutput(version, context={"ready_engines": ready}).data


class ModelVersionDetailApi(ReadWriteApi):
    @extend_schema(operation_id="model_versions_retrieve",
                   description="A model version by id or by label (`adder-v2`).",
                   responses=ModelVersionDetailOutput)
    def get(self, request: Request, ref: str) -> Response:
        return Response(_version_detail(selectors.model_version_get(ref=ref)))


# --- engine workers -------------------------------------------------------------------------------


class EnginesApi(PaginatedListApi, ReadWriteApi):
    @extend_schema(
        operation_id="engines_list",
        parameters=[
            OpenApiParameter("model_version", str, description="Only this version's workers (id or label)."),
            OpenApiParameter("host_name", str, description="Only this host's workers."),
            OpenApiParameter("state", str, enum=EngineWorker.State.values, description="Only workers in this state."),
        ],
        responses=EngineWorkerOutput(many=True),
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        version = selectors.model_version_get(ref=params["model_version"]) if params.get("model_version") else None
        workers = selectors.engine_worker_list(model_version=version, host_name=params.get("host_name") or None)
        if (state := params.get("state")) is not None:
            if state not in EngineWorker.State.values:
                raise serializers.ValidationError({"state": [f"must be one of {', '.join(EngineWorker.State.values)}"]})
            workers = workers.filter(state=state)
        return self.paginated(request, workers, EngineWorkerOutput)

    @extend_schema(
        operation_id="engines_create",
        description="Create an engine worker, desired to run. `local`: the engine agent of `host_name` starts "
                    "vLLM for it; `static`: the agent probes `base_url`, an endpoint someone else runs.",
        parameters=[IDEMPOTENCY_PARAMETER],
        request=EngineWorkerCreateInput,
        responses={201: EngineWorkerDetailOutput, 200: EngineWorkerDetailOutput},
    )
    def post(self, request: Request) -> Response:
        key = idempotency_key_from(request)
        data = EngineWorkerCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        version = _version_for_input(values.pop("model_version"))
        fingerprint = request_fingerprint({**values, "model_version": version.pk})
        user = _user(request)

        def find() -> EngineWorker | None:
            return EngineWorker.objects.select_related("model_version").filter(
                created_by_id=user.pk, idempotency_key=key, created_at__gte=timezone.now() - IDEMPOTENCY_TTL).first()

        def create() -> EngineWorker:
            return services.engine_worker_create(model_version=version, **values, created_by=user,
                                                 idempotency_key=key or "", idempotency_fingerprint=fingerprint)

        result = idempotent_create(key=key, fingerprint=fingerprint, find=find,
                                   fingerprint_of=lambda worker: worker.idempotency_fingerprint, create=create)
        return _created(EngineWorkerDetailOutput(result.obj).data, replayed=result.replayed)


def _version_for_input(ref: str) -> ModelVersion:
    """The version an input names; an unknown one is bad input (400 on the field), not a missing resource."""
    try:
        return selectors.model_version_get(ref=ref)
    except NotFound as exc:
        raise DomainError(exc.message, field="model_version") from None


class EngineDetailApi(ReadWriteApi):
    @extend_schema(operation_id="engines_retrieve",
                   description="State, health, restarts, the last log lines and the last metrics scrape.",
                   responses=EngineWorkerDetailOutput)
    def get(self, request: Request, worker_id: int) -> Response:
        return Response(EngineWorkerDetailOutput(selectors.engine_worker_get(worker_id=worker_id)).data)


class EngineDesiredStateApi(ReadWriteApi):
    @extend_schema(
        operation_id="engines_set_desired_state",
        description="`stopped`: a ready worker leaves routing at once and the agent drains and stops it. "
                    "`running`: the agent starts it (a FAILED worker is retried).",
        request=EngineDesiredStateInput,
        responses=EngineWorkerDetailOutput,
    )
    def post(self, request: Request, worker_id: int) -> Response:
        data = EngineDesiredStateInput(data=request.data)
        data.is_valid(raise_exception=True)
        worker = selectors.engine_worker_get(worker_id=worker_id)
        services.engine_worker_set_desired(worker=worker, desired=data.validated_data["desired_state"])
        return Response(EngineWorkerDetailOutput(selectors.engine_worker_get(worker_id=worker_id)).data)
