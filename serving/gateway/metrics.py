"""The gateway's Prometheus series (`/metrics` of the web app and of the gateway; with several server
workers, prometheus_client's multiprocess mode adds them up: config/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

requests_total = Counter(
    "platform_gateway_requests_total",
    "Requests the gateway answered after routing, by alias, the arm that answered and outcome (ok, "
    "engine_error, client_error, cancelled, no_engine).",
    ["alias", "arm", "outcome"],
)
retries_total = Counter(
    "platform_gateway_retries_total",
    "Tries that failed before the first byte and were tried again elsewhere, by alias, arm and error kind.",
    ["alias", "arm", "reason"],
)
rejected_total = Counter(
    "platform_gateway_rejected_total", "Requests the gateway answered itself before routing, by status.", ["status"]
)
throttled_total = Counter(
    "platform_gateway_throttled_total",
    "Requests refused with 429, by gateway key name, alias and limit (rpm, tpm, concurrency, engine_queue).",
    ["key", "alias", "limit"],
)
limiter_errors_total = Counter(
    "platform_gateway_limiter_errors_total", "Rate-limiter calls to Redis that failed (the request was admitted)."
)
failovers_total = Counter(
    "platform_gateway_failovers_total", "Requests answered by the arm their session was not assigned to.", ["alias"]
)
ejections_total = Counter("platform_gateway_ejections_total", "Replicas taken out of routing after failing in a row.")

# Latency of the requests that succeeded, as DESIGN.md defines it, by alias, arm and model version.
_LABELS = ["alias", "arm", "version"]
ttft_seconds = Histogram(
    "platform_gateway_ttft_seconds", "Time to the first token.", _LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
tpot_seconds = Histogram(
    "platform_gateway_tpot_seconds", "Time per output token after the first.", _LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
e2e_seconds = Histogram(
    "platform_gateway_e2e_seconds", "Time to the end of the answer.", _LABELS,
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)

records_buffered = Gauge(
    "platform_gateway_records_buffered", "Request records waiting to be written.", multiprocess_mode="livesum"
)
records_written_total = Counter("platform_gateway_records_written_total", "Request records written to the database.")
records_dropped_total = Counter(
    "platform_gateway_records_dropped_total", "Request records dropped because the buffer was full."
)
records_refused_total = Counter(
    "platform_gateway_records_refused_total",
    "Request records the database refused on their own (after their batch was retried row by row), by reason.",
    ["reason"],
)
record_write_failures_total = Counter(
    "platform_gateway_record_write_failures_total", "Batches of request records that could not be written yet."
)
texts_unstored_total = Counter(
    "platform_gateway_texts_unstored_total",
    "Records written without their prompt and output text: the redaction backlog was over its bound.",
)
shadow_enqueued_total = Counter("platform_gateway_shadow_enqueued_total", "Shadow mirrors handed to Celery.")
shadow_shed_total = Counter(
    "platform_gateway_shadow_shed_total", "Shadow mirrors not sent: backlog over the bound, or the broker failed."
)
# The oldest table any live worker routes on.
route_generation = Gauge(
    "platform_gateway_route_generation", "RouteGeneration of the route table in use.", multiprocess_mode="livemin"
)
routes_from_disk = Gauge(
    "platform_gateway_routes_from_disk",
    "1 while the route table in use came from the last-known-good copy on disk (the database was unreachable).",
    multiprocess_mode="livemax",
)
route_reloads_total = Counter("platform_gateway_route_reloads_total", "Route table rebuilds.")
route_poll_failures_total = Counter(
    "platform_gateway_route_poll_failures_total", "Route table polls that failed (the old table stays in use)."
)


class LatencyObserver:
    """Histogram children by (alias, arm, version), cached: a label lookup per request per series costs
    more than the observation itself."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str, str], tuple[object, object, object]] = {}

    def observe(self, alias: str, arm: str, version: str, ttft_ms: float | None, tpot_ms: float | None,
                e2e_ms: float | None) -> None:
        key = (alias, arm, version)
        children = self._children.get(key)
        if children is None:
            children = (ttft_seconds.labels(*key), tpot_seconds.labels(*key), e2e_seconds.labels(*key))
            if len(self._children) < 10000:
                self._children[key] = children
        ttft, tpot, e2e = children
        if ttft_ms is not None:
            ttft.observe(ttft_ms / 1000.0)  # type: ignore[attr-defined]
        if tpot_ms is not None:
            tpot.observe(tpot_ms / 1000.0)  # type: ignore[attr-defined]
        if e2e_ms is not None:
            e2e.observe(e2e_ms / 1000.0)  # type: ignore[attr-defined]
