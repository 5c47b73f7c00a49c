from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from accounts.services import admin_ensure
from config.env import env_str, generated_secret


class Command(BaseCommand):
    # It lives in rollouts, the app at the top of the dependency graph, because it seeds every app.
    help = (
        "Prepare the embedded platform for `make run` (idempotent): the admin user, the demo models "
        "(trained once, cached), the built-in eval suite, and the demo aliases, engines, key and canaries."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-demo", action="store_true", help="Only the admin user; no demo models or rollouts.")

    def handle(self, *args: Any, no_demo: bool, **options: Any) -> None:
        password = env_str("PLATFORM_ADMIN_PASSWORD", secret=True)
        # A password the operator chose is not echoed; a generated one must be, or nobody could log in.
        shown = "the password in PLATFORM_ADMIN_PASSWORD"
        if password is None:
            password = generated_secret(settings.VAR_DIR / "secrets" / "admin_password", nbytes=12)
            shown = f"password {password} (generated, kept in var/secrets/admin_password)"
        _, created = admin_ensure(username="admin", password=password)
        self.stdout.write(self.style.SUCCESS(f"admin user {'created' if created else 'ready'}: log in as admin with {shown}"))
        self.stdout.write(f"web UI: {settings.PUBLIC_URL}/   API docs: {settings.PUBLIC_URL}/api/docs/")
        if env_str("SLACK_SIGNING_SECRET", secret=True) is None and settings.SLACK_SIGNING_SECRET:
            self.stdout.write(f"Slack signing secret {settings.SLACK_SIGNING_SECRET} (generated, kept in var/secrets/slack_signing_secret)")
        if no_demo:
            return
        call_command("build_demo_models", stdout=self.stdout, stderr=self.stderr)
        from evals.services import builtin_suites_ensure
        from rollouts.demo import demo_ensure

        suites = builtin_suites_ensure()
        self.stdout.write(f"eval suites ready: {', '.join(suite.name for suite in suites)}")
        demo_ensure(log=self.stdout.write)
