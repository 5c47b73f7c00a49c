"""Query parameters the REST API reads the same way everywhere."""

from __future__ import annotations

from rest_framework.request import Request

from config.errors import DomainError


def query_flag(request: Request, name: str) -> bool:
    """A boolean query parameter: true/false, 1/0, yes/no; absent or empty is false. Anything else is a 400
    naming it, never a silent false (a CI script's `?live=ture` must not list every rollout)."""
    raw = request.query_params.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise DomainError(f"{name} must be true or false", field=name)
