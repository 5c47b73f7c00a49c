"""The process's own Prometheus counters, and the exposition `/metrics` serves.

With several server workers (`uvicorn --workers N`) set PROMETHEUS_MULTIPROC_DIR to an empty directory the
workers share (emptied before the server starts): every worker then writes its series there and any
worker's `/metrics` shows the sum over all of them (prometheus_client's multiprocess mode). Without it,
`/metrics` is the answering process's own."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest

http_responses_total = Counter(
    "platform_http_responses_total", "Responses of the web app and API, by status class.", ["status_class"]
)


def metrics_exposition() -> tuple[bytes, str]:
    """(body, content type) of `/metrics`."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def metrics_process_exit() -> None:
    """This worker stops: its live gauges leave the sum (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
