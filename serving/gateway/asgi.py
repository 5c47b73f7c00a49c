"""The gateway as its own ASGI process: `uvicorn serving.gateway.asgi:application`.

Standalone it also answers `/metrics` and `/healthz`; in the combined server `config.asgi` mounts the
same `gateway` object on `/v1/` and runs its start-up and shutdown from the router's lifespan.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.entrypoint import configure_or_exit

configure_or_exit()

import django  # noqa: E402

django.setup()

from serving.gateway.app import Gateway  # noqa: E402

gateway = Gateway(standalone=True)
application = gateway
