"""Lorebook scan depth and insertion position per scenario."""

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("scenarios", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="scenario",
            name="scan_depth",
            field=models.PositiveIntegerField(
                blank=True, null=True,
                validators=[django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1000)],
                help_text="How many recent messages are searched for the keywords; empty uses the character's "
                          "lorebook scan depth, else SCENARIO_SCAN_DEPTH."),
        ),
        migrations.AddField(
            model_name="scenario",
            name="position",
            field=models.CharField(
                choices=[("before_char", "Before the character's profile"),
                         ("after_char", "After the profile, with the reply's context")],
                default="after_char", max_length=16,
                help_text="Where the text goes in the prompt. Before the profile changes the prompt's first "
                          "message, so the model re-reads it whenever the scenario comes or goes (slower)."),
        ),
    ]
