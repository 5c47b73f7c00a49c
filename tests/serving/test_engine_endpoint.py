"""Callers that bypass the gateway (shadow mirrors, eval runs) reach an engine with its key in the header its
flavor takes, as the gateway itself sends it: a static Azure OpenAI endpoint wants `api-key`, not a bearer
token. The endpoint here is the loopback stand-in, which refuses any other header with a 401."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from evals import runner
from serving.gateway.shadow import shadow_pair_mirror
from serving.models import ModelVersion, ShadowPair
from serving.selectors import engine_endpoint_get
from tests.support.demo import static_worker_ready
from tests.support.fake_engine import FakeEngine

pytestmark = pytest.mark.django_db


@pytest.fixture
def azure() -> Iterator[FakeEngine]:
    engine = FakeEngine(served_name="gpt-deployment", api_key="az-key", key_header="api-key", prefix="/openai").start()
    yield engine
    engine.stop()


@pytest.fixture
def deployment(azure: FakeEngine) -> ModelVersion:
    version = ModelVersion.objects.create(name="gpt", version="deployment", artifact="-",
                                          served_model_name="gpt-deployment")
    static_worker_ready(version, azure.base_url, flavor="azure-openai", api_key="az-key")
    return version


def test_the_endpoint_of_an_azure_deployment_carries_its_key_in_api_key(deployment: ModelVersion,
                                                                        azure: FakeEngine) -> None:
    engine = engine_endpoint_get(model_version=deployment)
    assert engine.base_url == azure.base_url + "/openai"
    assert engine.headers == {"api-key": "az-key"}


def test_a_shadow_mirror_reaches_an_azure_candidate_with_its_key(deployment: ModelVersion, azure: FakeEngine) -> None:
    payload = {"request_id": "azure-mirror", "candidate_version_id": deployment.pk, "baseline_version_id": None,
               "endpoint": "chat.completions", "store_prompts": False, "alias": "gpt", "session_hash": "5e" * 16,
               "body": {"model": "gpt", "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 2}}
    assert shadow_pair_mirror(payload=payload, final_attempt=True) is True
    pair = ShadowPair.objects.get(request_id="azure-mirror")
    assert (pair.candidate_outcome, pair.candidate_error) == ("ok", "")
    assert pair.session_hash == "5e" * 16  # the unit the shadow checks group the pair in
    assert pair.candidate_completion_tokens == 3
    assert azure.seen.keys == ["az-key"] and azure.seen.paths == ["/openai/v1/chat/completions"]


def test_an_eval_run_reaches_an_azure_model_with_its_key(deployment: ModelVersion, azure: FakeEngine) -> None:
    endpoint = runner.endpoint_for(deployment)
    with httpx.Client(trust_env=False, timeout=10) as client:
        body, attempts = runner.post_with_retries(
            client, endpoint, "/v1/completions", {"model": endpoint.model, "prompt": "1+1=", "max_tokens": 2},
            retries=0, backoff_s=0, stop=threading.Event())
    assert attempts == 1 and body["choices"][0]["text"] == "42"
    assert azure.seen.keys == ["az-key"] and azure.seen.paths == ["/openai/v1/completions"]
