"""List API keys without their secrets."""

import datetime

from django.core.management.base import BaseCommand, CommandParser

from keys.models import KEY_STATES, APIKey

from ._common import get_tier, key_record, write_json

HEADER = ("PREFIX", "NAME", "TIER", "STATE", "CREATED", "LAST USED", "EXPIRES")


def _when(value: datetime.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def _row(api_key: APIKey) -> tuple[str, ...]:
    return (
        api_key.prefix,
        api_key.name,
        api_key.tier.name,
        api_key.state,
        _when(api_key.created_at),
        _when(api_key.last_used_at),
        _when(api_key.expires_at),
    )


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "List API keys: prefix, name, tier, state and times (UTC), oldest first. "
        "Secrets are never shown."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tier", help="List only the keys of this tier.")
        parser.add_argument(
            "--state",
            choices=KEY_STATES,
            help="List only the keys in this state.",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print a JSON list of objects instead of a table, with every "
            "time in ISO 8601.",
        )

    def handle(self, *args, tier: str | None, state: str | None, **options):
        keys = APIKey.objects.select_related("tier").order_by("created_at")
        if tier is not None:
            keys = keys.filter(tier=get_tier(tier))
        if state is not None:
            keys = keys.in_state(state)
        keys = list(keys)

        if options["json"]:
            write_json(self.stdout, [key_record(api_key) for api_key in keys])
            return
        self._write_table([HEADER, *(_row(api_key) for api_key in keys)])
        if not keys and options["verbosity"] >= 1:
            self.stderr.write(self._empty_hint(filtered=bool(tier or state)))

    def _write_table(self, rows: list[tuple[str, ...]]) -> None:
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
        for row in rows:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            self.stdout.write("  ".join(cells).rstrip())

    def _empty_hint(self, *, filtered: bool) -> str:
        if filtered:
            return "No API key matches the filters."
        return "No API keys yet. Issue one with: manage.py issue_key --name NAME"
