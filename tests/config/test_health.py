from __future__ import annotations

import pytest
from django.test import Client, override_settings


@pytest.mark.django_db
def test_healthz_and_readyz_report_ok(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


@pytest.mark.django_db
def test_readyz_names_the_broker_when_it_is_down(client: Client) -> None:
    # Nothing listens on port 1: the same refusal a stopped Redis gives.
    with override_settings(CELERY_BROKER_URL="redis://127.0.0.1:1/0"):
        ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("down:")
    assert body["reason"].startswith("broker down:")


@pytest.mark.django_db
def test_metrics_exposes_prometheus_text(client: Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"process_cpu_seconds_total" in response.content or b"python_info" in response.content


@pytest.mark.django_db
def test_unknown_api_path_is_a_json_404(client: Client) -> None:
    response = client.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
