from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny

from accounts.views import ThrottledLoginView
from config import health

api_v1 = [
    path("", include("accounts.urls_api")),
    path("", include("serving.urls_api")),
    path("", include("experiments.urls_api")),
    path("", include("evals.urls_api")),
    path("", include("rollouts.urls_api")),
]

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("login/", ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/v1/", include(api_v1)),
    # The schema and its docs are public: they describe the API, they hold no data.
    path("api/schema/", SpectacularAPIView.as_view(permission_classes=[AllowAny]), name="api-schema"),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(url_name="api-schema", permission_classes=[AllowAny]),
        name="api-docs",
    ),
    path("", include("rollouts.urls_slack")),
    path("", include("evals.urls")),
    path("", include("serving.urls")),
    path("", include("rollouts.urls")),
]

handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
