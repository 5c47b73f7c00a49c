from __future__ import annotations

import os
import socket

from celery import shared_task


@shared_task(name="config.ping", ignore_result=False)
def ping(payload: str) -> dict[str, str | int]:
    """Round-trips through the broker and the result backend; used by the smoke test and `/readyz --deep`."""
    return {"echo": payload, "worker_pid": os.getpid(), "host": socket.gethostname()}
