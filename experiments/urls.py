from __future__ import annotations

from django.urls import path

from experiments import views

urlpatterns = [
    path("experiments", views.experiment_list, name="experiment-list"),
    path("experiments/<int:rollout_id>", views.experiment_detail, name="experiment-detail"),
    path("experiments/<int:rollout_id>/live", views.experiment_detail_live, name="experiment-detail-live"),
]
