"""Issue an API key and print it once."""

import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from keys.models import APIKey, Tier
from keys.services import issue_key

# A hundred years: longer expiries overflow date arithmetic.
MAX_DAYS = 36_500


class Command(BaseCommand):
    # The command needs no system checks, whose warnings would bury its output.
    requires_system_checks = []
    help = (
        "Issue a new API key for a tier. The key is printed alone on the last "
        "line of standard output; it is not stored and cannot be shown again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True, help="Who or what the key is for.")
        parser.add_argument(
            "--tier",
            default="default",
            help="Name of the key's tier (default: %(default)s).",
        )
        parser.add_argument(
            "--expires-in-days",
            type=int,
            default=None,
            help="Days until the key expires. Omit for a key that does not expire.",
        )

    def handle(
        self, *args, name: str, tier: str, expires_in_days: int | None, **options
    ):
        name = name.strip()
        if not name:
            raise CommandError("--name must not be empty.")
        max_name = APIKey._meta.get_field("name").max_length
        if len(name) > max_name:
            raise CommandError(
                f"--name is {len(name)} characters long; the maximum is {max_name}."
            )
        if expires_in_days is not None and not 1 <= expires_in_days <= MAX_DAYS:
            raise CommandError(
                f"--expires-in-days must be between 1 and {MAX_DAYS}, "
                f"not {expires_in_days}."
            )
        try:
            tier_obj = Tier.objects.get(name=tier)
        except Tier.DoesNotExist as exc:
            known = ", ".join(Tier.objects.values_list("name", flat=True)) or "none"
            raise CommandError(
                f"Tier {tier!r} not found. Known tiers: {known}."
            ) from exc

        expires_at = None
        if expires_in_days is not None:
            expires_at = timezone.now() + datetime.timedelta(days=expires_in_days)
        api_key, raw_key = issue_key(name=name, tier=tier_obj, expires_at=expires_at)

        self.stderr.write(
            f"Issued key {api_key.prefix} for {name!r} on tier {tier_obj.name!r}. "
            "It is shown once, below; store it now."
        )
        self.stdout.write(raw_key)
