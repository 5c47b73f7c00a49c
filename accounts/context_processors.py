from __future__ import annotations

from django.http import HttpRequest

from accounts.roles import Role
from accounts.selectors import user_roles


def roles(request: HttpRequest) -> dict[str, object]:
    held = user_roles(user=request.user)
    return {
        "user_roles": held,
        "can_manage": Role.RELEASE_MANAGER in held or Role.ADMIN in held,
        "can_approve": Role.APPROVER in held or Role.ADMIN in held,
        "is_platform_admin": Role.ADMIN in held,
    }
