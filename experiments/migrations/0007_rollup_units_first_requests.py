"""Rollup units keep, per latency field of the tail checks, the unit's first request that measured it (time,
id, latency, sketch bucket): the tail guardrails' and SLOs' samples folded look by look (experiments.rollups)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("experiments", "0006_rollup_units_no_fk_constraint"),
    ]

    operations = [
        migrations.AddField(
            model_name="rollupunit",
            name="first0_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first0_id",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first0_k",
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first0_x",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first1_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first1_id",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first1_k",
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first1_x",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first2_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first2_id",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first2_k",
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="rollupunit",
            name="first2_x",
            field=models.FloatField(blank=True, null=True),
        ),
    ]
