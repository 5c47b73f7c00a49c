from django.db import migrations, models


def ended_rollouts_released(apps, schema_editor):
    """Rollouts that ended before engines followed rollouts let nothing go now: their versions' engines may
    have been started again since, on purpose."""
    Rollout = apps.get_model("rollouts", "Rollout")
    Rollout.objects.filter(state__in=["promoted", "rolled_back", "aborted"], engines_released_at__isnull=True).update(
        engines_released_at=models.F("ended_at")
    )


class Migration(migrations.Migration):

    dependencies = [
        ("rollouts", "0004_analysis_comparisons"),
    ]

    operations = [
        migrations.AddField(
            model_name="rollout",
            name="engines_released_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(ended_rollouts_released, migrations.RunPython.noop),
    ]
