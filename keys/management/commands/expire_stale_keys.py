"""Expire the active API keys not used for a given number of days."""

import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.services import MAX_EXPIRY_DAYS, expire_unused_keys


def _when(value: datetime.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "never"


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Expire the active API keys not used for --unused-days days, by setting "
        "their expiry to now. A key that was never used counts from its "
        "creation. Expired keys can be extended again with extend_key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--unused-days",
            type=int,
            required=True,
            help="Days without use after which a key expires "
            f"(1 to {MAX_EXPIRY_DAYS}).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="List the keys that would expire, without changing them.",
        )

    def handle(self, *args, unused_days: int, dry_run: bool, verbosity: int, **options):
        if not 1 <= unused_days <= MAX_EXPIRY_DAYS:
            raise CommandError(
                f"--unused-days must be between 1 and {MAX_EXPIRY_DAYS}, "
                f"not {unused_days}."
            )
        stale = expire_unused_keys(
            unused_for=datetime.timedelta(days=unused_days), dry_run=dry_run
        )
        if verbosity < 1:
            return

        for api_key in stale:
            self.stdout.write(
                f"{api_key.prefix}  {api_key.name}  tier {api_key.tier.name}, "
                f"last used {_when(api_key.last_used_at)}"
            )
        if not stale:
            self.stdout.write(
                f"No active API key has been unused for {unused_days} days."
            )
        elif dry_run:
            self.stdout.write(
                f"Dry run: would expire {len(stale)} API key(s) unused for "
                f"{unused_days} days. Nothing was changed."
            )
        else:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Expired {len(stale)} API key(s) unused for {unused_days} days."
                )
            )
