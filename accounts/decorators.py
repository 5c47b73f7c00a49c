"""Role checks for HTML views (the API has accounts.permissions for DRF)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from accounts.roles import ALL_ROLES, Role
from accounts.selectors import user_roles

View = Callable[..., HttpResponseBase]


def page_role_required(*roles: Role) -> Callable[[View], View]:
    """Anonymous visitors go to the login page; a signed-in user without any of `roles` gets 403."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not user_roles(user=request.user) & set(roles):
                raise PermissionDenied(f"this page needs the role {' or '.join(r.value for r in roles)}")
            return view(request, *args, **kwargs)

        return wrapped

    return decorate


# Every role may look; what a role may change is checked by the services (and the pages hide the rest).
viewer_required = page_role_required(*ALL_ROLES)
manager_required = page_role_required(Role.RELEASE_MANAGER, Role.ADMIN)
