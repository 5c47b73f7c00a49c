"""Who did something to a rollout: a person (through the API, the UI, Slack or the CLI) or the platform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import AnonymousUser

if TYPE_CHECKING:
    # The configured user model (AUTH_USER_MODEL is Django's own here).
    from django.contrib.auth.models import User as UserModel
else:
    UserModel = Any

VIA_CHOICES = ("api", "ui", "slack", "cli", "system")


@dataclass(frozen=True)
class Actor:
    user: UserModel | None
    name: str
    via: str = "api"
    # Where the person came from, e.g. the Slack user id; shown in the audit trail.
    detail: str = ""

    @classmethod
    def of(cls, user: UserModel, *, via: str = "api", detail: str = "") -> Actor:
        if via not in VIA_CHOICES:
            raise ValueError(f"via must be one of {', '.join(VIA_CHOICES)}, got {via!r}")
        return cls(user=user, name=user.get_username(), via=via, detail=detail)

    @property
    def is_person(self) -> bool:
        return self.user is not None


SYSTEM = Actor(user=None, name="system", via="system")
ANALYSIS = Actor(user=None, name="analysis", via="system")
# The dead-man's switch of the analysis (rollouts.watchdog): it acts when the analysis has stopped.
WATCHDOG = Actor(user=None, name="watchdog", via="system")

ActorLike = Actor | Any  # an Actor, or a user (request.user)


def as_actor(actor: ActorLike) -> Actor:
    """Services accept a user (the API's request.user) or an `Actor` (Slack, the UI, the platform)."""
    if isinstance(actor, Actor):
        return actor
    if isinstance(actor, AnonymousUser) or not getattr(actor, "is_authenticated", False):
        raise TypeError("an anonymous user cannot act on a rollout")
    return Actor.of(actor)
