from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from serving.models import Alias
from serving.services import KeyLimits, gateway_key_create


class Command(BaseCommand):
    help = (
        "Create a gateway key called NAME and print it (shown once; only its hash is kept). Applications send "
        "it as 'Authorization: Bearer <key>' to /v1/. Without --alias it may call every alias. --rpm, --tpm "
        "and --max-concurrency limit it (over a limit: 429 with Retry-After); the admin can change them later."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument(
            "--alias", action="append", default=[], dest="aliases", metavar="ALIAS",
            help="An alias the key may call; repeat for several.",
        )
        parser.add_argument("--rpm", type=_positive("--rpm"), default=None, help="Requests per minute.")
        parser.add_argument("--tpm", type=_positive("--tpm"), default=None,
                            help="Tokens (prompt + completion) per minute.")
        parser.add_argument("--max-concurrency", type=_positive("--max-concurrency"), default=None,
                            dest="max_concurrency", help="Requests in flight at once.")

    def handle(
        self, *args: Any, name: str, aliases: list[str], rpm: int | None, tpm: int | None,
        max_concurrency: int | None, **options: Any,
    ) -> None:
        name = name.strip()
        if not name:
            raise CommandError("name: give the key a name, e.g. 'checkout-service'")
        unknown = sorted(set(aliases) - set(Alias.objects.filter(name__in=aliases).values_list("name", flat=True)))
        if unknown:
            raise CommandError(f"alias: no alias named {', '.join(unknown)}")
        limits = KeyLimits(rpm_limit=rpm, tpm_limit=tpm, max_concurrency=max_concurrency)
        issued = gateway_key_create(name=name, aliases=sorted(set(aliases)), limits=limits)
        self.stdout.write(issued.raw)


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag}: must be at least 1, got {value}")
        return value

    return parse
