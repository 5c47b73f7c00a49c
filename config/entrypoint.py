from __future__ import annotations

import sys

from config.env import EnvError


def configure_or_exit() -> None:
    """Load settings now, so a bad environment value stops start-up with one line instead of a traceback."""
    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018  (touching a setting loads the module)
    except EnvError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None
