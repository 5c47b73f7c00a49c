"""Tells drf-spectacular how the API authenticates, so /api/schema/ documents the bearer token."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from `python manage.py create_api_token USERNAME`.",
        }


class GatewayKeyScheme(OpenApiAuthenticationExtension):
    target_class = "serving.authentication.GatewayKeyAuthentication"
    name = "gatewayKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "An application's gateway key."}
