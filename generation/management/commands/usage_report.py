"""Report requests, refusals and tokens per key or tier and per day or month."""

import csv
import datetime
import json

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from generation.reports import (
    GROUPINGS,
    PERIODS,
    Status,
    UsageReport,
    UsageRow,
    build_usage_report,
)
from keys.models import APIKey, Tier
from keys.services import parse_prefix

FORMATS = ("table", "csv", "json")


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Report usage per API key or per tier and per UTC day or month: requests, "
        "requests per status, refused requests per reason code, and prompt and "
        "completion tokens. Without --since and --until the report covers the "
        "current calendar month up to today. Only periods with requests are listed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--by",
            choices=GROUPINGS,
            default="key",
            help="Total per API key or per tier (default: key). A record counts "
            "for the tier its key had when the request was made.",
        )
        parser.add_argument(
            "--period",
            choices=PERIODS,
            default="day",
            help="Total per UTC day or per calendar month (default: day).",
        )
        parser.add_argument(
            "--since",
            metavar="YYYY-MM-DD",
            help="First UTC day of the report, included (default: the first day "
            "of the current month).",
        )
        parser.add_argument(
            "--until",
            metavar="YYYY-MM-DD",
            help="Last UTC day of the report, included (default: today).",
        )
        parser.add_argument(
            "--key",
            metavar="PREFIX",
            help="Report only the API key with this prefix (or whole key).",
        )
        parser.add_argument(
            "--tier", metavar="NAME", help="Report only requests made under this tier."
        )
        parser.add_argument(
            "--format",
            choices=FORMATS,
            default="table",
            help="Output format: an aligned table (default), CSV with a header "
            "row, or a JSON object.",
        )

    def handle(self, *args, **options) -> None:
        since, until = _date_range(options["since"], options["until"])
        report = build_usage_report(
            since=since,
            until=until,
            by=options["by"],
            period=options["period"],
            api_key=_find_key(options["key"]),
            tier=_find_tier(options["tier"]),
        )
        if options["format"] == "csv":
            self._write_csv(report)
        elif options["format"] == "json":
            self.stdout.write(json.dumps(_report_json(report), indent=2))
        else:
            self._write_table(report)
        if options["verbosity"] >= 1:
            self.stderr.write(_summary(report))

    def _write_csv(self, report: UsageReport) -> None:
        writer = csv.writer(self.stdout, lineterminator="\n")
        writer.writerow(_header(report))
        writer.writerows(_cells(report, row) for row in report.rows)

    def _write_table(self, report: UsageReport) -> None:
        header = [column.upper().replace("_", " ") for column in _header(report)]
        lines = [header, *(_cells(report, row) for row in report.rows)]
        if len(report.rows) > 1:
            lines.append(_total_cells(report))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        for line in lines:
            cells = [
                str(cell).rjust(width) if isinstance(cell, int) else cell.ljust(width)
                for cell, width in zip(line, widths, strict=True)
            ]
            self.stdout.write("  ".join(cells).rstrip())


def _parse_date(value: str, option: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(
            f"{option} must be a date in the form YYYY-MM-DD, not {value!r}."
        ) from exc


def _date_range(
    since: str | None, until: str | None
) -> tuple[datetime.date, datetime.date]:
    today = timezone.now().astimezone(datetime.UTC).date()
    since_day = _parse_date(since, "--since") if since else today.replace(day=1)
    until_day = _parse_date(until, "--until") if until else today
    if until_day < since_day:
        raise CommandError(
            f"--until ({until_day}) is before --since ({since_day}). Give an "
            "--until on or after --since."
        )
    return since_day, until_day


def _find_key(value: str | None) -> APIKey | None:
    if value is None:
        return None
    prefix = parse_prefix(value) or value.removeprefix("sk-")
    try:
        return APIKey.objects.get(prefix=prefix)
    except APIKey.DoesNotExist as exc:
        raise CommandError(
            f"No API key has the prefix {prefix!r}. List keys with: manage.py list_keys"
        ) from exc


def _find_tier(name: str | None) -> Tier | None:
    if name is None:
        return None
    try:
        return Tier.objects.get(name=name)
    except Tier.DoesNotExist as exc:
        known = ", ".join(Tier.objects.values_list("name", flat=True)) or "none"
        raise CommandError(f"Tier {name!r} not found. Known tiers: {known}.") from exc


def _group_columns(report: UsageReport) -> list[str]:
    return ["key", "name"] if report.by == "key" else ["tier"]


def _header(report: UsageReport) -> list[str]:
    return [
        "period",
        *_group_columns(report),
        "requests",
        *Status.values,
        *(f"refused_{reason}" for reason in report.reasons),
        "prompt_tokens",
        "completion_tokens",
    ]


def _period_label(report: UsageReport, period_start: datetime.date) -> str:
    if report.period == "month":
        return period_start.strftime("%Y-%m")
    return period_start.isoformat()


def _cells(report: UsageReport, row: UsageRow) -> list[str | int]:
    group = [row.group, row.label] if report.by == "key" else [row.group]
    return [
        _period_label(report, row.period_start),
        *group,
        row.requests,
        *(row.statuses[status] for status in Status.values),
        *(row.refusals[reason] for reason in report.reasons),
        row.prompt_tokens,
        row.completion_tokens,
    ]


def _total_cells(report: UsageReport) -> list[str | int]:
    columns = zip(*(_cells(report, row) for row in report.rows), strict=True)
    label_count = 1 + len(_group_columns(report))
    labels = ["total", *[""] * (label_count - 1)]
    return [*labels, *(sum(column) for column in list(columns)[label_count:])]


def _report_json(report: UsageReport) -> dict:
    rows = []
    for row in report.rows:
        if report.by == "key":
            group = {"key": row.group, "name": row.label}
        else:
            group = {"tier": row.group}
        rows.append(
            {
                "period": _period_label(report, row.period_start),
                **group,
                "requests": row.requests,
                "statuses": row.statuses,
                # Only the reasons with refusals in this row, so rows stay short.
                "refusals": {
                    reason: count for reason, count in row.refusals.items() if count
                },
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
            }
        )
    return {
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "by": report.by,
        "period": report.period,
        "rows": rows,
    }


def _summary(report: UsageReport) -> str:
    span = f"from {report.since} to {report.until} (UTC)"
    if not report.rows:
        return f"No usage records {span}."
    return (
        f"{len(report.rows)} row(s): usage per {report.by} and {report.period} {span}."
    )
