from __future__ import annotations

from django.urls import path

from rollouts import api

urlpatterns = [
    path("rollouts", api.RolloutListCreateApi.as_view(), name="api-rollouts"),
    path("rollouts/validate", api.RolloutValidateApi.as_view(), name="api-rollouts-validate"),
    path("rollouts/<int:rollout_id>", api.RolloutDetailApi.as_view(), name="api-rollout"),
    path("rollouts/<int:rollout_id>/events", api.RolloutEventsApi.as_view(), name="api-rollout-events"),
    path("rollouts/<int:rollout_id>/series", api.RolloutSeriesApi.as_view(), name="api-rollout-series"),
    *[
        path(f"rollouts/<int:rollout_id>/{action}", view.as_view(), name=f"api-rollout-{action}")
        for action, view in api.ACTION_VIEWS.items()
    ],
]
