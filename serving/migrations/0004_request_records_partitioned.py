"""Request records partitioned by day on PostgreSQL (serving.partitions says why and how); SQLite keeps the
plain table. The model's state does not change: Django sees the same columns, indexes and constraints."""

from typing import Any

from django.conf import settings
from django.db import migrations
from django.utils import timezone


def partition(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    from serving.partitions import table_partition

    table_partition(schema_editor, today=timezone.now().date(), retention_days=settings.RECORD_RETENTION_DAYS)


class Migration(migrations.Migration):
    dependencies = [("serving", "0003_gateway_data_plane")]

    # Reversing leaves the partitioned table: it has the columns, indexes and constraints the earlier state
    # names (with created_at in the unique ones), so the code before this migration runs on it as it is.
    operations = [migrations.RunPython(partition, migrations.RunPython.noop)]
