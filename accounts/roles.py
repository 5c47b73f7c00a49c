"""The four roles. A role is a Django group of the same name; superusers hold every role."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    RELEASE_MANAGER = "release_manager"
    APPROVER = "approver"
    ADMIN = "admin"


ALL_ROLES: tuple[Role, ...] = tuple(Role)
