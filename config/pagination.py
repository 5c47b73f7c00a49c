"""The API's list pagination: `?limit=&offset=`, checked.

DRF's LimitOffsetPagination reads a bad value (`limit=abc`, `offset=-1`) as "not given" and has no upper
bound on `limit`; a CI script with a typo then silently gets the first page, and `limit=100000000` reads a
whole table. Here a bad value is a 400 naming the parameter, `limit` is capped, and the schema says so.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.errors import DomainError

MAX_LIMIT = 1000
# Past this an offset is no page anyone reads; the databases' 64-bit OFFSET would overflow much later.
MAX_OFFSET = 10**9


def _whole(name: str, raw: str, *, minimum: int, maximum: int) -> int:
    if not raw.isdigit() or not minimum <= int(raw) <= maximum:
        raise DomainError(f"{name} must be a whole number from {minimum} to {maximum}", field=name)
    return int(raw)


class ApiPagination(LimitOffsetPagination):
    max_limit = MAX_LIMIT

    def get_limit(self, request: Request) -> int | None:
        raw = request.query_params.get(self.limit_query_param)
        if raw is None:
            return self.default_limit
        return _whole(self.limit_query_param, raw, minimum=1, maximum=MAX_LIMIT)

    def get_offset(self, request: Request) -> int:
        raw = request.query_params.get(self.offset_query_param)
        if raw is None:
            return 0
        return _whole(self.offset_query_param, raw, minimum=0, maximum=MAX_OFFSET)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        bounds = {self.limit_query_param: (1, MAX_LIMIT), self.offset_query_param: (0, MAX_OFFSET)}
        for parameter in parameters:
            low, high = bounds[parameter["name"]]
            parameter["schema"] = {**parameter["schema"], "minimum": low, "maximum": high}
        return parameters


class PaginatedListApi(APIView):
    """A view whose GET is a list: it answers {count, next, previous, results}. drf-spectacular documents that
    envelope from `pagination_class` (a plain APIView has none)."""

    pagination_class = ApiPagination

    def paginated(self, request: Request, queryset: Any, serializer: type[serializers.Serializer]) -> Response:
        paginator = self.pagination_class()
        page: Any = paginator.paginate_queryset(queryset, request, view=self)
        return paginator.get_paginated_response(serializer(page, many=True).data)
