"""REST API of rollouts for CI pipelines and the CLI: one view per resource action.

Serializers shape; `rollouts.services` decide and write (and check roles and the four-eyes rule again).
"""

from __future__ import annotations

from typing import Any

from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import CanManage, CanView, role_required
from config.errors import Conflict, DomainError
from config.idempotency import HEADER as IDEMPOTENCY_HEADER
from config.idempotency import idempotency_key_from, request_fingerprint
from config.pagination import PaginatedListApi
from config.query import query_flag
from rollouts import selectors
from rollouts.actors import Actor
from rollouts.approvals import approval_status
from rollouts.models import Rollout, RolloutAnalysis, RolloutEvent
from rollouts.planning import plan_sample_sizes
from rollouts.plans import PLAN_EXAMPLE, PLAN_JSON_SCHEMA, plan_from_stored
from rollouts.plans.alpha import alpha_split
from rollouts.services import (
    ACTION_ROLES,
    ActionKey,
    plan_validate,
    rollout_abort,
    rollout_action_answer_store,
    rollout_action_replay,
    rollout_advance,
    rollout_approval_request,
    rollout_approve,
    rollout_create,
    rollout_pause,
    rollout_promote,
    rollout_reject,
    rollout_resume,
    rollout_rollback,
    rollout_start,
)

ERROR = OpenApiResponse(description='{"detail", "code", "errors": {field: [reasons]}}')


class PlanYamlParser(BaseParser):
    """A plan posted as YAML text (`Content-Type: application/yaml`); the view parses it with the plan."""

    media_type = "application/yaml"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        # The text itself: rollouts.plans.plan_parse reads it, with the line of any YAML error.
        return stream.read().decode("utf-8", errors="replace")


class _TextYamlParser(PlanYamlParser):
    media_type = "text/yaml"


class _XYamlParser(PlanYamlParser):
    media_type = "application/x-yaml"


def _via(request: Request) -> str:
    # The CLI says who it is; anything else on the API is "api". (The UI and Slack call the services.)
    return "cli" if request.headers.get("User-Agent", "").startswith("rolloutctl/") else "api"


def _actor(request: Request) -> Actor:
    return Actor.of(request.user, via=_via(request))  # type: ignore[arg-type]  # permissions admit no anonymous


# --- serializers ----------------------------------------------------------------------------------


class RolloutStepOutput(serializers.Serializer):
    index = serializers.IntegerField()
    weight = serializers.FloatField()
    shadow_rate = serializers.FloatField()
    min_duration_s = serializers.IntegerField()
    min_candidate_requests = serializers.IntegerField()
    requires_approval = serializers.BooleanField()


class RolloutWeightsOutput(serializers.Serializer):
    baseline = serializers.FloatField()
    candidate = serializers.FloatField()
    shadow = serializers.FloatField()


class RolloutAnalysisOutput(serializers.Serializer):
    at = serializers.DateTimeField(source="created_at")
    step_index = serializers.IntegerField()
    state = serializers.CharField()
    decision = serializers.CharField()
    reason = serializers.CharField()
    applied = serializers.BooleanField()
    window_start = serializers.DateTimeField(allow_null=True)
    arms = serializers.DictField(help_text="Per arm: n, errors, error_rate, goodput, rps, latency means and tails, ...")
    checks = serializers.ListField(child=serializers.DictField(), help_text="Each check with its interval and decision.")
    srm = serializers.DictField(allow_null=True)


class RolloutHealthOutput(serializers.Serializer):
    status = serializers.ChoiceField(choices=["green", "amber", "red", "unknown"])
    driver = serializers.CharField(allow_null=True)
    checks = serializers.DictField(child=serializers.CharField())


class RolloutApprovalOutput(serializers.Serializer):
    step_index = serializers.IntegerField(help_text="The step an approval starts (step_count: the promotion).")
    what = serializers.CharField()
    approvals_required = serializers.IntegerField(help_text="The plan's approvals_required.")
    approved = serializers.ListField(child=serializers.DictField(), help_text="[{by, via, at}] in order.")
    remaining = serializers.IntegerField()
    eligible = serializers.ListField(child=serializers.CharField(), help_text="Approvers who could still approve.")
    excluded = serializers.DictField(child=serializers.CharField(), help_text="Who may not approve, and why (four-eyes).")
    request_seq = serializers.IntegerField()
    requested_at = serializers.DateTimeField()
    requested_by = serializers.CharField()
    expires_at = serializers.DateTimeField()
    expired = serializers.BooleanField(help_text="An expired request must be asked again (request_approval).")
    text = serializers.CharField(help_text='"1 of 2 approvals for step 3 of 4: alice; 1 more from role approver (bob)"')


class RolloutOutput(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    alias = serializers.CharField(source="alias_name")
    strategy = serializers.CharField()
    state = serializers.CharField()
    state_reason = serializers.CharField()
    baseline = serializers.CharField(source="baseline.label")
    candidate = serializers.CharField(source="candidate.label")
    step_index = serializers.IntegerField(help_text="The step whose weights are live; -1 before the first.")
    step_count = serializers.SerializerMethodField()
    step_started_at = serializers.DateTimeField(allow_null=True)
    pending_approval_step = serializers.SerializerMethodField(help_text="The step an approval would start.")
    approval = serializers.SerializerMethodField(help_text="The approval request it waits on: who approved, who is still needed.")
    weights = serializers.SerializerMethodField()
    version = serializers.IntegerField()
    start_when_ready = serializers.BooleanField()
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    ended_at = serializers.DateTimeField(allow_null=True)

    def get_step_count(self, rollout: Rollout) -> int:
        return len(rollout.steps)

    def get_pending_approval_step(self, rollout: Rollout) -> int | None:
        return selectors.rollout_pending_step(rollout=rollout)

    @extend_schema_field(RolloutApprovalOutput(allow_null=True))
    def get_approval(self, rollout: Rollout) -> dict[str, Any] | None:
        status = approval_status(rollout=rollout)
        return status.as_dict() if status is not None else None

    @extend_schema_field(RolloutWeightsOutput)
    def get_weights(self, rollout: Rollout) -> dict[str, float]:
        return selectors.rollout_weights(rollout=rollout)


class RolloutDetailOutput(RolloutOutput):
    plan = serializers.DictField()
    steps = serializers.SerializerMethodField()
    current_step = serializers.SerializerMethodField()
    latest_analysis = serializers.SerializerMethodField()
    health = serializers.SerializerMethodField()
    actions = serializers.SerializerMethodField(help_text="What the caller may do now.")
    alpha_split = serializers.SerializerMethodField(
        help_text="The plan's alpha, the rule that splits it (Bonferroni) and the checks that share it."
    )
    progress = serializers.SerializerMethodField(
        help_text="What holds the current step: each check not yet shown safe with about how many more candidate "
        "requests it needs, the step's candidate requests against its planned sample and the plan's on_inconclusive; "
        "while the promotion bakes, the holdout and when the bake ends."
    )
    analysis_staleness = serializers.SerializerMethodField(
        help_text="How long since the last analysis, the limit (three intervals) past which the watchdog pauses or "
        "rolls back, whether it paused this rollout, and whether a look is running now (the watchdog leaves a rollout "
        "under a running look alone); null when the rollout is not analysed (draft, ended)."
    )

    def _latest(self, rollout: Rollout) -> RolloutAnalysis | None:
        # Several method fields read the latest look: one query per rollout.
        cache: dict[int, RolloutAnalysis | None] = self.__dict__.setdefault("_latest_cache", {})
        if rollout.pk not in cache:
            cache[rollout.pk] = selectors.rollout_latest_analysis(rollout=rollout)
        return cache[rollout.pk]

    @extend_schema_field({"type": "object", "nullable": True, "properties": {
        "last_analysed_at": {"type": "string", "format": "date-time", "nullable": True}, "age_s": {"type": "number"},
        "limit_s": {"type": "number"}, "stale": {"type": "boolean"}, "paused_by_watchdog": {"type": "boolean"},
        "looking": {"type": "boolean"}}})
    def get_analysis_staleness(self, rollout: Rollout) -> dict[str, Any] | None:
        from rollouts.watchdog import rollout_staleness

        staleness = rollout_staleness(rollout=rollout)
        return staleness.as_dict() if staleness is not None else None

    @extend_schema_field({"type": "object", "properties": {
        "holding": {"type": "array", "items": {"type": "object"}}, "candidate_n": {"type": "integer", "nullable": True},
        "planned_n": {"type": "integer", "nullable": True}, "on_inconclusive": {"type": "string"},
        "bake": {"type": "object", "nullable": True}}})  # fmt: skip
    def get_progress(self, rollout: Rollout) -> dict[str, Any]:
        return selectors.rollout_progress(rollout=rollout, analysis=self._latest(rollout))

    @extend_schema_field(RolloutStepOutput(many=True))
    def get_steps(self, rollout: Rollout) -> list[dict[str, Any]]:
        return [{"index": i, **step} for i, step in enumerate(rollout.steps)]

    @extend_schema_field({"type": "object", "nullable": True, "description": "None before the first step and after the last."})
    def get_current_step(self, rollout: Rollout) -> dict[str, Any] | None:
        step = rollout.current_step
        if step is None:
            return None
        return {"index": rollout.step_index, **step, "time_in_step_s": selectors.rollout_time_in_step_s(rollout=rollout)}

    @extend_schema_field(RolloutAnalysisOutput(allow_null=True))
    def get_latest_analysis(self, rollout: Rollout) -> dict[str, Any] | None:
        latest = self._latest(rollout)
        return dict(RolloutAnalysisOutput(latest).data) if latest is not None else None

    @extend_schema_field(RolloutHealthOutput)
    def get_health(self, rollout: Rollout) -> dict[str, Any]:
        return selectors.rollout_health(analysis=self._latest(rollout))

    @extend_schema_field({"type": "object", "properties": {
        "alpha": {"type": "number"}, "rule": {"type": "string"}, "checks": {"type": "array", "items": {"type": "string"}},
        "share": {"type": "number"}, "text": {"type": "string"},
    }})  # fmt: skip
    def get_alpha_split(self, rollout: Rollout) -> dict[str, Any]:
        return alpha_split(plan_from_stored(rollout.plan)).as_dict()

    def get_actions(self, rollout: Rollout) -> list[str]:
        request = self.context.get("request")
        return selectors.rollout_actions(rollout=rollout, user=request.user) if request is not None else []


class RolloutEventOutput(serializers.Serializer):
    seq = serializers.IntegerField()
    kind = serializers.CharField()
    from_state = serializers.CharField()
    to_state = serializers.CharField()
    step_index = serializers.IntegerField()
    actor = serializers.CharField()
    via = serializers.CharField()
    actor_detail = serializers.CharField()
    reason = serializers.CharField()
    evidence = serializers.DictField()
    created_at = serializers.DateTimeField()


class RolloutActionInput(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=2000, default="")
    expected_version = serializers.IntegerField(
        min_value=1,
        error_messages={
            "required": "required: the rollout's `version` as you last read it (GET /api/v1/rollouts/{{id}}); an "
            "action on a rollout that changed since is refused with 409 saying what changed",
            "null": "required: the rollout's `version` as you last read it (GET /api/v1/rollouts/{{id}})",
        },
        help_text="The rollout's `version` as the caller last saw it (required): if anything (the analysis, another "
        "person) changed the rollout since, the action is refused with 409 saying what changed, instead of acting "
        "on a state nobody looked at. A retry with the same Idempotency-Key gets the first answer whatever it sends.",
    )  # fmt: skip


class RolloutApproveInput(RolloutActionInput):
    step_index = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0,
        help_text="The step being approved or rejected (as shown to the approver); a stale click gets 409.",
    )  # fmt: skip


class RolloutValidationOutput(serializers.Serializer):
    plan = serializers.DictField(help_text="The normalised plan, every default written out.")
    estimates = serializers.DictField(help_text="Requests each step needs (sample-size estimates per check).")


# --- views ----------------------------------------------------------------------------------------


def _detail(request: Request, rollout: Rollout, *, code: int = status.HTTP_200_OK, headers: dict[str, str] | None = None) -> Response:
    rollout = selectors.rollout_get(rollout_id=rollout.pk)
    return Response(RolloutDetailOutput(rollout, context={"request": request}).data, status=code, headers=headers)


_PLAN_BODY = {
    "application/json": PLAN_JSON_SCHEMA,
    "application/yaml": {"type": "string", "description": "The same plan as YAML."},
}


class RolloutListCreateApi(PaginatedListApi):
    parser_classes = [JSONParser, PlanYamlParser, _TextYamlParser, _XYamlParser]

    def get_permissions(self) -> list[BasePermission]:
        return [CanManage()] if self.request.method == "POST" else [CanView()]

    @extend_schema(
        operation_id="rollouts_list",
        parameters=[
            OpenApiParameter("state", str, description="A state, or several separated by commas."),
            OpenApiParameter("alias", str),
            OpenApiParameter("live", bool, description="true: only live rollouts; false: only finished ones."),
        ],
        responses={200: RolloutOutput(many=True)},
    )
    def get(self, request: Request) -> Response:
        live_raw = request.query_params.get("live")
        live = None if live_raw is None else query_flag(request, "live")
        rollouts = selectors.rollout_list(
            state=request.query_params.get("state"), alias=request.query_params.get("alias"), live=live
        )
        return self.paginated(request, rollouts, RolloutOutput)

    @extend_schema(
        operation_id="rollouts_create",
        request=_PLAN_BODY,
        parameters=[
            OpenApiParameter("start", bool, description="Start at once (both versions need a ready engine)."),
            OpenApiParameter("start_when_ready", bool, description="Stay in draft until both versions are ready, then "
                             "start; a version with no engine asked to run gets one."),
            OpenApiParameter(
                IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER,
                description="A retried request with the same key and body returns the first rollout.",
            ),
        ],
        responses={
            201: RolloutDetailOutput,
            200: OpenApiResponse(RolloutDetailOutput, description="Replayed: the rollout this Idempotency-Key created."),
            400: ERROR,
            403: ERROR,
            409: OpenApiResponse(description="The alias already has a live rollout."),
            422: OpenApiResponse(description="The Idempotency-Key was used for a different request."),
        },
        examples=[OpenApiExample("canary", value=PLAN_EXAMPLE, request_only=True)],
    )
    def post(self, request: Request) -> Response:
        key = idempotency_key_from(request)
        plan: Any = request.data
        if not isinstance(plan, dict | str):
            raise DomainError("the body must be a plan: a JSON object or YAML text", field="plan")
        created = rollout_create(
            plan=plan,
            content_type=request.content_type or "",
            actor=_actor(request),
            start=query_flag(request, "start"),
            start_when_ready=query_flag(request, "start_when_ready"),
            idempotency_key=key,
        )
        headers = {"Location": f"/api/v1/rollouts/{created.rollout.pk}"}
        if created.replayed:
            headers["Idempotent-Replayed"] = "true"
            return _detail(request, created.rollout, headers=headers)
        return _detail(request, created.rollout, code=status.HTTP_201_CREATED, headers=headers)


class RolloutValidateApi(APIView):
    """Check a plan without creating anything: the normalised plan and the sample-size estimate per step."""

    permission_classes = [CanManage]
    parser_classes = [JSONParser, PlanYamlParser, _TextYamlParser, _XYamlParser]

    @extend_schema(operation_id="rollouts_validate", request=_PLAN_BODY, responses={200: RolloutValidationOutput, 400: ERROR, 409: ERROR})
    def post(self, request: Request) -> Response:
        plan: Any = request.data
        if not isinstance(plan, dict | str):
            raise DomainError("the body must be a plan: a JSON object or YAML text", field="plan")
        validated = plan_validate(data=plan, content_type=request.content_type or "")
        estimates = plan_sample_sizes(plan=validated.plan, baseline=validated.baseline)
        return Response({"plan": validated.plan.to_dict(), "estimates": estimates})


class RolloutDetailApi(APIView):
    permission_classes = [CanView]

    @extend_schema(operation_id="rollouts_retrieve", responses={200: RolloutDetailOutput, 404: ERROR})
    def get(self, request: Request, rollout_id: int) -> Response:
        return _detail(request, selectors.rollout_get(rollout_id=rollout_id))


class RolloutEventsApi(APIView):
    permission_classes = [CanView]

    @extend_schema(
        operation_id="rollouts_events",
        parameters=[OpenApiParameter("after", int, description="Only events with a larger seq (for polling).")],
        responses={200: RolloutEventOutput(many=True), 404: ERROR},
    )
    def get(self, request: Request, rollout_id: int) -> Response:
        rollout = selectors.rollout_get(rollout_id=rollout_id)
        after = request.query_params.get("after")
        if after is not None and not after.isdigit():
            raise DomainError("after must be a whole number", field="after")
        events: list[RolloutEvent] = list(
            selectors.rollout_events(rollout=rollout, after_seq=int(after) if after is not None else None)
        )
        return Response(RolloutEventOutput(events, many=True).data)


class RolloutSeriesApi(APIView):
    permission_classes = [CanView]

    @extend_schema(
        operation_id="rollouts_series",
        parameters=[
            OpenApiParameter("since", OpenApiTypes.DATETIME, description="Only looks after this time."),
            OpenApiParameter("limit", int, description="At most this many of the latest looks (default 500, max 5000)."),
        ],
        responses={200: RolloutAnalysisOutput(many=True), 404: ERROR},
    )
    def get(self, request: Request, rollout_id: int) -> Response:
        rollout = selectors.rollout_get(rollout_id=rollout_id)
        since_raw = request.query_params.get("since")
        since = parse_datetime(since_raw) if since_raw else None
        if since_raw and (since is None or since.tzinfo is None):
            raise DomainError("since must be an ISO 8601 date and time with a time zone", field="since")
        limit_raw = request.query_params.get("limit", "500")
        if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= 5000:
            raise DomainError("limit must be a whole number from 1 to 5000", field="limit")
        looks = selectors.rollout_series(rollout=rollout, since=since, limit=int(limit_raw))
        return Response(RolloutAnalysisOutput(looks, many=True).data)


def _action_view(action: str, service: Any, input_serializer: type[serializers.Serializer], doc: str) -> type[APIView]:
    class RolloutActionApi(APIView):
        permission_classes = [role_required(*ACTION_ROLES[action])]
        parser_classes = [JSONParser]

        @extend_schema(
            operation_id=f"rollouts_{action}",
            summary=doc,
            request=input_serializer,
            parameters=[
                OpenApiParameter(
                    IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER,
                    description="A retry with the same key (and the same action, rollout, reason and step) gets the "
                    "first answer back (200, `Idempotent-Replayed: true`) and does nothing again; another request "
                    "with the key is a 422. Keys are kept 24 h.",
                ),
            ],
            responses={
                200: RolloutDetailOutput, 400: ERROR, 403: ERROR, 404: ERROR,
                409: OpenApiResponse(description="Stale: the rollout changed since `expected_version`; says what changed."),
                422: OpenApiResponse(description="The Idempotency-Key was used for a different request."),
            },
        )
        def post(self, request: Request, rollout_id: int) -> Response:
            if not isinstance(request.data, dict):  # no body parses to {}; a JSON string or list is a mistake
                raise DomainError("the body must be a JSON object, or empty")
            body = input_serializer(data=request.data)
            body.is_valid(raise_exception=True)
            kwargs = dict(body.validated_data)
            if kwargs.get("step_index") is None:
                kwargs.pop("step_index", None)
            key = idempotency_key_from(request)
            # What the key stands for: the action asked, not the version read (a retry reads a newer one).
            fingerprint = request_fingerprint({
                "action": action, "rollout": rollout_id, "reason": kwargs.get("reason", ""),
                "step_index": kwargs.get("step_index"),
            })  # fmt: skip
            if key is not None:
                replayed = self._replay(request, rollout_id, key, fingerprint)
                if replayed is not None:
                    return replayed
            rollout = selectors.rollout_get(rollout_id=rollout_id)
            try:
                after = service(
                    rollout=rollout, actor=_actor(request),
                    idempotency=ActionKey(key, fingerprint) if key is not None else None, **kwargs,
                )  # fmt: skip
            except Conflict:
                # Two tries with one key at once: the one that won has the answer.
                replayed = self._replay(request, rollout_id, key, fingerprint) if key is not None else None
                if replayed is not None:
                    return replayed
                raise
            response = _detail(request, after)
            if key is not None:
                rollout_action_answer_store(user=request.user, key=key, answer=dict(response.data))
            return response

        @staticmethod
        def _replay(request: Request, rollout_id: int, key: str, fingerprint: str) -> Response | None:
            done = rollout_action_replay(user=request.user, key=key, fingerprint=fingerprint)
            if done is None:
                return None
            headers = {"Idempotent-Replayed": "true"}
            if done.answer is not None:
                return Response(done.answer, headers=headers)
            # Done, but its answer was never stored (the process stopped in between): the rollout as it is now.
            return _detail(request, selectors.rollout_get(rollout_id=int(done.rollout_id)), headers=headers)

    RolloutActionApi.__name__ = f"Rollout{action.title().replace('_', '')}Api"
    RolloutActionApi.__qualname__ = RolloutActionApi.__name__
    RolloutActionApi.__doc__ = doc
    return RolloutActionApi


RolloutStartApi = _action_view("start", rollout_start, RolloutActionInput, "Start a draft (gating or the first step).")
RolloutPauseApi = _action_view("pause", rollout_pause, RolloutActionInput, "Freeze at the current weights.")
RolloutResumeApi = _action_view("resume", rollout_resume, RolloutActionInput, "Carry on from where it was paused.")
RolloutApproveApi = _action_view(
    "approve", rollout_approve, RolloutApproveInput,
    "Approve the request the rollout waits for; it goes ahead once the plan's approvals_required approvers "
    "approved (four-eyes: not the rollout's creator nor who asked, unless the plan allows it).",
)  # fmt: skip
RolloutRejectApi = _action_view(
    "reject", rollout_reject, RolloutApproveInput, "Refuse the approval: the wait ends and the rollout rolls back."
)
RolloutRequestApprovalApi = _action_view(
    "request_approval", rollout_approval_request, RolloutActionInput,
    "Ask again for an approval whose request expired: a new request, a new notification.",
)  # fmt: skip
RolloutAdvanceApi = _action_view("advance", rollout_advance, RolloutActionInput, "Finish the current step now.")
RolloutRollbackApi = _action_view("rollback", rollout_rollback, RolloutActionInput, "Send every user back to the baseline.")
RolloutAbortApi = _action_view("abort", rollout_abort, RolloutActionInput, "Stop without a verdict.")
RolloutPromoteApi = _action_view("promote", rollout_promote, RolloutActionInput, "Make the candidate the alias's baseline now.")

ACTION_VIEWS: dict[str, type[APIView]] = {
    "start": RolloutStartApi,
    "pause": RolloutPauseApi,
    "resume": RolloutResumeApi,
    "approve": RolloutApproveApi,
    "reject": RolloutRejectApi,
    "request-approval": RolloutRequestApprovalApi,
    "advance": RolloutAdvanceApi,
    "rollback": RolloutRollbackApi,
    "abort": RolloutAbortApi,
    "promote": RolloutPromoteApi,
}
