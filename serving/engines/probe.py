"""HTTP checks of an engine: readiness, health and the `/metrics` scrape, as its flavor wants them
(serving.engines.flavors: which paths, which header carries the key, which gauges say what is in flight).

Each returns what it found instead of raising, with a one-line reason people can act on; the agent
stores the reason on the worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from serving.engines.flavors import FLAVORS, Flavor
from serving.engines.metrics import MetricsParseError, in_flight_from, parse_vllm_metrics

VLLM = FLAVORS["vllm"]

# Readiness sends one real request: on CPU a model vLLM cannot run (a head size of 16) passes /health and
# lists itself, then the engine dies on its first request.
PROBE_PROMPT = "1+1="


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


def engine_client(base_url: str, *, api_key: str = "", timeout_s: float = 10.0, flavor: Flavor = VLLM) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers=flavor.headers(api_key), timeout=timeout_s)


def _failure(what: str, exc: httpx.HTTPError) -> ProbeResult:
    if isinstance(exc, httpx.ConnectError):
        return ProbeResult(False, f"{what}: cannot connect ({exc or 'refused'})")
    if isinstance(exc, httpx.TimeoutException):
        return ProbeResult(False, f"{what}: timed out")
    return ProbeResult(False, f"{what}: {type(exc).__name__}: {exc}")


def _short(response: httpx.Response) -> str:
    body = response.text.strip().replace("\n", " ")
    return f"{response.status_code} {body[:200]}".strip()


def _served_names(client: httpx.Client) -> tuple[list[str] | None, ProbeResult | None]:
    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as exc:
        return None, _failure("GET /v1/models", exc)
    if response.status_code != 200:
        return None, ProbeResult(False, f"GET /v1/models: {_short(response)}")
    try:
        return [str(model["id"]) for model in response.json()["data"]], None
    except (ValueError, KeyError, TypeError):
        return None, ProbeResult(False, "GET /v1/models: not an OpenAI model list")


def probe_health(client: httpx.Client, *, served_model_name: str, flavor: Flavor = VLLM) -> ProbeResult:
    """The flavor's health path is 200 and `/v1/models` answers (listing the name, where the flavor lists
    it): cheap enough to run every few seconds, and free on a hosted API."""
    if flavor.health_path is not None:
        path = flavor.health_path
        try:
            response = client.get(path)
        except httpx.HTTPError as exc:
            return _failure(f"GET {path}", exc)
        if response.status_code != 200:
            return ProbeResult(False, f"GET {path}: {_short(response)}")
    names, failure = _served_names(client)
    if failure is not None:
        return failure
    assert names is not None
    if flavor.lists_served_name and served_model_name not in names:
        return ProbeResult(False, f"GET /v1/models does not list {served_model_name!r} (it lists {', '.join(names) or 'nothing'})")
    return ProbeResult(True, "ok")


def probe_readiness(client: httpx.Client, *, served_model_name: str, flavor: Flavor = VLLM) -> ProbeResult:
    """DESIGN.md's readiness: healthy as above, and a 1-token completion succeeds (a hosted API is not
    sent one: the model list already proved the key and the endpoint, and a completion would be billed)."""
    health = probe_health(client, served_model_name=served_model_name, flavor=flavor)
    if not health.ok or not flavor.completion_probe:
        return health
    body = {"model": served_model_name, "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0}
    try:
        response = client.post("/v1/completions", json=body)
    except httpx.HTTPError as exc:
        return _failure("1-token completion", exc)
    if response.status_code != 200:
        return ProbeResult(False, f"1-token completion: {_short(response)}")
    try:
        choices = response.json()["choices"]
    except (ValueError, KeyError, TypeError):
        choices = None
    if not choices:
        return ProbeResult(False, "1-token completion: no choices in the response")
    return ProbeResult(True, "ok")


@dataclass(frozen=True)
class Scrape:
    metrics: dict[str, Any] | None
    detail: str
    # Requests running + waiting by the flavor's gauges; None when the server does not say.
    in_flight: float | None = None


def scrape_metrics(client: httpx.Client, *, flavor: Flavor = VLLM) -> Scrape:
    """The engine's kept vllm:* metrics (none for other flavors) and its requests in flight, or None
    with the reason."""
    if flavor.in_flight_gauges is None:
        return Scrape(None, f"{flavor.name} exports no queue metrics")
    try:
        response = client.get("/metrics")
    except httpx.HTTPError as exc:
        return Scrape(None, _failure("GET /metrics", exc).detail)
    if response.status_code != 200:
        return Scrape(None, f"GET /metrics: {_short(response)}")
    try:
        in_flight = in_flight_from(response.text, flavor.in_flight_gauges)
        metrics = parse_vllm_metrics(response.text) if flavor.name == "vllm" else {}
    except MetricsParseError as exc:
        return Scrape(None, f"GET /metrics: {exc}")
    return Scrape(metrics, "ok", in_flight)
