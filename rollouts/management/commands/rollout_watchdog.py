from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from rollouts.watchdog import rollouts_watchdog_pass, stale_after_s, watchdog_loop


class Command(BaseCommand):
    help = (
        "The analysis watchdog as a process of its own (the web server started by config.asgi runs it already): "
        "every analysis interval, pause (or roll back, per plan) each live rollout whose analysis has not run for "
        "three intervals. --once: one pass, then exit."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="one pass, print what it did, exit")

    def handle(self, *args: Any, once: bool, **options: Any) -> None:
        if once:
            report = rollouts_watchdog_pass()
            self.stdout.write(
                f"stale: {report.stale or 'none'}; paused: {report.paused or 'none'}; "
                f"rolled back: {report.rolled_back or 'none'}"
            )
            return
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.stdout.write(f"rollout watchdog started: a rollout with no analysis for {stale_after_s():g} s is acted on")
        watchdog_loop(stop)
