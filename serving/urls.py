from __future__ import annotations

from django.urls import path

from serving import views

urlpatterns = [
    path("models", views.model_version_list_page, name="model-version-list"),
    path("models/<int:version_id>", views.model_version_detail, name="model-version-detail"),
    path("engines", views.engine_list, name="engine-list"),
    path("engines/live", views.engine_list_live, name="engine-list-live"),
    path("engines/<int:worker_id>", views.engine_detail, name="engine-detail"),
    path("engines/<int:worker_id>/live", views.engine_detail_live, name="engine-detail-live"),
]
