from __future__ import annotations

from django.urls import path

from evals import views

urlpatterns = [
    path("evals", views.eval_suite_list_page, name="eval-suite-list"),
    path("evals/suites/<int:suite_id>", views.eval_suite_detail, name="eval-suite-detail"),
    path("evals/suites/<int:suite_id>/run", views.eval_run_start, name="eval-run-start"),
    path("evals/runs", views.eval_run_list, name="eval-run-list"),
    path("evals/runs/live", views.eval_run_list_live, name="eval-run-list-live"),
    path("evals/runs/<int:run_id>", views.eval_run_detail, name="eval-run-detail"),
    path("evals/runs/<int:run_id>/live", views.eval_run_detail_live, name="eval-run-detail-live"),
    path("evals/runs/<int:run_id>/cancel", views.eval_run_cancel, name="eval-run-cancel"),
    path("evals/compare", views.eval_compare, name="eval-compare"),
    path("evals/history/<int:version_id>", views.eval_history, name="eval-history"),
]
