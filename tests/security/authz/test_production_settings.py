"""What production's settings do to real responses: secure cookies, HSTS and the other security headers, and
error pages that give nothing away. "Production" is derived by config/settings.py from the environment
(DATABASE_URL on PostgreSQL, DEBUG unset), so each check runs in a child process with that environment."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import REPO_ROOT

HOST = "ramp.example"
SECRET_KEY = "prod-secret-key-that-must-never-be-shown-" + "x" * 20
DB_PASSWORD = "db-password-that-must-never-be-shown"
# Nothing listens on port 1: every query fails, as when production's database is down.
DATABASE_URL = f"postgres://ramp:{DB_PASSWORD}@127.0.0.1:1/ramp_prod"


RESPONSES = """
def seen(response):
    return {"status": response.status_code, "headers": dict(response.headers),
            "cookies": {name: {flag: morsel[flag] for flag in ("secure", "httponly", "samesite")}
                        for name, morsel in response.cookies.items()},
            "body": response.content.decode(errors="replace")}
"""


def _production(tmp_path: Path, script: str, *, settings_module: str = "config.settings") -> dict[str, Any]:
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PLATFORM_VAR_DIR": str(tmp_path / "var"),
        "DATABASE_URL": DATABASE_URL, "SECRET_KEY": SECRET_KEY, "ALLOWED_HOSTS": HOST,
        "DJANGO_SETTINGS_MODULE": settings_module, "PYTHONPATH": f"{tmp_path}:{REPO_ROOT}",
    }  # fmt: skip
    prelude = "import json, django\ndjango.setup()\nfrom django.conf import settings\nfrom django.test import Client\n"
    result = subprocess.run([sys.executable, "-c", prelude + RESPONSES + textwrap.dedent(script)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The settings, the deployment checks, and responses of a production process whose database is down."""
    return _production(tmp_path_factory.mktemp("production"), f"""
        from django.core.checks import run_checks
        client = Client(raise_request_exception=False, HTTP_HOST={HOST!r})
        print(json.dumps({{
            "settings": {{name: getattr(settings, name) for name in (
                "DEBUG", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SESSION_COOKIE_HTTPONLY",
                "SECURE_HSTS_SECONDS", "SECURE_PROXY_SSL_HEADER")}},
            "deploy_checks": sorted(message.id for message in run_checks(include_deployment_checks=True)),
            "login_page": seen(client.get("/login/", secure=True)),
            "behind_the_proxy": seen(client.get("/login/", HTTP_X_FORWARDED_PROTO="https")),
            "page_error": seen(client.post("/login/", {{"username": "admin", "password": "x"}}, secure=True)),
            "api_error": seen(client.get("/api/v1/rollouts", secure=True, HTTP_AUTHORIZATION="Bearer rmp_x")),
            "not_found": seen(client.get("/no/such/page", secure=True)),
        }}))
    """)


def test_production_settings_are_the_secure_ones(production: dict[str, Any]) -> None:
    assert production["settings"] == {
        "DEBUG": False, "SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True, "SESSION_COOKIE_HTTPONLY": True,
        "SECURE_HSTS_SECONDS": 3600, "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
    }  # fmt: skip


def test_manage_py_check_deploy_finds_no_cookie_header_or_secret_problem(production: dict[str, Any]) -> None:
    # W004 HSTS, W006 nosniff, W009 SECRET_KEY, W012/W016 secure cookies, W018 DEBUG, W019 X-Frame-Options,
    # W020 ALLOWED_HOSTS, W022 Referrer-Policy.
    problems = {"security.W004", "security.W006", "security.W009", "security.W012", "security.W016",
                "security.W018", "security.W019", "security.W020", "security.W022"}  # fmt: skip
    assert not problems & set(production["deploy_checks"]), production["deploy_checks"]


@pytest.mark.parametrize("response", ["login_page", "behind_the_proxy"])
def test_a_page_carries_the_security_headers_and_a_secure_csrf_cookie(production: dict[str, Any], response: str) -> None:
    page = production[response]
    assert page["status"] == 200, page["body"][:500]
    headers = page["headers"]
    assert headers["Strict-Transport-Security"] == "max-age=3600"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"
    assert page["cookies"]["csrftoken"] == {"secure": True, "httponly": "", "samesite": "Lax"}


@pytest.mark.parametrize("response", ["page_error", "api_error", "not_found"])
def test_an_error_shows_no_traceback_settings_or_secret(production: dict[str, Any], response: str) -> None:
    error = production[response]
    assert error["status"] == (404 if response == "not_found" else 500)
    body = error["body"]
    for leak in ("Traceback", "OperationalError", "psycopg", "DATABASES", "SECRET_KEY", "settings.py",
                 "config.urls", "DEBUG = True", SECRET_KEY, DB_PASSWORD, "127.0.0.1:1"):  # fmt: skip
        assert leak not in body, f"{response} shows {leak!r}"
    assert error["headers"]["X-Frame-Options"] == "DENY"


def test_signing_in_sets_a_secure_http_only_session_cookie(tmp_path: Path) -> None:
    # The same production settings on a database that answers (an empty SQLite file), to sign in for real.
    (tmp_path / "production_with_a_database.py").write_text(
        "from config.settings import *  # noqa: F403\n"
        f"DATABASES = {{'default': {{'ENGINE': 'django.db.backends.sqlite3', 'NAME': {str(tmp_path / 'db.sqlite3')!r}}}}}\n"
    )
    signed_in = _production(tmp_path, f"""
        from django.core.management import call_command
        from accounts.services import user_create
        for app in ("auth", "sessions"):
            call_command("migrate", app, verbosity=0)
        call_command("createcachetable", verbosity=0)
        user_create(username="someone", password="someone-password-1", roles=[])
        client = Client(HTTP_HOST={HOST!r})
        print(json.dumps(seen(client.post("/login/", {{"username": "someone", "password": "someone-password-1"}},
                                          secure=True))))
    """, settings_module="production_with_a_database")
    assert signed_in["status"] == 302, signed_in["body"][:500]
    assert signed_in["cookies"]["sessionid"] == {"secure": True, "httponly": True, "samesite": "Lax"}
    assert signed_in["cookies"]["csrftoken"]["secure"] is True
    assert signed_in["headers"]["Strict-Transport-Security"] == "max-age=3600"
