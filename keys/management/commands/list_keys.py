"""List API keys without their secrets."""

from django.core.management.base import BaseCommand

from keys.models import APIKey


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "List API keys: prefix, name, tier, state and times. Secrets are never shown."
    )

    def handle(self, *args, **options):
        keys = APIKey.objects.select_related("tier").order_by("created_at")
        rows = [
            (
                k.prefix,
                k.name,
                k.tier.name,
                k.state,
                _when(k.created_at),
                _when(k.last_used_at),
                _when(k.expires_at),
            )
            for k in keys
        ]
        header = ("PREFIX", "NAME", "TIER", "STATE", "CREATED", "LAST USED", "EXPIRES")
        widths = [
            max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))
        ]
        for row in [header, *rows]:
            self.stdout.write(
                "  ".join(
                    str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)
                ).rstrip()
            )
        if not rows:
            self.stderr.write(
                "No API keys yet. Issue one with: manage.py issue_key --name NAME"
            )
