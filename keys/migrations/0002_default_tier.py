"""Create the tier named `default`, so a fresh install can issue keys at once."""

from django.db import migrations


def create_default_tier(apps, schema_editor):
    Tier = apps.get_model("keys", "Tier")
    Tier.objects.get_or_create(
        name="default",
        defaults={"description": "Created at install; change or replace it."},
    )


class Migration(migrations.Migration):
    dependencies = [("keys", "0001_initial")]

    operations = [
        migrations.RunPython(create_default_tier, migrations.RunPython.noop),
    ]
