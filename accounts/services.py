from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Group
from django.db import transaction
from django.utils import timezone

from accounts.models import ApiToken
from accounts.roles import ALL_ROLES, Role
from accounts.selectors import token_digest

TOKEN_PREFIX = "rmp_"


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    raw: str


def roles_ensure() -> None:
    for role in ALL_ROLES:
        Group.objects.get_or_create(name=role.value)


@transaction.atomic
def role_grant(*, user: AbstractUser, role: Role) -> None:
    group, _ = Group.objects.get_or_create(name=role.value)
    user.groups.add(group)
    user.__dict__.pop("_platform_roles", None)


@transaction.atomic
def api_token_create(*, user: Any, name: str = "") -> IssuedToken:
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name[:100], token_hash=token_digest(raw), prefix=raw[:12])
    return IssuedToken(token=token, raw=raw)


def api_token_touch(*, token: ApiToken) -> None:
    # Once a minute is enough to say "last used"; a write per request would serialise SQLite.
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)


@transaction.atomic
def user_create(*, username: str, password: str | None, roles: list[Role], email: str = "") -> AbstractUser:
    user_model = get_user_model()
    user = user_model.objects.create_user(username=username, email=email, password=password)
    for role in roles:
        role_grant(user=user, role=role)
    return user


@transaction.atomic
def admin_ensure(*, username: str, password: str) -> tuple[AbstractUser, bool]:
    """Create the admin user, or reset its password to the configured one. Returns (user, created)."""
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(username=username, defaults={"is_staff": True})
    user.is_staff = True
    user.is_superuser = True
    user.set_password(password)
    user.save()
    roles_ensure()
    return user, created
