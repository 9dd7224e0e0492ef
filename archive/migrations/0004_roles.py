"""The role groups (archive/roles.py) with their permissions."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

from archive.roles import ROLES, ensure_roles


def create_roles(apps, schema_editor) -> None:
    for config in apps.get_app_configs():  # permissions are normally made after migrating
        config.models_module = True
        create_permissions(config, apps=apps, verbosity=0)
        config.models_module = None
    ensure_roles(apps.get_model("auth", "Group"), apps.get_model("auth", "Permission"))


def remove_roles(apps, schema_editor) -> None:
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("archive", "0003_access_labels"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("audit", "0002_append_only_trigger"),
    ]
    operations = [migrations.RunPython(create_roles, remove_roles)]
