from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from serving.models import Alias
from serving.services import gateway_key_create


class Command(BaseCommand):
    help = (
        "Create a gateway key called NAME and print it (shown once; only its hash is kept). Applications send "
        "it as 'Authorization: Bearer <key>' to /v1/. Without --alias it may call every alias."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument(
            "--alias", action="append", default=[], dest="aliases", metavar="ALIAS",
            help="An alias the key may call; repeat for several.",
        )

    def handle(self, *args: Any, name: str, aliases: list[str], **options: Any) -> None:
        name = name.strip()
        if not name:
            raise CommandError("name: give the key a name, e.g. 'checkout-service'")
        unknown = sorted(set(aliases) - set(Alias.objects.filter(name__in=aliases).values_list("name", flat=True)))
        if unknown:
            raise CommandError(f"alias: no alias named {', '.join(unknown)}")
        issued = gateway_key_create(name=name, aliases=sorted(set(aliases)))
        self.stdout.write(issued.raw)
