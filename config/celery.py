"""The Celery app. Workers and beat are started by `make run` (Procfile) or docker-compose."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("ramp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
