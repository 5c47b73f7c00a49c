"""What differs between the OpenAI-compatible servers a static worker may point at (pure)."""

from __future__ import annotations

import pytest

from serving.engines.flavors import FLAVORS, base_url_normalise, flavor_get
from serving.engines.metrics import in_flight_from


@pytest.mark.parametrize(("given", "stored"), [
    ("http://vllm:8000", "http://vllm:8000"),
    ("http://vllm:8000/", "http://vllm:8000"),
    ("http://vllm:8000/v1", "http://vllm:8000"),
    ("https://api.openai.com/v1/", "https://api.openai.com"),
    ("https://llm.internal/v1-stack/", "https://llm.internal/v1-stack"),
    ("https://gw.example/team-a/v1", "https://gw.example/team-a"),
])
def test_a_base_url_is_stored_without_its_v1_so_requests_never_go_to_v1_v1(given: str, stored: str) -> None:
    assert base_url_normalise(given) == stored


def test_azure_is_reached_through_its_v1_api_under_openai() -> None:
    for given in ("https://acme.openai.azure.com", "https://acme.openai.azure.com/openai/v1/"):
        assert base_url_normalise(given, flavor="azure-openai") == "https://acme.openai.azure.com/openai"
    with pytest.raises(ValueError, match="the deployment is the model version's served_model_name"):
        base_url_normalise("https://acme.openai.azure.com/openai/deployments/gpt-4o", flavor="azure-openai")


@pytest.mark.parametrize("bad", ["ftp://x", "http://", "http://x/v1?api-version=1", "not a url"])
def test_a_url_that_cannot_work_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        base_url_normalise(bad)


def test_each_flavor_sends_its_key_its_own_way() -> None:
    assert flavor_get("vllm").headers("k") == {"Authorization": "Bearer k"}
    assert flavor_get("azure-openai").headers("k") == {"api-key": "k"}
    assert flavor_get("azure-openai").header_lines("k") == ("api-key: k",)
    assert flavor_get("openai").headers("") == {}


def test_hosted_apis_get_no_completion_probe_and_are_never_drained() -> None:
    hosted = {name for name, flavor in FLAVORS.items() if flavor.hosted}
    assert hosted == {"openai", "azure-openai"}
    assert all(not FLAVORS[name].completion_probe and not FLAVORS[name].drained for name in hosted)
    assert all(flavor.completion_probe and flavor.drained for name, flavor in FLAVORS.items() if name not in hosted)


@pytest.mark.parametrize(("flavor", "page", "in_flight"), [
    ("vllm", 'vllm:num_requests_running{model_name="m"} 2\nvllm:num_requests_waiting{model_name="m"} 1\n', 3.0),
    ("sglang", "sglang:num_running_reqs 4\nsglang:num_queue_reqs 0\n", 4.0),
    ("tgi", "tgi_batch_current_size 1\ntgi_queue_size 5\n", 6.0),
    ("llamacpp", "llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n", 1.0),
    ("sglang", "vllm:num_requests_running 3\n", None),  # its gauges missing: no signal, not "0 in flight"
])
def test_a_drain_reads_the_queue_gauges_each_server_exports(flavor: str, page: str, in_flight: float | None) -> None:
    gauges = FLAVORS[flavor].in_flight_gauges
    assert gauges is not None
    assert in_flight_from(page, gauges) == in_flight
