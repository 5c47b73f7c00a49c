"""Rollup units keep up to nine first requests: a shadow step's window keeps, per latency field, the first pair
of each session on both sides (the paired checks' units and the tail guardrails' bins) and the candidate's
first reply (the tail SLOs'), where a live window keeps at most three (experiments.analysis.shadow)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('experiments', '0007_rollup_units_first_requests'),
    ]

    operations = [
        migrations.AddField(
            model_name='rollupunit',
            name='first3_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first3_id',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first3_k',
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first3_x',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first4_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first4_id',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first4_k',
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first4_x',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first5_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first5_id',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first5_k',
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first5_x',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first6_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first6_id',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first6_k',
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first6_x',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first7_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first7_id',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first7_k',
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first7_x',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first8_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first8_id',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first8_k',
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='rollupunit',
            name='first8_x',
            field=models.FloatField(blank=True, null=True),
        ),
    ]
