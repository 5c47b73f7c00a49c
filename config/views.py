from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith(("/api/", "/slack/", "/v1/")) or "application/json" in request.headers.get(
        "Accept", ""
    )


def not_found(request: HttpRequest, exception: Any = None) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse({"detail": f"No such resource: {request.path}", "code": "not_found"}, status=404)
    return render(request, "404.html", status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse({"detail": "Internal error; it has been logged.", "code": "server_error"}, status=500)
    return render(request, "500.html", status=500)
