"""Content editors also manage character groups (the README says they do; 0003 predates groups)."""

from django.apps import apps as global_apps
from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP = "Content editors"
MODELS = ["charactergroup", "groupmember"]
ACTIONS = ["add", "change", "delete", "view"]


def grant(apps, schema_editor):
    alias = schema_editor.connection.alias
    create_permissions(global_apps.get_app_config("characters"), verbosity=0, using=alias, apps=apps)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group = Group.objects.using(alias).filter(name=GROUP).first()
    if group is None:  # deleted by an administrator: not recreated
        return
    group.permissions.add(*Permission.objects.using(alias).filter(
        content_type__app_label="characters", codename__in=[f"{a}_{m}" for m in MODELS for a in ACTIONS]))


def revoke(apps, schema_editor):
    alias = schema_editor.connection.alias
    group = apps.get_model("auth", "Group").objects.using(alias).filter(name=GROUP).first()
    if group is not None:
        group.permissions.remove(*group.permissions.filter(
            content_type__app_label="characters", codename__in=[f"{a}_{m}" for m in MODELS for a in ACTIONS]))


class Migration(migrations.Migration):

    dependencies = [("characters", "0005_avatar_checks")]

    operations = [migrations.RunPython(grant, revoke)]
