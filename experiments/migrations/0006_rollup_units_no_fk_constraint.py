"""A rollup unit's window is not checked by the database: the check ran once per inserted row at commit, a
quarter of the cost of inserting a window's first unit rows (600,000 at 20 million records; 0.48 of 1.92 s
for 30,000 rows in a test). Only experiments.rollups writes unit rows, for the window it holds locked;
Django's cascade deletes a window's units with it, and retention prunes any left without one."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0005_rollup_units_bytewise"),
    ]

    operations = [
        migrations.AlterField(
            model_name="rollupunit",
            name="window",
            field=models.ForeignKey(
                db_constraint=False, db_index=False, on_delete=django.db.models.deletion.CASCADE,
                related_name="units", to="experiments.rollupwindow",
            ),
        ),
    ]
