"""Every page renders for a viewer, refuses people without a role, and sends visitors to the login page."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from evals.services import eval_run_create, eval_suite_create
from rollouts.models import Rollout
from serving.models import EngineWorker, ModelVersion
from tests.ui.conftest import logged_in

pytestmark = pytest.mark.django_db

SUITE = '{"id": "a", "prompt": "1+2=", "reference": "3", "tags": ["small"]}\n{"id": "b", "prompt": "2+2=", "reference": "4", "tags": ["small"]}\n'


@pytest.fixture
def pages(canary: Rollout, engine_with_metrics: EngineWorker) -> dict[str, str]:
    suite = eval_suite_create(name="tiny", jsonl_data=SUITE)
    version = ModelVersion.objects.get(name="adder", version="v2")
    run = eval_run_create(suite=suite, model_version=version, scorers=["exact_match"])
    return {
        "dashboard": reverse("dashboard"),
        "dashboard live": reverse("dashboard-live"),
        "rollout": reverse("rollout-detail", args=[canary.pk]),
        "rollout status": reverse("rollout-status", args=[canary.pk]),
        "rollout history": reverse("rollout-history", args=[canary.pk]),
        "audit": reverse("audit-log"),
        "models": reverse("model-version-list"),
        "model": reverse("model-version-detail", args=[version.pk]),
        "engines": reverse("engine-list"),
        "engine": reverse("engine-detail", args=[engine_with_metrics.pk]),
        "engine live": reverse("engine-detail-live", args=[engine_with_metrics.pk]),
        "suites": reverse("eval-suite-list"),
        "suite": reverse("eval-suite-detail", args=[suite.pk]),
        "runs": reverse("eval-run-list"),
        "run": reverse("eval-run-detail", args=[run.pk]),
        "run live": reverse("eval-run-detail-live", args=[run.pk]),
        "eval history": reverse("eval-history", args=[version.pk]),
        "experiments": reverse("experiment-list"),
        "experiment": reverse("experiment-detail", args=[canary.pk]),
    }


def test_every_page_renders_for_a_viewer(viewer: Any, pages: dict[str, str]) -> None:
    client = logged_in(viewer)
    for name, url in pages.items():
        response = client.get(url)
        assert response.status_code == 200, f"{name}: {response.status_code}"


def test_a_visitor_is_sent_to_the_login_page(client: Any, pages: dict[str, str]) -> None:
    for name, url in pages.items():
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), name


def test_a_user_without_a_role_is_refused(outsider: Any, pages: dict[str, str]) -> None:
    client = logged_in(outsider)
    for name, url in pages.items():
        assert client.get(url).status_code == 403, name
