"""One JSON shape for every API error: `{"detail": "...", "code": "...", "errors": {field: [reasons]}}`."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from config.errors import DomainError


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {key: _flatten(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [_flatten(item) for item in detail]
    return str(detail)


def _first_message(errors: Any, path: str = "") -> str:
    if isinstance(errors, dict):
        for key, value in errors.items():
            name = key if key != "non_field_errors" else ""
            return _first_message(value, f"{path}.{name}" if path and name else (name or path))
    if isinstance(errors, list) and errors:
        if isinstance(errors[0], dict | list):
            return _first_message(errors[0], f"{path}[0]")
        return f"{path}: {errors[0]}" if path else str(errors[0])
    return str(errors)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DomainError):
        body = exc.as_dict()
        if exc.status_code == status.HTTP_400_BAD_REQUEST and "errors" not in body:
            body["errors"] = {"non_field_errors": [exc.message]}
        return Response(body, status=exc.status_code)
    if isinstance(exc, DjangoValidationError):
        errors = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        exc = exceptions.ValidationError(errors)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        errors = _flatten(exc.detail)
        if not isinstance(errors, dict):
            errors = {"non_field_errors": errors if isinstance(errors, list) else [errors]}
        response.data = {"detail": _first_message(errors), "code": "invalid", "errors": errors}
        response.status_code = status.HTTP_400_BAD_REQUEST
    elif isinstance(exc, exceptions.APIException):
        response.data = {"detail": str(exc.detail), "code": exc.get_codes() if isinstance(exc.get_codes(), str) else "error"}
        if response.status_code == status.HTTP_400_BAD_REQUEST:
            # A body that does not parse names no field; it is still a 400, so it has `errors` like every other.
            response.data["errors"] = {"non_field_errors": [response.data["detail"]]}
    return response
