"""Shadow pairs carry their commit order on PostgreSQL, as request records do (`serving.partitions`): the
id of the transaction that wrote the pair (`commit_xid`, not in the model: the database sets it), so a
shadow step's looks fold only the pairs committed since the previous one (experiments.rollups). SQLite's
single writer gives ids that only grow: the id is the order there, and the table is left as it is."""

from typing import Any

from django.db import migrations

from serving.partitions import COMMIT_XID_DEFAULT

TABLE = "serving_shadowpair"


def add_commit_order(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"ALTER TABLE {TABLE} ADD COLUMN commit_xid bigint NOT NULL DEFAULT {COMMIT_XID_DEFAULT}")
    schema_editor.execute(f"CREATE INDEX {TABLE}_rollout_commit ON {TABLE} (rollout_id, commit_xid)")


def drop_commit_order(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"ALTER TABLE {TABLE} DROP COLUMN commit_xid")


class Migration(migrations.Migration):
    dependencies = [
        ("serving", "0009_request_records_no_version_constraint"),
    ]

    operations = [migrations.RunPython(add_commit_order, drop_commit_order)]
