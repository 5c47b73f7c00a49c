"""A second connection to the test's PostgreSQL server, beside Django's (another writer, another database)."""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import connection


def connect_beside(dbname: str | None = None, **options: Any) -> psycopg.Connection[Any]:
    """A psycopg connection with Django's credentials, to the test database or to `dbname`."""
    settings = connection.settings_dict
    return psycopg.connect(dbname=dbname or settings["NAME"], user=settings["USER"], host=settings["HOST"],
                           port=settings["PORT"] or 5432, password=settings["PASSWORD"] or None, **options)  # fmt: skip
