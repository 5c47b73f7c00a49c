from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from accounts.roles import Role
from accounts.selectors import user_has_role


def role_required(*roles: Role) -> type[BasePermission]:
    """A DRF permission that admits a user holding any of `roles`."""

    class HasRole(BasePermission):
        message = f"This action needs the role {' or '.join(r.value for r in roles)}."

        def has_permission(self, request: Request, view: Any) -> bool:
            return any(user_has_role(user=request.user, role=role) for role in roles)

    HasRole.__name__ = "HasRole_" + "_or_".join(r.value for r in roles)
    return HasRole


CanView = role_required(Role.VIEWER, Role.RELEASE_MANAGER, Role.APPROVER, Role.ADMIN)
CanManage = role_required(Role.RELEASE_MANAGER, Role.ADMIN)
CanApprove = role_required(Role.APPROVER, Role.ADMIN)
IsAdmin = role_required(Role.ADMIN)
