"""The audit trail is append-only below the ORM too: on PostgreSQL a trigger refuses UPDATE and DELETE of
rollout events and approvals (raw SQL, a shell, another client). SQLite, the laptop default, relies on the
models' refusals: Django's test flush empties its tables with DELETE, which such a trigger would stop."""

from typing import Any

from django.db import migrations

TABLES = ("rollouts_rolloutevent", "rollouts_rolloutapproval")

CREATE_FUNCTION = """
CREATE OR REPLACE FUNCTION rollouts_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""


def create_triggers(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(CREATE_FUNCTION, params=None)  # no placeholders: its % are plpgsql's
    for table in TABLES:
        schema_editor.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION rollouts_audit_append_only()"
        )


def drop_triggers(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
    schema_editor.execute("DROP FUNCTION IF EXISTS rollouts_audit_append_only()")


class Migration(migrations.Migration):
    dependencies = [("rollouts", "0002_slack")]

    operations = [
        migrations.AlterModelOptions(name="rolloutapproval", options={"base_manager_name": "objects"}),
        migrations.AlterModelOptions(
            name="rolloutevent", options={"base_manager_name": "objects", "ordering": ("rollout_id", "seq")}
        ),
        migrations.RunPython(create_triggers, drop_triggers),
    ]
