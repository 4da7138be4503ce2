"""Users made for a key of their own were named `key-<the key's prefix>`: seven characters of the secret, shown to
other users (group participants, message authors, invitations). They get random names instead."""

import secrets

from django.conf import settings
from django.db import migrations


def rename_key_users(apps, schema_editor):
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    ApiKey = apps.get_model("chat", "ApiKey")
    taken = set(User.objects.filter(username__startswith="key-").values_list("username", flat=True))
    for key in ApiKey.objects.select_related("user").filter(user__username__startswith="key-llms-"):
        if key.user.username != f"key-{key.prefix}":
            continue
        name = f"key-{secrets.token_hex(6)}"
        while name in taken:
            name = f"key-{secrets.token_hex(6)}"
        taken.add(name)
        User.objects.filter(pk=key.user_id).update(username=name)


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0010_message_ids_count_nothing'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RunPython(rename_key_users, migrations.RunPython.noop),
    ]
