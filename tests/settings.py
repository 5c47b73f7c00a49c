"""The platform's settings for its test suite: the same in every way but the password hash.

PBKDF2's million rounds take half a second per password on CI's two cores, and the suite creates and logs
in thousands of users. Child processes the tests start inherit DJANGO_SETTINGS_MODULE, so they verify the
same hashes.

Under pytest-xdist (`make test` runs the tests that start no engine on two workers) each worker has its own
test database (pytest-django's suffix) and its own Celery queues (config/queues.py, with a suffix), which the
Celery workers its tests start consume (they inherit PYTEST_XDIST_WORKER), so one worker's tasks never reach
the other's database."""

import os

from config.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if os.environ.get("PYTEST_XDIST_WORKER"):
    from config import queues

    CELERY_QUEUE_SUFFIX = f"-{os.environ['PYTEST_XDIST_WORKER']}"
    CELERY_TASK_DEFAULT_QUEUE = queues.DEFAULT + CELERY_QUEUE_SUFFIX
    CELERY_TASK_ROUTES = queues.task_routes(CELERY_QUEUE_SUFFIX)
