from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.selectors import user_roles


class MeOutput(serializers.Serializer):
    username = serializers.CharField()
    roles = serializers.ListField(child=serializers.CharField())


class MeApi(APIView):
    """Who the token belongs to and which roles it carries (CI pipelines check this first)."""

    @extend_schema(responses=MeOutput)
    def get(self, request: Request) -> Response:
        roles = sorted(role.value for role in user_roles(user=request.user))
        return Response(MeOutput({"username": request.user.get_username(), "roles": roles}).data)
