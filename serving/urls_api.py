from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from serving.api import (
    EngineDesiredStateApi,
    EngineDetailApi,
    EnginesApi,
    ModelVersionDetailApi,
    ModelVersionsApi,
)

urlpatterns: list[URLPattern | URLResolver] = [
    path("model-versions", ModelVersionsApi.as_view(), name="api-model-versions"),
    path("model-versions/<str:ref>", ModelVersionDetailApi.as_view(), name="api-model-version"),
    path("engines", EnginesApi.as_view(), name="api-engines"),
    path("engines/<int:worker_id>", EngineDetailApi.as_view(), name="api-engine"),
    path("engines/<int:worker_id>/desired-state", EngineDesiredStateApi.as_view(), name="api-engine-desired-state"),
]
