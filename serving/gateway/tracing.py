"""OpenTelemetry traces of gateway requests, on when OTEL_EXPORTER_OTLP_ENDPOINT (or its traces-only form)
is set, and then only: without it nothing of OpenTelemetry is imported and a request pays one attribute
check. The client's W3C `traceparent` is passed to the engine unchanged then.

With it, each request is a SERVER span (a child of the client's `traceparent` if it sent one) named as
the `gen_ai` semantic conventions name it ("chat adder"), and each try a CLIENT span under it, whose own
context goes to the engine in `traceparent`: vLLM started with `--otlp-traces-endpoint` continues the same
trace, so a slow request can be followed from the client through the gateway into the engine. The
standard OTEL_* variables configure the exporter (OTEL_EXPORTER_OTLP_PROTOCOL `http/protobuf`, the
default here, or `grpc`; OTEL_SERVICE_NAME, default `ramp-gateway`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.gateway.forward import Attempt, Exchange

log = logging.getLogger(__name__)

_OPERATION = {"chat.completions": "chat", "completions": "text_completion"}


class Tracing:
    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self.enabled = tracer is not None
        self._tracer = tracer
        self._provider = provider

    @classmethod
    def from_environment(cls) -> Tracing:
        if not (
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        ):
            return cls()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        exporter: Any
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporter = GrpcExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporter = HttpExporter()
        service = os.environ.get("OTEL_SERVICE_NAME") or "ramp-gateway"
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info(
            "tracing requests to %s (%s)",
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            protocol,
        )
        return cls(provider.get_tracer("ramp.gateway"), provider)

    def request_start(self, ex: Exchange, client_headers: list[tuple[bytes, bytes]]) -> Any:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {name.decode(): value.decode("latin-1") for name, value in client_headers}
        parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        operation = _OPERATION[ex.endpoint]
        body = ex.body
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": "vllm",
            "gen_ai.request.model": ex.route.name,
            "ramp.request_id": ex.request_id,
            "ramp.rollout.assigned_arm": ex.assigned_arm,
        }
        if ex.route.rollout_id is not None:
            attributes["ramp.rollout.id"] = ex.route.rollout_id
        for name, attribute in (
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("max_completion_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ):
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attributes[attribute] = value
        span = self._tracer.start_span(
            f"{operation} {ex.route.name}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        ex.span = span
        return span

    def attempt_start(self, ex: Exchange, attempt: Attempt) -> tuple[Any, tuple[str, ...]]:
        """The try's span and the headers that carry its context to the engine."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes: dict[str, Any] = {
            "gen_ai.operation.name": _OPERATION[ex.endpoint],
            "gen_ai.provider.name": "vllm",
            "gen_ai.request.model": attempt.version_label,
            "ramp.rollout.arm": attempt.arm,
            "ramp.attempt": attempt.number,
        }
        if attempt.replica is not None:
            endpoint = attempt.replica.endpoint
            attributes.update(
                {
                    "server.address": endpoint.host,
                    "server.port": endpoint.port,
                    "ramp.engine_worker_id": attempt.replica.worker_id,
                }
            )
        span = self._tracer.start_span(
            f"{_OPERATION[ex.endpoint]} {attempt.version_label}",
            context=trace.set_span_in_context(ex.span),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        return span, tuple(f"{name}: {value}" for name, value in carrier.items())

    def attempt_end(self, span: Any, attempt: Attempt) -> None:
        _outcome_set(span, attempt)
        span.end()

    def request_end(self, span: Any, ex: Exchange) -> None:
        last = ex.current
        if last is not None:
            span.set_attribute("ramp.rollout.arm", last.arm)
            span.set_attribute("ramp.attempts", len(ex.attempts))
            _outcome_set(span, last)
        span.end()

    def shutdown(self) -> None:
        if self._provider is not None:
            try:
                self._provider.shutdown()
            except Exception:
                log.warning("flushing traces at shutdown failed", exc_info=True)


def _outcome_set(span: Any, attempt: Attempt) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("gen_ai.response.model", attempt.version_label)
    span.set_attribute("http.response.status_code", attempt.status)
    if attempt.prompt_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", attempt.prompt_tokens)
    if attempt.completion_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", attempt.completion_tokens)
    if attempt.ttft_ms is not None:
        span.set_attribute("ramp.ttft_ms", attempt.ttft_ms)
    if attempt.outcome in ("engine_error", "no_engine"):
        span.set_attribute("error.type", attempt.error_kind or attempt.outcome)
        span.set_status(Status(StatusCode.ERROR, attempt.error_kind or attempt.outcome))
    elif attempt.outcome == "cancelled":
        span.set_attribute("ramp.outcome", "cancelled")
