from __future__ import annotations

import os

import pytest

from config.tasks import ping
from tests.support.processes import celery_worker


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_round_trips_a_task_through_the_broker() -> None:
    with celery_worker(name="smoke") as worker:
        result = ping.delay("hello").get(timeout=30)
    assert result["echo"] == "hello"
    # It ran in the worker's process tree, not in this one.
    assert result["worker_pid"] != os.getpid()
    assert worker.returncode is not None
