from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from serving.models import Alias, EngineWorker, ModelVersion, RouteGeneration
from serving.services import engine_worker_create, gateway_key_create


@pytest.fixture
def admin_client(db: None) -> Client:
    user = get_user_model().objects.create_superuser("root", "root@example.com", "root-password-1")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def version(db: None) -> ModelVersion:
    return ModelVersion.objects.create(name="adder", version="v1", artifact="/m", served_model_name="adder-v1")


def test_every_serving_page_opens(admin_client: Client, version: ModelVersion) -> None:
    engine_worker_create(model_version=version)
    gateway_key_create(name="demo")
    for model in ("modelversion", "engineworker", "alias", "gatewaykey", "requestrecord", "shadowpair"):
        assert admin_client.get(f"/admin/serving/{model}/").status_code == 200, model


def test_records_and_keys_are_read_only(admin_client: Client, version: ModelVersion) -> None:
    assert admin_client.get("/admin/serving/requestrecord/add/").status_code == 403
    assert admin_client.get("/admin/serving/gatewaykey/add/").status_code == 403
    issued = gateway_key_create(name="demo")
    page = admin_client.get(f"/admin/serving/gatewaykey/{issued.key.pk}/change/").content.decode()
    assert issued.raw not in page


def test_stopping_engines_from_the_admin_goes_through_the_service(admin_client: Client, version: ModelVersion) -> None:
    worker = engine_worker_create(model_version=version)
    EngineWorker.objects.filter(pk=worker.pk).update(state="ready")
    response = admin_client.post("/admin/serving/engineworker/", {"action": "desire_stopped",
                                                                   "_selected_action": [worker.pk]})
    assert response.status_code == 302
    worker.refresh_from_db()
    assert (worker.desired_state, worker.state) == ("stopped", "draining")


def test_an_alias_saved_in_the_admin_reaches_the_gateways(admin_client: Client, version: ModelVersion) -> None:
    response = admin_client.post("/admin/serving/alias/add/", {
        "name": "adder", "baseline": version.pk, "candidate_weight": "0", "shadow_rate": "0"})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Alias.objects.get(name="adder").baseline == version
    assert RouteGeneration.objects.get(pk=1).generation >= 1
