"""Give an API key a new secret and print it once."""

import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.models import APIKey
from keys.services import MAX_GRACE, KeyStateError, rotate_key

from ._common import add_key_argument, get_key, issued_record, write_json

MAX_GRACE_MINUTES = int(MAX_GRACE.total_seconds() // 60)


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Rotate an API key: give it a new secret, keeping its prefix, name, tier, "
        "limits and usage history. The old key stops working at once, or after "
        "--grace-minutes. The new key is printed alone on the last line of "
        "standard output; it is not stored and cannot be shown again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_key_argument(parser)
        parser.add_argument(
            "--grace-minutes",
            type=int,
            default=0,
            help="Minutes the old key keeps working, so that clients can switch "
            f"(0 to {MAX_GRACE_MINUTES}; default: %(default)s, it stops at once). "
            "Rotating again during a grace period ends that period.",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print one JSON object with prefix, key, name, tier, expires_at "
            "and previous_key_expires_at.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check that the key can be rotated and say what would happen, "
            "without changing it.",
        )

    def handle(self, *args, **options) -> None:
        grace_minutes = options["grace_minutes"]
        if not 0 <= grace_minutes <= MAX_GRACE_MINUTES:
            raise CommandError(
                f"--grace-minutes must be between 0 and {MAX_GRACE_MINUTES}, "
                f"not {grace_minutes}."
            )
        grace = datetime.timedelta(minutes=grace_minutes)
        api_key = get_key(options["prefix"])
        if api_key.state != "active":
            raise CommandError(
                f"The API key {api_key.prefix} is {api_key.state}; only an active "
                "key can be rotated."
            )

        if options["dry_run"]:
            if options["verbosity"] >= 1:
                self.stdout.write(
                    f"Dry run: would rotate API key {api_key.prefix} "
                    f"({api_key.name}); {self._grace_phrase(grace)}. "
                    "Nothing was changed."
                )
            return
        try:
            raw_key = rotate_key(api_key=api_key, grace=grace)
        except KeyStateError as exc:
            # The key was revoked or expired since it was read above.
            raise CommandError(str(exc)) from exc

        if options["verbosity"] >= 1:
            self.stderr.write(self._explanation(api_key))
        if options["json"]:
            record = issued_record(api_key, raw_key)
            expires = api_key.previous_key_expires_at
            record["previous_key_expires_at"] = expires.isoformat() if expires else None
            write_json(self.stdout, record)
        else:
            self.stdout.write(raw_key)

    def _grace_phrase(self, grace: datetime.timedelta) -> str:
        if not grace:
            return "the old key would stop working at once"
        minutes = int(grace.total_seconds() // 60)
        return f"the old key would keep working for {minutes} minute(s)"

    def _explanation(self, api_key: APIKey) -> str:
        if api_key.previous_key_expires_at is None:
            old_key = "The old key no longer works."
        else:
            until = f"{api_key.previous_key_expires_at:%Y-%m-%d %H:%M:%S} UTC"
            old_key = f"The old key works until {until}."
        return (
            f"Rotated key {api_key.prefix} ({api_key.name}). {old_key} "
            "The new key is shown once, below; store it now."
        )
