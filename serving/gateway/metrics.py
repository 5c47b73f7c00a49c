"""The gateway's Prometheus series (default registry: `/metrics` of the web app and of the gateway)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

requests_total = Counter(
    "platform_gateway_requests_total",
    "Requests the gateway routed to an arm, by alias, arm and outcome (ok, engine_error, client_error, "
    "cancelled, no_engine).",
    ["alias", "arm", "outcome"],
)
rejected_total = Counter(
    "platform_gateway_rejected_total", "Requests the gateway answered itself before routing, by status.", ["status"]
)
failovers_total = Counter(
    "platform_gateway_failovers_total", "Requests sent to the other arm after the first choice failed.", ["alias"]
)
records_buffered = Gauge("platform_gateway_records_buffered", "Request records waiting to be written.")
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
shadow_enqueued_total = Counter("platform_gateway_shadow_enqueued_total", "Shadow mirrors handed to Celery.")
shadow_shed_total = Counter(
    "platform_gateway_shadow_shed_total", "Shadow mirrors not sent: backlog over the bound, or the broker failed."
)
route_generation = Gauge("platform_gateway_route_generation", "RouteGeneration of the route table in use.")
route_reloads_total = Counter("platform_gateway_route_reloads_total", "Route table rebuilds.")
route_poll_failures_total = Counter(
    "platform_gateway_route_poll_failures_total", "Route table polls that failed (the old table stays in use)."
)
