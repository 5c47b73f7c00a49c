from __future__ import annotations

from typing import Any

from django.contrib.auth import views as auth_views
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse

LOGIN_FAILURES_ALLOWED = 10
LOGIN_WINDOW_S = 300


def _client_ip(request: HttpRequest) -> str:
    return request.META.get("REMOTE_ADDR", "unknown")


class ThrottledLoginView(auth_views.LoginView):
    """The login page, refusing an address after too many failed attempts in a window."""

    template_name = "accounts/login.html"
    redirect_authenticated_user = True

    def _key(self) -> str:
        return f"login-failures:{_client_ip(self.request)}"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if (cache.get(self._key()) or 0) >= LOGIN_FAILURES_ALLOWED:
            response = self.render_to_response(
                self.get_context_data(throttled=True, form=self.get_form()), status=429
            )
            response["Retry-After"] = str(LOGIN_WINDOW_S)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form: Any) -> HttpResponse:
        key = self._key()
        if cache.add(key, 1, LOGIN_WINDOW_S) is False:
            try:
                cache.incr(key)
            except ValueError:
                cache.set(key, 1, LOGIN_WINDOW_S)
        return super().form_invalid(form)
