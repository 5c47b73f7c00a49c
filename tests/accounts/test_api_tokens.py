from __future__ import annotations

import pytest
from django.core.management import call_command
from django.utils import timezone

from accounts.models import ApiToken
from accounts.selectors import token_digest
from tests.conftest import Member


@pytest.mark.django_db
def test_create_api_token_prints_a_token_that_is_stored_only_hashed(owner: Member, capsys: pytest.CaptureFixture[str]) -> None:
    call_command("create_api_token", "owner", "--name", "ci")
    raw = capsys.readouterr().out.strip()
    assert raw.startswith("rmp_")
    stored = ApiToken.objects.get(name="ci")
    assert stored.token_hash == token_digest(raw)
    assert raw not in {stored.token_hash, stored.prefix}
    assert not ApiToken.objects.filter(token_hash=raw).exists()


@pytest.mark.django_db
def test_create_api_token_for_an_unknown_user_names_the_field() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="username: no user named 'ghost'"):
        call_command("create_api_token", "ghost")


@pytest.mark.django_db
def test_bearer_token_authenticates_and_a_revoked_one_is_refused(owner: Member) -> None:
    client = owner.api()
    me = client.get("/api/v1/me")
    assert me.status_code == 200
    assert me.json() == {"username": "owner", "roles": ["release_manager"]}
    ApiToken.objects.filter(user=owner.user).update(revoked_at=timezone.now())
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert "unknown or revoked token" in response.json()["detail"]


@pytest.mark.django_db
def test_no_token_is_refused_with_a_json_reason(anonymous) -> None:  # type: ignore[no-untyped-def]
    response = anonymous.get("/api/v1/me")
    assert response.status_code == 401
    assert response.json()["detail"]
