"""Give the install-time `default` tier a request rate, so no fresh install is unlimited."""

from django.db import migrations

DEFAULT_RATE = "60/m"


def add_default_rate(apps, schema_editor):
    Tier = apps.get_model("keys", "Tier")
    Tier.objects.filter(
        name="default", rate_limits="", tokens_per_day=None, tokens_per_month=None
    ).update(rate_limits=DEFAULT_RATE)


class Migration(migrations.Migration):
    dependencies = [("keys", "0003_promptrule_apikey_rate_limits_apikey_tokens_per_day_and_more")]

    operations = [migrations.RunPython(add_default_rate, migrations.RunPython.noop)]
