from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from evals.services import builtin_suites_ensure


class Command(BaseCommand):
    help = "Create or update the built-in eval suites (idempotent), e.g. adder-heldout."

    def handle(self, *args: Any, **options: Any) -> None:
        for suite in builtin_suites_ensure():
            self.stdout.write(f"eval suite {suite.label}: {suite.item_count} items, tags {suite.tags}")
