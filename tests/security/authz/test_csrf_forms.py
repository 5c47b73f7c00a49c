"""Every form of the web UI refuses a POST without its CSRF token, and the refused POST changes nothing.

The forms are found in the URLconf (every route outside /admin/ and /api/ whose view accepts POST), so a
new form that is not in FORMS fails the test. Each POST is one the view would carry out: the same request
with the token is the control that shows the refusal was the token's doing. Admin's session is the victim
(it may do everything); the login form's victim is a signed-out browser (login CSRF)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from django.core.files.uploadedfile import SimpleUploadedFile
from django.middleware.csrf import _get_new_csrf_string
from django.test import Client

from rollouts.models import Rollout
from rollouts.slack.models import SlackIdentity
from tests.security.authz.world import SUITE_JSONL, World, snapshot, url_routes

pytestmark = pytest.mark.django_db

ADMIN_PASSWORD = "platform-admin-password-1"  # tests/conftest.py's password for platform_admin
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_REFUSAL = b"the form's security token was missing or wrong"


@dataclass(frozen=True)
class Form:
    """How to fill a form in: its URL and fields, given the world and the admin's user."""

    fill: Callable[[World, Any], tuple[str, dict[str, Any]]]
    signed_in: bool = True


def _rollback_form(rollout: Rollout) -> tuple[str, dict[str, Any]]:
    """The rollout page's rollback form as the page renders it: the version the person saw travels with it."""
    return f"/rollouts/{rollout.pk}/rollback", {"reason": "forged", "expected_version": str(rollout.version)}


def _signed_in_user(client: Client) -> Any:
    return client.session.get("_auth_user_id")


FORMS: dict[str, Form] = {
    "/login/": Form(
        lambda world, admin: ("/login/", {"username": admin.username, "password": ADMIN_PASSWORD}),
        signed_in=False,
    ),
    "/logout/": Form(lambda world, admin: ("/logout/", {})),
    "/rollouts/new": Form(lambda world, admin: (
        "/rollouts/new", {"mode": "paste", "intent": "create", "plan": yaml.safe_dump(world.plan())})),
    "/rollouts/{rollout_id}/{action}": Form(lambda world, admin: _rollback_form(world.rollout(Rollout.State.RUNNING))),
    "/evals": Form(lambda world, admin: (
        "/evals", {"name": "forged", "file": SimpleUploadedFile("suite.jsonl", SUITE_JSONL.encode())})),
    "/evals/suites/{suite_id}/run": Form(lambda world, admin: (
        f"/evals/suites/{world.suite.pk}/run", {"model_version": str(world.candidate.pk), "scorer": "exact_match"})),
    "/evals/runs/{run_id}/cancel": Form(lambda world, admin: (f"/evals/runs/{world.run.pk}/cancel", {})),
    "/account/slack": Form(lambda world, admin: ("/account/slack", {
        "action": "unlink",
        "identity": str(SlackIdentity.objects.create(user=admin, team_id="T0RAMP01", slack_user_id="U0ADMIN").pk),
    })),
}  # fmt: skip

# Not found by the walk below (the admin site has hundreds of routes): the one that makes a superuser possible.
ADMIN_FORMS: dict[str, Form] = {
    "/admin/auth/user/add/": Form(lambda world, admin: ("/admin/auth/user/add/", {
        "username": "forged-admin", "password1": "Forged-password-9!", "password2": "Forged-password-9!",
        "usable_password": "true",
    })),
}  # fmt: skip

# csrf_exempt outside the API: only Slack's endpoints, which check Slack's signature instead
# (tests/security/authz/test_api_roles.py).
CSRF_EXEMPT = {"/slack/interactions", "/slack/commands"}


def _accepted_methods(view: Any) -> set[str]:
    """The methods a view serves: its class's handlers, or the list require_http_methods keeps in its closure.
    A view restricted by neither serves every method."""
    view_class = getattr(view, "view_class", None)
    if view_class is not None:
        return {m.upper() for m in view_class.http_method_names if hasattr(view_class, m)}
    while view is not None:
        for name, cell in zip(view.__code__.co_freevars, view.__closure__ or (), strict=True):
            if name == "request_method_list":
                return set(cell.cell_contents)
        view = getattr(view, "__wrapped__", None)
    return {"GET", "HEAD", *UNSAFE}


def _ui_routes() -> list[tuple[str, Any]]:
    return [(path, view) for path, view in url_routes()
            if not path.startswith(("/admin/", "/api/"))]  # fmt: skip


def test_forms_is_every_ui_view_that_accepts_a_write() -> None:
    writable = {path for path, view in _ui_routes() if _accepted_methods(view) & UNSAFE}
    exempt = {path for path, view in _ui_routes() if getattr(view, "csrf_exempt", False)}
    assert exempt == CSRF_EXEMPT, "a UI view that skips the CSRF check must verify its caller some other way"
    assert writable - exempt == set(FORMS), "a form missing from FORMS (or one that no longer takes a POST)"


def _client(form: Form, admin: Any, *, csrf_secret: str) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.cookies["csrftoken"] = csrf_secret  # as the browser holds it after any page
    if form.signed_in:
        client.force_login(admin)
    return client


CASES = {**FORMS, **ADMIN_FORMS}


def _post(client: Client, url: str, data: dict[str, Any]) -> Any:
    for value in data.values():
        if isinstance(value, SimpleUploadedFile):
            value.seek(0)  # the same upload, sent again
    return client.post(url, data)


@pytest.mark.parametrize("path", sorted(CASES))
def test_a_form_posted_without_its_token_is_refused_and_changes_nothing(path: str, platform_admin: Any) -> None:
    # The platform admin who also runs the Django admin site (it checks Django's own flags).
    platform_admin.user.is_staff = platform_admin.user.is_superuser = True
    platform_admin.user.save()
    form = CASES[path]
    secret = _get_new_csrf_string()
    url, data = form.fill(World(), platform_admin.user)

    forged = _client(form, platform_admin.user, csrf_secret=secret)
    before, signed_in = snapshot(), _signed_in_user(forged)
    response = _post(forged, url, data)
    assert response.status_code == 403, response.content[:300]
    assert CSRF_REFUSAL in response.content  # templates/403_csrf.html: the token's refusal, not a role's
    assert snapshot() == before and _signed_in_user(forged) == signed_in

    # A token from another browser is as good as none.
    wrong = _post(forged, url, {**data, "csrfmiddlewaretoken": _get_new_csrf_string()})
    assert wrong.status_code == 403 and CSRF_REFUSAL in wrong.content
    assert snapshot() == before and _signed_in_user(forged) == signed_in

    genuine = _client(form, platform_admin.user, csrf_secret=secret)
    allowed = _post(genuine, url, {**data, "csrfmiddlewaretoken": secret})
    assert allowed.status_code == 302, allowed.content[:500]
    assert (snapshot(), _signed_in_user(genuine)) != (before, signed_in), "the control changed nothing"
