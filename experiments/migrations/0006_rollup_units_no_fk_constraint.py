"""A rollup unit's window is not checked by the database: the check ran once per inserted row at commit, a
third of the cost of a window's first look (600,000 rows at 20 million records). Only experiments.rollups
writes unit rows, for the window it holds locked; Django's cascade deletes a window's units with it."""

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
