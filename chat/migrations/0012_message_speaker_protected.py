"""A group member that spoke can no longer be deleted: SET_NULL re-attributed its lines to the conversation's
character. Python-side only (Django's collector); the column is unchanged."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('characters', '0006_content_editors_manage_groups'),
        ('chat', '0011_key_users_named_apart_from_their_keys'),
    ]

    operations = [
        migrations.AlterField(
            model_name='message',
            name='speaker',
            field=models.ForeignKey(blank=True, help_text="In a group conversation, the character that wrote this reply; empty: the conversation's character. Characters that spoke cannot be deleted (their lines would change hands); deactivate them instead.", null=True, on_delete=django.db.models.deletion.PROTECT, related_name='spoken_messages', to='characters.character'),
        ),
    ]
