"""On PostgreSQL a rollup unit (a session hash, or "r:" and a request id) compares by its bytes: every fold
probes its unique index once per touched session and sorts the touched sessions, and under the database's
collation (C.UTF-8, en_US...) each comparison went through strcoll. The order of units means nothing to
anyone; equality is the same either way. SQLite compares bytes already (BINARY)."""

from typing import Any

from django.db import migrations


def bytewise(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute('ALTER TABLE experiments_rollupunit ALTER COLUMN unit TYPE varchar(100) COLLATE "C"')


def by_default(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE experiments_rollupunit ALTER COLUMN unit TYPE varchar(100) COLLATE pg_catalog.\"default\"")


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0004_rollup_units_by_session"),
    ]

    operations = [migrations.RunPython(bytewise, by_default)]
