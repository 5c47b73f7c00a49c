"""The one ASGI server of the embedded default: web UI, REST API, Slack endpoints and the gateway.

`/v1/` goes to the gateway's own ASGI app (no Django middleware on the hot path); everything else
to Django. In production the gateway runs as its own process: `uvicorn serving.gateway.asgi:application`.
"""

from __future__ import annotations

import os

from config.entrypoint import configure_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
configure_or_exit()

from django.core.asgi import get_asgi_application  # noqa: E402

from config.asgi_router import PathRouter  # noqa: E402

django_application = get_asgi_application()

from rollouts.watchdog import WatchdogThread  # noqa: E402
from serving.gateway.asgi import gateway  # noqa: E402

# The gateway's route table is loaded at start-up, before the server accepts its first request. The web
# process also runs the analysis watchdog (rollouts.watchdog): it must be up when the workers are not.
# (Django's handler types its scope as a dict, the router as any mutable mapping: the same thing at run time.)
application = PathRouter(
    default=django_application,  # type: ignore[arg-type]
    mounts=[("/v1/", gateway)],
    lifespan=[gateway, WatchdogThread()],
)
