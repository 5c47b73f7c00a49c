"""What differs between the OpenAI-compatible servers a worker may point at (pure).

Every flavor is reached at `<base_url>/v1/...` (the gateway appends `/v1/chat/completions` and
`/v1/completions`), so a base URL is stored without its `/v1`; what differs is how the platform knows the
server is alive and ready, which header carries the key, and what it reads to know that a drain is done.

- Self-hosted servers (vllm, sglang, tgi, llamacpp, ollama) are judged like the agent's own engines: a
  health path, the model list, then one real 1-token completion before they take traffic.
- Hosted APIs (openai, azure-openai) are probed with the model list only (it costs no tokens) and are
  never drained: nobody stops them, so stopping one only takes it out of routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class Flavor:
    name: str
    hosted: bool
    # GET, 200 when the server is up; None: the model list is the health check.
    health_path: str | None
    # Does `/v1/models` list the worker's served name? TGI lists its hub id whatever it is called, and
    # Azure lists base models, not deployments.
    lists_served_name: bool
    # Prometheus gauges whose sum is the requests in flight (what a drain waits on); None: no signal.
    in_flight_gauges: tuple[str, ...] | None
    # Azure OpenAI takes its key in `api-key`; everyone else as a bearer token.
    key_header: str = "Authorization"

    @property
    def completion_probe(self) -> bool:
        """Readiness sends one real 1-token completion (never to a hosted API: it would be billed)."""
        return not self.hosted

    @property
    def drained(self) -> bool:
        return not self.hosted

    def headers(self, api_key: str) -> dict[str, str]:
        if not api_key:
            return {}
        if self.key_header == "Authorization":
            return {"Authorization": f"Bearer {api_key}"}
        return {self.key_header: api_key}

    def header_lines(self, api_key: str) -> tuple[str, ...]:
        """The same headers as raw HTTP lines, the form the gateway's client writes."""
        return tuple(f"{name}: {value}" for name, value in self.headers(api_key).items())


VLLM_IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")

FLAVORS: dict[str, Flavor] = {
    flavor.name: flavor
    for flavor in (
        Flavor(
            "vllm",
            hosted=False,
            health_path="/health",
            lists_served_name=True,
            in_flight_gauges=VLLM_IN_FLIGHT,
        ),
        # SGLang and llama.cpp export their queue only when started with --enable-metrics / --metrics.
        Flavor(
            "sglang",
            hosted=False,
            health_path="/health",
            lists_served_name=True,
            in_flight_gauges=("sglang:num_running_reqs", "sglang:num_queue_reqs"),
        ),
        Flavor(
            "tgi",
            hosted=False,
            health_path="/health",
            lists_served_name=False,
            in_flight_gauges=("tgi_batch_current_size", "tgi_queue_size"),
        ),
        Flavor(
            "llamacpp",
            hosted=False,
            health_path="/health",
            lists_served_name=True,
            in_flight_gauges=("llamacpp:requests_processing", "llamacpp:requests_deferred"),
        ),
        # Ollama has no metrics page: its drain waits a fixed grace instead.
        Flavor(
            "ollama", hosted=False, health_path="/api/version", lists_served_name=True, in_flight_gauges=None
        ),
        Flavor("openai", hosted=True, health_path=None, lists_served_name=True, in_flight_gauges=None),
        Flavor(
            "azure-openai",
            hosted=True,
            health_path=None,
            lists_served_name=False,
            in_flight_gauges=None,
            key_header="api-key",
        ),
    )
}


def flavor_get(name: str) -> Flavor:
    try:
        return FLAVORS[name]
    except KeyError:
        raise ValueError(f"unknown flavor {name!r}: one of {', '.join(FLAVORS)}") from None


def base_url_normalise(url: str, *, flavor: str = "vllm") -> str:
    """The base URL the platform stores: no trailing slash, no trailing `/v1` (the callers add it), no
    query or fragment. Raises ValueError with the reason for a URL that cannot work.

    Azure OpenAI is reached through its v1 API (`https://NAME.openai.azure.com/openai/v1/...`, the
    deployment name as the model), so its base is the resource's `/openai`; a deployment URL of the older
    API (`/openai/deployments/NAME`) is refused with what to give instead."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or a fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    if flavor == "azure-openai":
        if "/deployments/" in path + "/":
            raise ValueError(
                "give the resource's endpoint (https://NAME.openai.azure.com); the deployment "
                "is the model version's served_model_name"
            )
        if not path.endswith("/openai"):
            path += "/openai"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
