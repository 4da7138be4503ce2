"""A character's named system prompt and lorebook scan depth; the content revision row."""

import django.core.validators
import django.db.models.deletion
from django.db import migrations, models


def create_revision_row(apps, schema_editor):
    apps.get_model("characters", "ContentRevision").objects.get_or_create(pk=1)


class Migration(migrations.Migration):

    dependencies = [
        ("characters", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="character",
            name="named_system_prompt",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name="characters",
                to="characters.systemprompt", verbose_name="named system prompt",
                help_text="The system prompt this character uses; empty uses the default one. A system prompt "
                          "in use cannot be deleted."),
        ),
        migrations.AlterField(
            model_name="character",
            name="system_prompt",
            field=models.TextField(
                blank=True, verbose_name="own system prompt",
                help_text="Replaces the named (or default) system prompt for this character when set; "
                          "{{original}} in it stands for that prompt."),
        ),
        migrations.AlterField(
            model_name="character",
            name="alternate_greetings",
            field=models.JSONField(
                blank=True, default=list,
                help_text="Other first messages: the chat page lets users cycle through them; API clients pick "
                          "one with the request's 'greeting' (1 = the first alternate)."),
        ),
        migrations.AlterField(
            model_name="character",
            name="description",
            field=models.TextField(
                blank=True,
                help_text="The profile: who the character is, looks, background. Always part of the prompt (may "
                          "be empty when the personality and setting say it all)."),
        ),
        migrations.AddField(
            model_name="character",
            name="scan_depth",
            field=models.PositiveIntegerField(
                blank=True, null=True, verbose_name="lorebook scan depth",
                validators=[django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1000)],
                help_text="How many recent messages are searched for this character's scenario keywords; empty "
                          "uses SCENARIO_SCAN_DEPTH. A scenario's own scan depth wins."),
        ),
        migrations.CreateModel(
            name="ContentRevision",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("number", models.BigIntegerField(default=0)),
            ],
            options={"verbose_name": "content revision"},
        ),
        migrations.RunPython(create_revision_row, migrations.RunPython.noop),
    ]
