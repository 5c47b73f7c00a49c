"""REST API of the evals app (/api/v1/eval-...): suites, runs with progress, and paired comparisons.

Reads need a viewing role (CanView), writes a release manager (CanManage). Serializers validate the
shape; the services decide and write."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser, FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import CanManage, CanView
from config.errors import DomainError, NotFound
from config.pagination import PaginatedListApi
from config.query import query_flag
from evals import jsonl, selectors, services
from evals.models import EvalRun, EvalSuite
from serving.selectors import model_version_get


class JsonLinesParser(BaseParser):
    """A suite sent as the raw request body (`Content-Type: application/jsonl`, `application/x-ndjson` or
    `text/plain`); the name comes from the query string."""

    media_type = "application/jsonl"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return stream.read() if stream is not None else b""


class NdjsonParser(JsonLinesParser):
    media_type = "application/x-ndjson"


class PlainTextParser(JsonLinesParser):
    media_type = "text/plain"


class ReadWriteApi(APIView):
    """GET needs a viewing role; every other method a release manager."""

    def get_permissions(self) -> list[BasePermission]:
        permission = CanView if self.request.method in ("GET", "HEAD", "OPTIONS") else CanManage
        return [permission()]


# --- suites ---------------------------------------------------------------------------------------


class SuiteOutput(serializers.ModelSerializer):
    tags = serializers.DictField(child=serializers.IntegerField(), help_text="Items per tag.")

    class Meta:
        model = EvalSuite
        fields = ("id", "name", "version", "label", "description", "source", "item_count", "tags", "content_hash",
                  "created_at")


class SuiteCreateInput(serializers.Serializer):
    name = serializers.CharField(max_length=64)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    file = serializers.FileField(required=False, help_text="The JSONL file (multipart upload).")
    jsonl = serializers.CharField(required=False, trim_whitespace=False, help_text="The JSONL text (JSON body).")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("file" in attrs) == ("jsonl" in attrs):
            raise serializers.ValidationError({"file": ["send the suite as a file or as jsonl text, one of them"]})
        return attrs


class ItemOutput(serializers.Serializer):
    id = serializers.IntegerField()
    key = serializers.CharField()
    position = serializers.IntegerField()
    prompt = serializers.CharField()
    messages = serializers.JSONField(allow_null=True)
    reference = serializers.CharField(allow_null=True)
    tags = serializers.ListField(child=serializers.CharField())


SUITE_UPLOAD_ERROR = inline_serializer(
    "SuiteUploadError",
    {
        "detail": serializers.CharField(),
        "code": serializers.CharField(),
        "errors": serializers.DictField(child=serializers.ListField(child=serializers.CharField())),
        "lines": serializers.ListField(required=False, child=inline_serializer("SuiteLineError", {
            "line": serializers.IntegerField(), "reason": serializers.CharField()})),
    },
)


class SuitesApi(PaginatedListApi, ReadWriteApi):
    parser_classes = [MultiPartParser, FormParser, JSONParser, JsonLinesParser, NdjsonParser, PlainTextParser]

    @extend_schema(
        operation_id="eval_suites_list",
        parameters=[OpenApiParameter("name", str, description="Only this suite's versions."),
                    OpenApiParameter("latest", bool, description="Only each suite's newest version.")],
        responses=SuiteOutput(many=True),
    )
    def get(self, request: Request) -> Response:
        suites = selectors.eval_suite_list(name=request.query_params.get("name") or None,
                                           latest_only=query_flag(request, "latest"))
        return self.paginated(request, suites, SuiteOutput)

    @extend_schema(
        operation_id="eval_suites_create",
        description=(
            "Upload a suite as JSONL: a multipart `file` with `name`, a JSON body {name, jsonl}, or the raw JSONL "
            "body (Content-Type application/jsonl, application/x-ndjson or text/plain) with `?name=`. Each line: "
            '{"id"?, "prompt" | "messages", "reference"?, "tags"?, "metadata"?}. A bad line refuses the whole '
            f"upload (400, every bad line by number). At most {jsonl.MAX_ITEMS} items and {jsonl.MAX_BYTES} bytes. "
            "The same content as the latest version returns it (200); otherwise a new version (201)."
        ),
        parameters=[OpenApiParameter("name", str, description="The suite name, with a raw JSONL body.")],
        request={"multipart/form-data": SuiteCreateInput, "application/json": SuiteCreateInput,
                 "application/jsonl": OpenApiTypes.STR},
        responses={201: SuiteOutput, 200: SuiteOutput, 400: SUITE_UPLOAD_ERROR},
    )
    def post(self, request: Request) -> Response:
        if isinstance(request.data, bytes):
            values = {"name": request.query_params.get("name", ""), "jsonl": request.data.decode("utf-8", "replace")}
            raw: bytes | str = request.data
            data = SuiteCreateInput(data=values)
            data.is_valid(raise_exception=True)
        else:
            data = SuiteCreateInput(data=request.data)
            data.is_valid(raise_exception=True)
            upload = data.validated_data.get("file")
            if upload is not None:
                if upload.size > jsonl.MAX_BYTES:
                    raise DomainError(f"the file is {upload.size} bytes; the limit is {jsonl.MAX_BYTES}", field="file")
                raw = upload.read()
            else:
                raw = data.validated_data["jsonl"]
        before = EvalSuite.objects.filter(name=data.validated_data["name"]).order_by("-version").values_list("id", flat=True).first()
        suite = services.eval_suite_create(
            name=data.validated_data["name"], jsonl_data=raw, description=data.validated_data.get("description", ""),
            created_by=request.user,
        )
        created = suite.pk != before
        return Response(SuiteOutput(suite).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


def _suite(suite_id: int) -> EvalSuite:
    return selectors.eval_suite_get(ref=suite_id)


class SuiteDetailApi(ReadWriteApi):
    @extend_schema(operation_id="eval_suites_retrieve", responses=SuiteOutput)
    def get(self, request: Request, suite_id: int) -> Response:
        return Response(SuiteOutput(_suite(suite_id)).data)


class SuiteItemsApi(PaginatedListApi, ReadWriteApi):
    @extend_schema(operation_id="eval_suite_items_list",
                   parameters=[OpenApiParameter("tag", str, description="Only items with this tag.")],
                   responses=ItemOutput(many=True))
    def get(self, request: Request, suite_id: int) -> Response:
        items = selectors.eval_suite_items(suite=_suite(suite_id), tag=request.query_params.get("tag") or None)
        return self.paginated(request, items, ItemOutput)


# --- runs -----------------------------------------------------------------------------------------


class ProgressOutput(serializers.Serializer):
    done = serializers.IntegerField()
    total = serializers.IntegerField()
    failed_items = serializers.IntegerField()
    fraction = serializers.FloatField()


class RunOutput(serializers.ModelSerializer):
    suite = serializers.CharField(source="suite.label")
    suite_id = serializers.IntegerField()
    model_version = serializers.CharField(source="model_version.label")
    model_version_id = serializers.IntegerField()
    progress = serializers.SerializerMethodField()

    class Meta:
        model = EvalRun
        fields: tuple[str, ...] = ("id", "suite", "suite_id", "model_version", "model_version_id", "lineage_hash", "scorers",
                  "concurrency", "max_tokens", "state", "state_reason", "cancel_requested", "progress",
                  "gate_rollout_id", "created_at", "started_at", "finished_at")

    @extend_schema_field(ProgressOutput)
    def get_progress(self, run: EvalRun) -> dict[str, Any]:
        progress = selectors.eval_run_progress(run=run)
        return {"done": progress.done, "total": progress.total, "failed_items": progress.failed_items,
                "fraction": progress.fraction}


class RunDetailOutput(RunOutput):
    summary = serializers.SerializerMethodField()

    class Meta(RunOutput.Meta):
        fields = (*RunOutput.Meta.fields, "summary")

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_summary(self, run: EvalRun) -> dict[str, Any]:
        return selectors.eval_run_live_summary(run=run)


class RunCreateInput(serializers.Serializer):
    suite = serializers.CharField(help_text="Suite id, name (its latest version) or name@version.")
    model_version = serializers.CharField(help_text="Model version id or label, e.g. adder-v2.")
    scorers = serializers.JSONField(help_text='Scorer names or specs: ["exact_match", {"name": "numeric", '
                                              '"params": {"tolerance": 1}}].')
    concurrency = serializers.IntegerField(required=False, default=4, min_value=1, max_value=services.MAX_CONCURRENCY)
    max_tokens = serializers.IntegerField(required=False, default=64, min_value=1, max_value=services.MAX_RUN_TOKENS)


def _field_lookup(lookup: Any, *, field: str) -> Any:
    try:
        return lookup()
    except NotFound as exc:
        raise DomainError(exc.message, field=field) from exc


class RunsApi(PaginatedListApi, ReadWriteApi):
    @extend_schema(
        operation_id="eval_runs_list",
        parameters=[OpenApiParameter("suite", str, description="Suite id, name or name@version."),
                    OpenApiParameter("model_version", str, description="Model version id or label."),
                    OpenApiParameter("state", str, enum=list(EvalRun.State.values))],
        responses=RunOutput(many=True),
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        suite = _field_lookup(lambda: selectors.eval_suite_get(ref=params["suite"]), field="suite") if params.get("suite") else None
        version = (_field_lookup(lambda: model_version_get(ref=params["model_version"]), field="model_version")
                   if params.get("model_version") else None)
        if params.get("state") is not None and params["state"] not in EvalRun.State.values:
            raise DomainError(f"state must be one of {', '.join(EvalRun.State.values)}", field="state")
        runs = selectors.eval_run_list(suite=suite, model_version_id=version.pk if version else None,
                                       state=params.get("state") or None)
        return self.paginated(request, runs, RunOutput)

    @extend_schema(operation_id="eval_runs_create", request=RunCreateInput, responses={201: RunDetailOutput})
    def post(self, request: Request) -> Response:
        data = RunCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        suite = _field_lookup(lambda: selectors.eval_suite_get(ref=values["suite"]), field="suite")
        version = _field_lookup(lambda: model_version_get(ref=values["model_version"]), field="model_version")
        with transaction.atomic():
            run = services.eval_run_create(
                suite=suite, model_version=version, scorers=values["scorers"], concurrency=values["concurrency"],
                max_tokens=values["max_tokens"], created_by=request.user,
            )
        return Response(RunDetailOutput(selectors.eval_run_get(run_id=run.pk)).data, status=status.HTTP_201_CREATED)


class RunDetailApi(ReadWriteApi):
    @extend_schema(operation_id="eval_runs_retrieve", responses=RunDetailOutput)
    def get(self, request: Request, run_id: int) -> Response:
        return Response(RunDetailOutput(selectors.eval_run_get(run_id=run_id)).data)


class RunCancelApi(ReadWriteApi):
    @extend_schema(operation_id="eval_runs_cancel", request=None, responses={202: RunDetailOutput})
    def post(self, request: Request, run_id: int) -> Response:
        run = services.eval_run_cancel(run=selectors.eval_run_get(run_id=run_id))
        return Response(RunDetailOutput(selectors.eval_run_get(run_id=run.pk)).data, status=status.HTTP_202_ACCEPTED)


class ResultOutput(serializers.Serializer):
    item_id = serializers.IntegerField()
    item_key = serializers.CharField(source="item.key")
    tags = serializers.ListField(source="item.tags", child=serializers.CharField())
    reference = serializers.CharField(source="item.reference", allow_null=True)
    output = serializers.CharField()
    scores = serializers.JSONField()
    error = serializers.CharField()
    latency_ms = serializers.FloatField(allow_null=True)
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    attempts = serializers.IntegerField()
    created_at = serializers.DateTimeField()


class RunResultsApi(PaginatedListApi, ReadWriteApi):
    @extend_schema(operation_id="eval_run_results_list",
                   parameters=[OpenApiParameter("failed", bool, description="Only items whose request failed.")],
                   responses=ResultOutput(many=True))
    def get(self, request: Request, run_id: int) -> Response:
        run = selectors.eval_run_get(run_id=run_id)
        results = selectors.eval_run_results(run=run, failed_only=query_flag(request, "failed"))
        return self.paginated(request, results, ResultOutput)


# --- comparisons ----------------------------------------------------------------------------------


class ComparisonQuery(serializers.Serializer):
    baseline = serializers.IntegerField(help_text="The baseline run's id.")
    candidate = serializers.IntegerField(help_text="The candidate run's id.")
    scorer = serializers.CharField(required=False, help_text="A scorer label both runs have (default: the first).")
    alpha = serializers.FloatField(required=False, default=0.05, min_value=0.001, max_value=0.5)


class ComparisonApi(ReadWriteApi):
    @extend_schema(
        operation_id="eval_comparisons_retrieve",
        description=(
            "The paired comparison of two runs of the same suite version: exact McNemar and an exact interval of "
            "the accuracy difference for pass/fail scorers, a seeded paired bootstrap (and Wilcoxon) for graded "
            "ones; overall and per tag. Differences are candidate - baseline."
        ),
        parameters=[ComparisonQuery],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: Request) -> Response:
        query = ComparisonQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        values = query.validated_data
        baseline = _field_lookup(lambda: selectors.eval_run_get(run_id=values["baseline"]), field="baseline")
        candidate = _field_lookup(lambda: selectors.eval_run_get(run_id=values["candidate"]), field="candidate")
        comparison = selectors.eval_runs_compare(baseline_run=baseline, candidate_run=candidate,
                                                 scorer=values.get("scorer"), alpha=values["alpha"])
        return Response(comparison)
