"""The "Content editors" group: add, change, delete and view system prompts, characters and scenarios; nothing else.

Permissions are made by a post_migrate signal, after every migration has run, so a fresh database has
none yet at this point: they are created here first (create_permissions is idempotent).
"""

from django.apps import apps as global_apps
from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP = "Content editors"
MODELS = {"characters": ["systemprompt", "character"], "scenarios": ["scenario"]}
ACTIONS = ["add", "change", "delete", "view"]


def create_group(apps, schema_editor):
    alias = schema_editor.connection.alias
    for label in MODELS:
        create_permissions(global_apps.get_app_config(label), verbosity=0, using=alias, apps=apps)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    wanted = [(label, f"{action}_{model}") for label, models in MODELS.items() for model in models
              for action in ACTIONS]
    permissions = [Permission.objects.using(alias).get(content_type__app_label=label, codename=codename)
                   for label, codename in wanted]
    group, _ = Group.objects.using(alias).get_or_create(name=GROUP)
    group.permissions.set(permissions)


def delete_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.using(schema_editor.connection.alias).filter(name=GROUP).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("characters", "0002_named_system_prompt_scan_depth_revision"),
        ("scenarios", "0002_scan_depth_position"),
    ]

    operations = [migrations.RunPython(create_group, delete_group)]
