from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from serving.engines import services as engine_services
from serving.models import EngineWorker, ModelVersion, RouteGeneration
from serving.services import engine_worker_create
from tests.conftest import Member

URL = "/api/v1/engines"
AGENT = "host/vm/1/test"


@pytest.fixture
def version(db: None) -> ModelVersion:
    return ModelVersion.objects.create(name="adder", version="v1", artifact="/models/adder-v1",
                                       served_model_name="adder-v1")


def ready_worker(version: ModelVersion) -> EngineWorker:
    worker = engine_worker_create(model_version=version)
    engine_services.engine_claim(worker_id=worker.pk, agent=AGENT, ttl_s=60)
    engine_services.engine_start_begin(worker_id=worker.pk, agent=AGENT, port=8100, base_url="http://127.0.0.1:8100")
    engine_services.engine_pid_set(worker_id=worker.pk, agent=AGENT, pid=4321)
    engine_services.engine_metrics_record(worker_id=worker.pk, agent=AGENT, metrics={"vllm:num_requests_running": 2.0})
    engine_services.engine_log_tail_record(worker_id=worker.pk, agent=AGENT, log_tail="INFO: Application startup complete.")
    ready = engine_services.engine_ready(worker_id=worker.pk, agent=AGENT)
    assert ready is not None
    return ready


def test_a_release_manager_creates_a_local_worker_by_version_label(owner: Member, version: ModelVersion) -> None:
    response = owner.api().post(URL, {"model_version": "adder-v1", "host_name": "gpu-1"}, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert (data["model_version"], data["model_version_label"]) == (version.pk, "adder-v1")
    assert (data["driver"], data["host_name"], data["desired_state"], data["state"]) == ("local", "gpu-1", "running", "pending")
    assert data["base_url"] == ""


def test_a_static_worker_keeps_its_endpoint_and_never_shows_its_key(owner: Member, version: ModelVersion) -> None:
    response = owner.api().post(URL, {"model_version": version.pk, "driver": "static",
                                      "base_url": "https://llm.internal/v1-stack/", "api_key": "sk-secret"}, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert data["base_url"] == "https://llm.internal/v1-stack"
    assert data["has_api_key"] is True
    assert "sk-secret" not in response.content.decode()
    assert EngineWorker.objects.get(pk=data["id"]).api_key == "sk-secret"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"model_version": "adder-v9"}, "model_version"),
        ({}, "model_version"),
        ({"model_version": "adder-v1", "driver": "docker"}, "driver"),
        ({"model_version": "adder-v1", "driver": "static"}, "base_url"),
        ({"model_version": "adder-v1", "driver": "static", "base_url": "ftp://x"}, "base_url"),
        ({"model_version": "adder-v1", "base_url": "http://x:1"}, "base_url"),
        ({"model_version": "adder-v1", "api_key": "k"}, "api_key"),
        ({"model_version": "adder-v1", "driver": "static", "base_url": "http://x", "flavor": "bedrock"}, "flavor"),
        ({"model_version": "adder-v1", "flavor": "sglang"}, "flavor"),
        ({"model_version": "adder-v1", "replicas": 2}, "replicas"),
        ({"model_version": "adder-v1", "driver": "kubernetes", "replicas": 0}, "replicas"),
        ({"model_version": "adder-v1", "driver": "static", "flavor": "azure-openai",
          "base_url": "https://acme.openai.azure.com/openai/deployments/gpt-4o"}, "base_url"),
    ],
)
def test_bad_input_is_refused_naming_the_field(owner: Member, version: ModelVersion, payload: dict[str, object],
                                              field: str) -> None:
    response = owner.api().post(URL, payload, format="json")
    assert response.status_code == 400, response.json()
    assert field in response.json()["errors"]
    assert not EngineWorker.objects.exists()


def test_static_workers_name_their_server_and_kubernetes_workers_their_replicas(owner: Member,
                                                                              version: ModelVersion) -> None:
    client = owner.api()
    sglang = client.post(URL, {"model_version": "adder-v1", "driver": "static", "flavor": "sglang",
                               "base_url": "http://sglang:30000/v1"}, format="json")
    assert sglang.status_code == 201, sglang.json()
    assert (sglang.json()["flavor"], sglang.json()["base_url"]) == ("sglang", "http://sglang:30000")
    kube = client.post(URL, {"model_version": "adder-v1", "driver": "kubernetes", "replicas": 3}, format="json")
    assert kube.status_code == 201, kube.json()
    assert (kube.json()["driver"], kube.json()["replicas"], kube.json()["ready_replicas"]) == ("kubernetes", 3, 0)
    assert client.get(f"{URL}/{kube.json()['id']}").json()["pods"] == []


def test_a_retried_create_with_the_same_key_makes_one_worker(owner: Member, version: ModelVersion) -> None:
    client = owner.api()
    payload = {"model_version": "adder-v1"}
    first = client.post(URL, payload, format="json", HTTP_IDEMPOTENCY_KEY="deploy-42")
    again = client.post(URL, payload, format="json", HTTP_IDEMPOTENCY_KEY="deploy-42")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert EngineWorker.objects.count() == 1
    # Without a key, a second create is a second worker (a replica).
    assert client.post(URL, payload, format="json").status_code == 201
    assert EngineWorker.objects.count() == 2


def test_keys_belong_to_their_user(owner: Member, platform_admin: Member, version: ModelVersion) -> None:
    payload = {"model_version": "adder-v1"}
    mine = owner.api().post(URL, payload, format="json", HTTP_IDEMPOTENCY_KEY="same")
    theirs = platform_admin.api().post(URL, payload, format="json", HTTP_IDEMPOTENCY_KEY="same")
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]


def test_the_detail_shows_state_health_restarts_log_and_metrics(viewer: Member, version: ModelVersion) -> None:
    worker = ready_worker(version)
    data = viewer.api().get(f"{URL}/{worker.pk}").json()
    assert (data["state"], data["pid"], data["port"], data["restarts"]) == ("ready", 4321, 8100, 0)
    assert data["health"]["ok"] is True and data["health"]["detail"] == "ok"
    assert data["metrics"] == {"vllm:num_requests_running": 2.0}
    assert data["log_tail"] == "INFO: Application startup complete."


def test_the_list_filters_by_version_host_and_state(viewer: Member, version: ModelVersion) -> None:
    ready = ready_worker(version)
    engine_worker_create(model_version=version, host_name="gpu-2")
    client = viewer.api()
    assert [w["id"] for w in client.get(URL, {"state": "ready"}).json()["results"]] == [ready.pk]
    assert len(client.get(URL, {"host_name": "gpu-2"}).json()["results"]) == 1
    assert len(client.get(URL, {"model_version": "adder-v1"}).json()["results"]) == 2
    assert "log_tail" not in client.get(URL).json()["results"][0]
    assert client.get(URL, {"state": "sleeping"}).status_code == 400


def test_stopping_a_ready_worker_takes_it_out_of_routing_at_once(owner: Member, version: ModelVersion) -> None:
    worker = ready_worker(version)
    before = RouteGeneration.objects.get(pk=1).generation
    response = owner.api().post(f"{URL}/{worker.pk}/desired-state", {"desired_state": "stopped"}, format="json")
    assert response.status_code == 200
    assert (response.json()["desired_state"], response.json()["state"]) == ("stopped", "draining")
    assert RouteGeneration.objects.get(pk=1).generation == before + 1


def test_running_again_retries_a_failed_worker(owner: Member, version: ModelVersion) -> None:
    worker = engine_worker_create(model_version=version)
    EngineWorker.objects.filter(pk=worker.pk).update(state="failed", state_reason="gave up")
    response = owner.api().post(f"{URL}/{worker.pk}/desired-state", {"desired_state": "running"}, format="json")
    assert response.json()["state"] == "pending"


def test_a_bad_desired_state_names_the_field(owner: Member, version: ModelVersion) -> None:
    worker = engine_worker_create(model_version=version)
    response = owner.api().post(f"{URL}/{worker.pk}/desired-state", {"desired_state": "paused"}, format="json")
    assert response.status_code == 400
    assert "desired_state" in response.json()["errors"]


def test_an_unknown_worker_is_404(owner: Member, db: None) -> None:
    assert owner.api().get(f"{URL}/999").status_code == 404
    assert owner.api().post(f"{URL}/999/desired-state", {"desired_state": "stopped"}, format="json").status_code == 404


@pytest.mark.parametrize("who", ["viewer", "outsider", "approver"])
def test_creating_and_stopping_need_a_release_manager(who: str, request: pytest.FixtureRequest,
                                                     version: ModelVersion) -> None:
    member: Member = request.getfixturevalue(who)
    worker = engine_worker_create(model_version=version)
    client = member.api()
    assert client.post(URL, {"model_version": "adder-v1"}, format="json").status_code == 403
    assert client.post(f"{URL}/{worker.pk}/desired-state", {"desired_state": "stopped"}, format="json").status_code == 403
    assert EngineWorker.objects.get().desired_state == "running"


def test_outsiders_cannot_read_engines(outsider: Member, version: ModelVersion) -> None:
    worker = engine_worker_create(model_version=version)
    assert outsider.api().get(URL).status_code == 403
    assert outsider.api().get(f"{URL}/{worker.pk}").status_code == 403


def test_anonymous_callers_are_refused(anonymous: APIClient, version: ModelVersion) -> None:
    worker = engine_worker_create(model_version=version)
    assert anonymous.get(URL).status_code == 401
    assert anonymous.get(f"{URL}/{worker.pk}").status_code == 401
    assert anonymous.post(URL, {"model_version": "adder-v1"}, format="json").status_code == 401
    assert anonymous.post(f"{URL}/{worker.pk}/desired-state", {"desired_state": "stopped"}, format="json").status_code == 401
