from __future__ import annotations

import os
import time

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection

BROKER_TIMEOUT_S = 2.0


def _database_status() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        return f"down: {type(exc).__name__}: {exc}".strip()[:300]
    return "ok"


def _broker_status() -> str:
    url = settings.CELERY_BROKER_URL
    try:
        if url.startswith("filesystem"):
            # The filesystem transport "connects" without touching the disk; check the folder instead.
            folder = str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_out"])
            probe = os.path.join(folder, f".readyz-{os.getpid()}-{time.monotonic_ns()}")
            with open(probe, "w") as handle:
                handle.write("ok")
            os.unlink(probe)
        else:
            with Connection(url, connect_timeout=BROKER_TIMEOUT_S) as conn:
                conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
    except Exception as exc:
        return f"down: {type(exc).__name__}: {exc}".strip()[:300]
    return "ok"


@require_GET
@never_cache
def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


@require_GET
@never_cache
def readyz(request: HttpRequest) -> HttpResponse:
    checks = {"database": _database_status(), "broker": _broker_status()}
    down = [name for name, state in checks.items() if state != "ok"]
    body: dict[str, object] = {"status": "ok" if not down else "unavailable", "checks": checks}
    from serving.gateway.app import gateway_running

    gateway = gateway_running()
    if gateway is not None:
        # The gateway mounted in this server: where its routes come from (the disk copy while the database
        # is unreachable) and the database as its polls last saw it.
        body["gateway_routes"] = gateway.routes_status()
    if down:
        body["reason"] = "; ".join(f"{name} {checks[name]}" for name in down)
    return JsonResponse(body, status=503 if down else 200)


@require_GET
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    from config.metrics import metrics_exposition

    body, content_type = metrics_exposition()
    return HttpResponse(body, content_type=content_type)
