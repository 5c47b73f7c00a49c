from __future__ import annotations

from django.urls import path

from evals import api

urlpatterns = [
    path("eval-suites", api.SuitesApi.as_view(), name="api-eval-suites"),
    path("eval-suites/<int:suite_id>", api.SuiteDetailApi.as_view(), name="api-eval-suite"),
    path("eval-suites/<int:suite_id>/items", api.SuiteItemsApi.as_view(), name="api-eval-suite-items"),
    path("eval-runs", api.RunsApi.as_view(), name="api-eval-runs"),
    path("eval-runs/<int:run_id>", api.RunDetailApi.as_view(), name="api-eval-run"),
    path("eval-runs/<int:run_id>/results", api.RunResultsApi.as_view(), name="api-eval-run-results"),
    path("eval-runs/<int:run_id>/cancel", api.RunCancelApi.as_view(), name="api-eval-run-cancel"),
    path("eval-comparisons", api.ComparisonApi.as_view(), name="api-eval-comparison"),
]
