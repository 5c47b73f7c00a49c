from __future__ import annotations

from django.urls import path

from experiments.api import OutcomeEventsApi

urlpatterns = [path("events", OutcomeEventsApi.as_view(), name="api-outcome-events")]
