"""Issue API keys and print them once."""

import datetime

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from keys.models import APIKey, Tier
from keys.services import MAX_EXPIRY_DAYS, issue_key
from keys.validators import validate_no_control_characters

from ._common import ISSUED_FIELDS, get_tier, issued_record, write_csv, write_json

# Keys issued by one command. The whole batch is one transaction.
MAX_COUNT = 1000


class Command(BaseCommand):
    # The command needs no system checks, whose warnings would bury its output.
    requires_system_checks = []
    help = (
        "Issue a new API key for a tier. The key is printed alone on the last "
        "line of standard output; it is not stored and cannot be shown again. "
        "With --count, issue a batch and print it as CSV or JSON."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--name",
            required=True,
            help="Who or what the key is for. With --count, each key gets this "
            "name followed by -1, -2 and so on.",
        )
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
        parser.add_argument(
            "--count",
            type=int,
            default=None,
            help=f"Issue this many keys at once, at most {MAX_COUNT}, printed as "
            "CSV unless --format json is given.",
        )
        parser.add_argument(
            "--format",
            choices=["csv", "json"],
            default=None,
            help="Print the key, or the batch, as CSV with a header row or as "
            "JSON instead of the bare key.",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print one JSON object with prefix, key, name, tier and "
            "expires_at (a list of them with --count). Same as --format json.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check the arguments and say what would be issued, without "
            "issuing anything.",
        )

    def handle(self, *args, **options) -> None:
        output_format = self._output_format(options)
        count = options["count"]
        names = self._names(options["name"].strip(), count)
        expires_at = self._expiry(options["expires_in_days"])
        tier = get_tier(options["tier"])

        if options["dry_run"]:
            self._report_dry_run(names, tier, expires_at, options["verbosity"])
            return
        with transaction.atomic():
            issued = [
                issue_key(name=n, tier=tier, expires_at=expires_at) for n in names
            ]

        if options["verbosity"] >= 1:
            self.stderr.write(self._explanation(issued, tier))
        records = [issued_record(api_key, raw_key) for api_key, raw_key in issued]
        if output_format == "json":
            write_json(self.stdout, records if count is not None else records[0])
        elif output_format == "csv":
            write_csv(self.stdout, ISSUED_FIELDS, records)
        else:
            self.stdout.write(issued[0][1])

    def _output_format(self, options: dict) -> str | None:
        if options["json"] and options["format"] == "csv":
            raise CommandError("--json and --format csv contradict each other.")
        if options["json"]:
            return "json"
        if options["count"] is not None and options["format"] is None:
            return "csv"
        return options["format"]

    def _names(self, name: str, count: int | None) -> list[str]:
        if not name:
            raise CommandError("--name must not be empty.")
        try:
            validate_no_control_characters(name)
        except ValidationError as exc:
            raise CommandError(f"--name: {exc.messages[0]}") from exc
        if count is not None and not 1 <= count <= MAX_COUNT:
            raise CommandError(
                f"--count must be between 1 and {MAX_COUNT}, not {count}."
            )
        names = (
            [name] if count is None else [f"{name}-{i}" for i in range(1, count + 1)]
        )
        max_name = APIKey._meta.get_field("name").max_length
        if len(names[-1]) > max_name:
            raise CommandError(
                f"--name makes a key name {len(names[-1])} characters long; the "
                f"maximum is {max_name}."
            )
        return names

    def _expiry(self, days: int | None) -> datetime.datetime | None:
        if days is None:
            return None
        if not 1 <= days <= MAX_EXPIRY_DAYS:
            raise CommandError(
                f"--expires-in-days must be between 1 and {MAX_EXPIRY_DAYS}, "
                f"not {days}."
            )
        return timezone.now() + datetime.timedelta(days=days)

    def _explanation(self, issued: list[tuple[APIKey, str]], tier: Tier) -> str:
        if len(issued) == 1:
            api_key = issued[0][0]
            return (
                f"Issued key {api_key.prefix} for {api_key.name!r} on tier "
                f"{tier.name!r}. It is shown once, below; store it now."
            )
        return (
            f"Issued {len(issued)} keys on tier {tier.name!r}. They are shown "
            "once, below; store them now."
        )

    def _report_dry_run(
        self,
        names: list[str],
        tier: Tier,
        expires_at: datetime.datetime | None,
        verbosity: int,
    ) -> None:
        if verbosity < 1:
            return
        expiry = (
            f"expiring at {expires_at:%Y-%m-%d %H:%M} UTC"
            if expires_at
            else ("without expiry")
        )
        label = repr(names[0]) if len(names) == 1 else f"{names[0]!r} to {names[-1]!r}"
        self.stdout.write(
            f"Dry run: would issue {len(names)} key(s) named {label} on tier "
            f"{tier.name!r}, {expiry}. Nothing was issued."
        )
