from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import Member


@pytest.mark.django_db
def test_login_lands_on_the_dashboard(owner: Member) -> None:
    client = Client()
    response = client.post("/login/", {"username": "owner", "password": "owner-password-1"}, follow=True)
    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == "/"
    assert b"Rollouts" in response.content


@pytest.mark.django_db
def test_login_is_throttled_after_repeated_failures(owner: Member) -> None:
    client = Client()
    for _ in range(10):
        assert client.post("/login/", {"username": "owner", "password": "wrong"}).status_code == 200
    blocked = client.post("/login/", {"username": "owner", "password": "owner-password-1"})
    assert blocked.status_code == 429
    assert b"Too many failed attempts" in blocked.content


@pytest.mark.django_db
def test_the_admin_site_logs_in(platform_admin: Member) -> None:
    platform_admin.user.is_staff = True
    platform_admin.user.save()
    client = Client()
    assert client.login(username="platform-admin", password="platform-admin-password-1")
    assert client.get("/admin/").status_code == 200
