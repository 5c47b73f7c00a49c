"""Applications present their gateway key to the few REST endpoints meant for them (outcome events)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser
from rest_framework import authentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from serving.models import GatewayKey
from serving.services import gateway_key_digest


class GatewayKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <gateway key>`: no user, the key itself is the credential.

    Anything that is not a live gateway key is left to the next authentication class (API tokens)."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        header = authentication.get_authorization_header(request).split()
        if len(header) != 2 or header[0].lower() != b"bearer":
            return None
        try:
            raw = header[1].decode()
        except UnicodeDecodeError:
            return None
        key = GatewayKey.objects.filter(key_hash=gateway_key_digest(raw), revoked_at__isnull=True).first()
        if key is None:
            return None
        return AnonymousUser(), key

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


class IsGatewayKey(BasePermission):
    message = "This endpoint takes a gateway key or a release manager's API token."

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, GatewayKey)
