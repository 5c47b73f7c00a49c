from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.roles import Role
from accounts.services import user_create


class Command(BaseCommand):
    help = "Create a user with platform roles (viewer, release_manager, approver, admin)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", action="append", default=[], choices=[r.value for r in Role])
        parser.add_argument("--password", default=None, help="Omit to create a user who logs in only with tokens.")
        parser.add_argument("--email", default="")

    def handle(self, *args: Any, username: str, role: list[str], password: str | None, email: str, **_: Any) -> None:
        if get_user_model().objects.filter(username=username).exists():
            raise CommandError(f"username: {username!r} already exists")
        user_create(username=username, password=password, roles=[Role(r) for r in role], email=email)
        self.stdout.write(f"created {username} with roles {', '.join(role) or '(none)'}")
