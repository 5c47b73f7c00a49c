from __future__ import annotations

from pathlib import Path

import pytest
from rest_framework.test import APIClient

from serving.models import ModelVersion
from serving.services import engine_worker_create, model_version_register
from tests.conftest import Member

URL = "/api/v1/model-versions"


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    """A directory shaped like a saved model (what lineage hashes)."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_text('{"model": "chars"}')
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}")
    return tmp_path


def body(directory: Path, **extra: object) -> dict[str, object]:
    return {"name": "adder", "version": "v3", "artifact": str(directory), "engine_args": ["--max-model-len", "64"],
            "sampling_defaults": {"temperature": 0}, "price_input_per_million": "0.25",
            "price_output_per_million": "1.5", **extra}


def test_a_release_manager_registers_a_version_with_its_lineage(owner: Member, artifact: Path) -> None:
    response = owner.api().post(URL, body(artifact), format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert data["label"] == "adder-v3"
    assert data["served_model_name"] == "adder-v3"
    assert data["engine_args"] == ["--max-model-len", "64"]
    assert data["price_output_per_million"] == "1.5000"
    assert data["created_by"] == "owner"
    assert data["ready_engines"] == 0
    assert len(data["lineage_hash"]) == 64
    assert set(data["lineage"]) >= {"weights", "tokenizer", "chat_template", "sampling", "lineage_hash"}
    assert ModelVersion.objects.get(name="adder", version="v3").lineage_hash == data["lineage_hash"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "not a slug"}, "name"),
        ({"version": ""}, "version"),
        ({"artifact": ""}, "artifact"),
        ({"engine_args": "--enforce-eager"}, "engine_args"),
        ({"engine_args": ["--port", "9000"]}, "engine_args"),
        ({"sampling_defaults": [1, 2]}, "sampling_defaults"),
        ({"price_input_per_million": "-1"}, "price_input_per_million"),
        ({"price_output_per_million": "cheap"}, "price_output_per_million"),
        ({"engine_args": ["--tensor-parallel-size", "0"]}, "engine_args"),
        ({"engine_args": ["--api-key", "mine"]}, "engine_args"),
        ({"deployment": {"gpus": -1}}, "deployment"),
        ({"deployment": {"model_source": "pvc"}}, "deployment"),
        ({"deployment": {"tolerations": [{"operator": "Maybe"}]}}, "deployment"),
        ({"deployment": {"shm_size": "lots"}}, "deployment"),
        ({"deployment": {"env": {"VLLM_API_KEY": "x"}}}, "deployment"),
        ({"deployment": {"replicas": 3}}, "deployment"),
    ],
)
def test_bad_input_is_refused_naming_the_field(owner: Member, artifact: Path, change: dict[str, object],
                                              field: str) -> None:
    response = owner.api().post(URL, body(artifact, **change), format="json")
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not ModelVersion.objects.exists()


def test_a_version_carries_how_the_kubernetes_driver_deploys_it(owner: Member, artifact: Path) -> None:
    deployment = {"image": "vllm/vllm-openai:v0.11.0", "gpus": 2, "model_source": "pvc", "pvc": "models",
                  "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  "runtime_class": "nvidia", "shm_size": "8Gi"}
    response = owner.api().post(URL, body(artifact, deployment=deployment), format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["deployment"] == deployment
    refused = owner.api().post(URL, body(artifact, version="v9", deployment={"pvc": "Not_A_Name"}), format="json")
    assert refused.json()["errors"]["deployment"] == ["pvc: must be a PersistentVolumeClaim name (lower-case DNS name)"]


def test_a_taken_name_and_version_is_a_conflict(owner: Member, artifact: Path) -> None:
    assert owner.api().post(URL, body(artifact), format="json").status_code == 201
    response = owner.api().post(URL, body(artifact), format="json")
    assert response.status_code == 409
    assert response.json()["errors"] == {"version": ["model version adder-v3 is already registered"]}


def test_a_retried_registration_with_the_same_key_returns_the_first(owner: Member, artifact: Path) -> None:
    client = owner.api()
    first = client.post(URL, body(artifact), format="json", HTTP_IDEMPOTENCY_KEY="ci-run-17")
    again = client.post(URL, body(artifact), format="json", HTTP_IDEMPOTENCY_KEY="ci-run-17")
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert ModelVersion.objects.count() == 1


def test_the_same_key_for_a_different_registration_is_refused(owner: Member, artifact: Path) -> None:
    client = owner.api()
    assert client.post(URL, body(artifact), format="json", HTTP_IDEMPOTENCY_KEY="k1").status_code == 201
    response = client.post(URL, body(artifact, version="v4"), format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["errors"]
    assert not ModelVersion.objects.filter(version="v4").exists()


@pytest.mark.parametrize("who", ["viewer", "outsider", "approver"])
def test_registering_needs_a_release_manager(who: str, request: pytest.FixtureRequest, artifact: Path) -> None:
    member: Member = request.getfixturevalue(who)
    response = member.api().post(URL, body(artifact), format="json")
    assert response.status_code == 403
    assert not ModelVersion.objects.exists()


def test_an_admin_may_register(platform_admin: Member, artifact: Path) -> None:
    assert platform_admin.api().post(URL, body(artifact), format="json").status_code == 201


def test_anonymous_callers_are_refused(anonymous: APIClient, db: None, artifact: Path) -> None:
    assert anonymous.post(URL, body(artifact), format="json").status_code == 401
    assert anonymous.get(URL).status_code == 401
    assert anonymous.get(f"{URL}/adder-v1").status_code == 401


def test_viewers_list_versions_and_read_one_by_id_or_label(viewer: Member, artifact: Path) -> None:
    v1 = model_version_register(name="adder", version="v1", artifact=str(artifact))
    model_version_register(name="adder", version="v2", artifact=str(artifact))
    model_version_register(name="other", version="v1", artifact="org/other-model")
    client = viewer.api()
    listed = client.get(URL).json()
    assert [v["label"] for v in listed["results"]] == ["adder-v1", "adder-v2", "other-v1"]
    assert [v["label"] for v in client.get(URL, {"name": "adder"}).json()["results"]] == ["adder-v1", "adder-v2"]
    by_label = client.get(f"{URL}/adder-v1").json()
    by_id = client.get(f"{URL}/{v1.pk}").json()
    assert by_label == by_id
    assert by_label["artifact"] == str(artifact)


def test_the_detail_counts_ready_engines(viewer: Member, artifact: Path) -> None:
    version = model_version_register(name="adder", version="v1", artifact=str(artifact))
    worker = engine_worker_create(model_version=version)
    type(worker).objects.filter(pk=worker.pk).update(state="ready")
    assert viewer.api().get(f"{URL}/adder-v1").json()["ready_engines"] == 1


def test_an_unknown_version_is_404(viewer: Member) -> None:
    response = viewer.api().get(f"{URL}/adder-v9")
    assert response.status_code == 404
    assert response.json()["detail"] == "no model version 'adder-v9'"


def test_outsiders_cannot_read_versions(outsider: Member) -> None:
    assert outsider.api().get(URL).status_code == 403
    assert outsider.api().get(f"{URL}/adder-v1").status_code == 403
