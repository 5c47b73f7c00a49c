"""Error bodies in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import math

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class GatewayError(Exception):
    """An answer the gateway gives itself instead of proxying."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or (SERVER_ERROR if status >= 500 else INVALID_REQUEST)

    def body(self) -> bytes:
        return error_body(self.message, type_=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def bad_request(message: str, *, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value" if param else "invalid_json")


def unauthorized(message: str = "Missing or invalid gateway key: send 'Authorization: Bearer <key>'.") -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


def unknown_model(model: str) -> GatewayError:
    return GatewayError(
        404, f"The model '{model}' does not exist or this key may not use it.", param="model", code="model_not_found"
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is over {limit} bytes.", code="request_too_large")


def upstream_failed(message: str) -> GatewayError:
    return GatewayError(502, message, code="upstream_error")


def no_engine(message: str) -> GatewayError:
    return GatewayError(503, message, code="no_healthy_engine")


class RateLimited(GatewayError):
    """429 in OpenAI's shape, with how long to wait (sent as Retry-After and retry-after-ms)."""

    def __init__(self, message: str, *, retry_after_s: float, type_: str = "requests",
                 code: str = "rate_limit_exceeded") -> None:
        super().__init__(429, message, code=code, type_=type_)
        self.retry_after_s = max(0.0, retry_after_s)

    def headers(self) -> list[tuple[bytes, bytes]]:
        # Retry-After is whole seconds (RFC 9110), rounded up so a client waiting that long is let in;
        # the OpenAI SDKs prefer the exact retry-after-ms.
        seconds = max(1, math.ceil(self.retry_after_s))
        return [(b"retry-after", str(seconds).encode()),
                (b"retry-after-ms", str(max(1, math.ceil(self.retry_after_s * 1000))).encode())]


def upstream_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, code="upstream_timeout")
