from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.contrib.auth.models import AbstractUser
from rest_framework.test import APIClient

from accounts.roles import Role
from accounts.services import api_token_create, user_create
from tests.support.demo import EnginePool


@dataclass
class Member:
    user: AbstractUser
    token: str

    def api(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.token}")
        return client


def _member(username: str, roles: list[Role]) -> Member:
    user = user_create(username=username, password=f"{username}-password-1", roles=roles)
    return Member(user=user, token=api_token_create(user=user, name="tests").raw)


@pytest.fixture
def routes_settle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The analysis counts a window's records from its start, not from ROUTE_SETTLE after it: records a test
    writes between a rollout's transitions (steps, promotion, the bake) are in the window they were meant for."""
    for module in ("rollouts.analysis.checks", "rollouts.analysis.policy"):
        monkeypatch.setattr(f"{module}.ROUTE_SETTLE", timedelta(0))


@pytest.fixture
def owner(db: None) -> Member:
    """A release manager who creates rollouts."""
    return _member("owner", [Role.RELEASE_MANAGER])


@pytest.fixture
def approver(db: None) -> Member:
    return _member("approver", [Role.APPROVER])


@pytest.fixture
def viewer(db: None) -> Member:
    return _member("viewer", [Role.VIEWER])


@pytest.fixture
def outsider(db: None) -> Member:
    """Logged in, but holding no role."""
    return _member("outsider", [])


@pytest.fixture
def platform_admin(db: None) -> Member:
    return _member("platform-admin", [Role.ADMIN])


@pytest.fixture
def anonymous() -> APIClient:
    return APIClient()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `pool_last` run after the others (a stable move, after pytest-django's ordering): each
    needs a demo model nobody else does, and its engine would push out of the pool one that later tests
    share (a restart costs about 40 s)."""
    items.sort(key=lambda item: item.get_closest_marker("pool_last") is not None)


@pytest.fixture(scope="session")
def demo_engines() -> Iterator[EnginePool]:
    """Real vLLM engines on the demo models, shared by the whole session (see tests/support/demo.py)."""
    pool = EnginePool()
    try:
        yield pool
    finally:
        pool.close()
