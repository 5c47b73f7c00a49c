"""The process's own Prometheus counters; `/metrics` exposes them."""

from __future__ import annotations

from prometheus_client import Counter

http_responses_total = Counter(
    "platform_http_responses_total", "Responses of the web app and API, by status class.", ["status_class"]
)
