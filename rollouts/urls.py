from __future__ import annotations

from django.urls import path

from rollouts import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("live/dashboard", views.dashboard_live, name="dashboard-live"),
    path("rollouts/new", views.rollout_new, name="rollout-new"),
    path("rollouts/<int:rollout_id>", views.rollout_detail, name="rollout-detail"),
    path("rollouts/<int:rollout_id>/status", views.rollout_status, name="rollout-status"),
    path("rollouts/<int:rollout_id>/history", views.rollout_history, name="rollout-history"),
    path("rollouts/<int:rollout_id>/series.json", views.rollout_series_json, name="rollout-series"),
    path("rollouts/<int:rollout_id>/<slug:action>", views.rollout_action, name="rollout-action"),
    path("audit", views.audit_log, name="audit-log"),
    path("experiments", views.experiment_list, name="experiment-list"),
    path("experiments/<int:rollout_id>", views.experiment_detail, name="experiment-detail"),
    path("experiments/<int:rollout_id>/live", views.experiment_detail_live, name="experiment-detail-live"),
    path("audit.csv", views.audit_log_csv, name="audit-log-csv"),
]
