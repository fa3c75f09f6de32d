"""Move an API key's expiry later."""

import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.services import MAX_EXPIRY_DAYS, KeyStateError, extend_expiry

from ._common import add_key_argument, get_key


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Extend an API key's expiry by --days days. An expired key is extended "
        "from now, so it works again. A key without an expiry is left unchanged."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_key_argument(parser)
        parser.add_argument(
            "--days",
            type=int,
            required=True,
            help=f"Days to add to the expiry (1 to {MAX_EXPIRY_DAYS}).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Say what the new expiry would be, without changing it.",
        )

    def handle(self, *args, prefix: str, days: int, dry_run: bool, **options):
        if not 1 <= days <= MAX_EXPIRY_DAYS:
            raise CommandError(
                f"--days must be between 1 and {MAX_EXPIRY_DAYS}, not {days}."
            )
        api_key = get_key(prefix)
        by = datetime.timedelta(days=days)
        try:
            expires_at = extend_expiry(api_key=api_key, by=by, dry_run=dry_run)
        except (KeyStateError, ValueError) as exc:
            raise CommandError(str(exc)) from exc

        if options["verbosity"] < 1:
            return
        dry_run_note = " Dry run: nothing was changed." if dry_run else ""
        if expires_at is None:
            self.stdout.write(
                f"The API key {api_key.prefix} does not expire, so there is "
                f"nothing to extend.{dry_run_note}"
            )
            return
        verb = "would expire" if dry_run else "now expires"
        message = (
            f"API key {api_key.prefix} ({api_key.name}) {verb} at "
            f"{expires_at:%Y-%m-%d %H:%M} UTC.{dry_run_note}"
        )
        self.stdout.write(message if dry_run else self.style.SUCCESS(message))
