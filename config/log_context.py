"""The request id in every log line of a request: the gateway sets `request_id_var` for the task that serves
a request (and Celery tasks for the request they work on); the logging filter puts it on each record."""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (may be empty) and `request_tag` (" [id]", or nothing) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True
