from __future__ import annotations

import hashlib
from typing import Any

from accounts.models import ApiToken
from accounts.roles import ALL_ROLES, Role


def token_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def user_roles(*, user: Any) -> frozenset[Role]:
    if not user.is_authenticated or not user.is_active:
        return frozenset()
    if user.is_superuser:
        return frozenset(ALL_ROLES)
    cached = getattr(user, "_platform_roles", None)
    if cached is None:
        names = set(user.groups.values_list("name", flat=True))
        cached = frozenset(role for role in ALL_ROLES if role.value in names)
        if Role.ADMIN in cached:
            cached = frozenset(ALL_ROLES)
        user._platform_roles = cached
    return cached


def user_has_role(*, user: Any, role: Role) -> bool:
    return role in user_roles(user=user)


def api_token_lookup(*, raw: str) -> ApiToken | None:
    return (
        ApiToken.objects.select_related("user")
        .filter(token_hash=token_digest(raw), revoked_at__isnull=True, user__is_active=True)
        .first()
    )


def usernames_with_role(*, role: Role) -> list[str]:
    """Active users who hold `role` (through its group, the admin group, or as superusers), by name."""
    from django.contrib.auth import get_user_model
    from django.db.models import Q

    users = get_user_model().objects.filter(is_active=True).filter(
        Q(groups__name=role.value) | Q(groups__name=Role.ADMIN.value) | Q(is_superuser=True)
    )
    return sorted(set(users.values_list("username", flat=True)))
