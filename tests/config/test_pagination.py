"""PaginatedListApi pages with its view's own pagination class."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory

from config.pagination import ApiPagination, PaginatedListApi


class _Item(serializers.Serializer):
    n = serializers.IntegerField()


class _TwoAtATime(ApiPagination):
    default_limit = 2


class _ItemsApi(PaginatedListApi):
    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    pagination_class = _TwoAtATime

    def get(self, request: Request) -> Response:
        return self.paginated(request, [{"n": n} for n in range(5)], _Item)


def test_a_view_pages_with_its_own_pagination_class() -> None:
    response = _ItemsApi.as_view()(APIRequestFactory().get("/items/"))
    assert response.data["count"] == 5
    assert [item["n"] for item in response.data["results"]] == [0, 1]
    assert "offset=2" in response.data["next"]


def test_the_limit_bounds_still_apply_to_a_subclass() -> None:
    response = _ItemsApi.as_view()(APIRequestFactory().get("/items/", {"limit": "0"}))
    assert response.status_code == 400
    assert "limit must be a whole number from 1" in str(response.data)
