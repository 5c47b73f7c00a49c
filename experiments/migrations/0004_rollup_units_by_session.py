"""Rollup units are looked up by (window, session) in every arm: the unique constraint leads with the unit,
and its index serves the window's foreign key too. On PostgreSQL the table leaves room on each page so a
fold's update of a unit stays on its page without touching the indexes (a HOT update)."""

from typing import Any

import django.db.models.deletion
from django.db import migrations, models


def room_for_updates(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE experiments_rollupunit SET (fillfactor = 70)")


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0003_rollups"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="rollupunit",
            name="rollup_unit_unique",
        ),
        migrations.AlterField(
            model_name="rollupunit",
            name="window",
            field=models.ForeignKey(
                db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name="units",
                to="experiments.rollupwindow",
            ),
        ),
        migrations.AddConstraint(
            model_name="rollupunit",
            constraint=models.UniqueConstraint(fields=("window", "unit", "arm"), name="rollup_unit_unique"),
        ),
        migrations.RunPython(room_for_updates, migrations.RunPython.noop),
    ]
