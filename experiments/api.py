"""REST API of experiments: outcome events reported by applications."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import CanManage
from config.errors import DomainError
from experiments.services import MAX_EVENTS_PER_BATCH, outcome_events_record
from serving.authentication import GatewayKeyAuthentication, IsGatewayKey
from serving.models import GatewayKey


class OutcomeEventInput(serializers.Serializer):
    """For the schema; items are checked one by one by the service, which reports each bad item by index."""

    id = serializers.CharField(required=False, max_length=64, help_text="Your id for the event: a retried batch is not counted twice.")
    request_id = serializers.CharField(required=False, help_text="X-Request-Id of the gateway's response.")
    session_id = serializers.CharField(required=False, help_text="The `user` field or X-Session-Id the request carried.")
    kind = serializers.ChoiceField(choices=["thumbs", "success", "value"])
    value = serializers.JSONField(help_text="thumbs: 'up' | 'down'; success: true | false; value: a number.")
    name = serializers.CharField(required=False, max_length=64)
    occurred_at = serializers.DateTimeField(required=False)


class OutcomeBatchInput(serializers.Serializer):
    events = OutcomeEventInput(many=True)


class OutcomeBatchOutput(serializers.Serializer):
    accepted = serializers.IntegerField()
    duplicates = serializers.IntegerField()
    resolved = serializers.IntegerField(help_text="Joined to a rollout arm at once; the rest join when their request record lands.")


class OutcomeEventsApi(APIView):
    """Report outcomes of served requests (thumbs, task success, a number) in batches.

    Applications call it with the gateway key they already hold; CI and people with a release manager's token."""

    authentication_classes = [GatewayKeyAuthentication, *APIView.authentication_classes]
    permission_classes = [IsGatewayKey | CanManage]

    @extend_schema(
        operation_id="outcome_events_create",
        request=OutcomeBatchInput,
        responses={
            202: OutcomeBatchOutput,
            400: OpenApiResponse(description="A bad item, named by index (events[3].value); nothing is written."),
        },
        examples=[
            OpenApiExample(
                "batch",
                request_only=True,
                value={"events": [
                    {"request_id": "5f0c1a2b3c4d5e6f7a8b9c0d", "kind": "thumbs", "value": "up"},
                    {"session_id": "user-42", "kind": "success", "value": True, "id": "evt-1"},
                ]},
            )
        ],
        description=f"Up to {MAX_EVENTS_PER_BATCH} events per call. With a gateway key limited to some aliases, an "
                    "event joins only a request served on one of them.",
    )
    def post(self, request: Request) -> Response:
        data = request.data
        if not isinstance(data, dict) or "events" not in data:
            raise DomainError('the body is {"events": [...]}', field="events")
        key = request.auth if isinstance(request.auth, GatewayKey) else None
        result = outcome_events_record(items=data["events"], allowed_aliases=list(key.aliases) if key else None)
        return Response(OutcomeBatchOutput(result).data, status=202)
