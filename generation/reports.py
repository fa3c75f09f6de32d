"""Usage totals per key or tier and per UTC day or month, aggregated in the database."""

import datetime
from dataclasses import dataclass

from django.db.models import Count, DateField, F, Q, QuerySet, Sum
from django.db.models.functions import TruncDay, TruncMonth

from keys.models import APIKey, Tier

from .models import UsageRecord

Status = UsageRecord.Status

GROUPINGS = ("key", "tier")
PERIODS = ("day", "month")

_TRUNCATIONS = {"day": TruncDay, "month": TruncMonth}
# Columns each grouping selects besides the period: the group, then its label.
_GROUP_FIELDS = {
    "key": ("api_key__prefix", "api_key__name"),
    "tier": ("tier__name",),
}
# Within a period, keys are sorted by name, and keys of the same name by prefix.
_ORDERINGS = {
    "key": ("api_key__name", "api_key__prefix"),
    "tier": ("tier__name",),
}


@dataclass(frozen=True)
class UsageRow:
    """Totals of one key or tier in one period."""

    period_start: datetime.date
    # The key's prefix or the tier's name.
    group: str
    # The key's name, or the tier's name again.
    label: str
    requests: int
    # Requests per status, one entry for every UsageRecord.Status value.
    statuses: dict[str, int]
    # Refused requests per reason code, one entry for every reason of the report.
    refusals: dict[str, int]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class UsageReport:
    """Usage rows of a date range, sorted by period, then by key name or tier."""

    since: datetime.date
    until: datetime.date
    by: str
    period: str
    # Every reason code of the range's refused requests, sorted.
    reasons: list[str]
    rows: list[UsageRow]


@dataclass(frozen=True)
class DayTotal:
    """Requests and tokens (prompt plus completion) of one UTC day."""

    day: datetime.date
    requests: int
    tokens: int


def start_of_day(day: datetime.date) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(), tzinfo=datetime.UTC)


def records_between(
    *,
    since: datetime.date,
    until: datetime.date,
    api_key: APIKey | None = None,
    tier: Tier | None = None,
) -> QuerySet:
    """Return the usage records created from `since` to `until`, both UTC days included.

    `tier` selects the tier a record was made under, which is the key's tier at
    the time of the request.
    """
    records = UsageRecord.objects.filter(created_at__gte=start_of_day(since))
    # date.max has no next day to end the range at, and no record is later.
    if until < datetime.date.max:
        end = start_of_day(until + datetime.timedelta(days=1))
        records = records.filter(created_at__lt=end)
    if api_key is not None:
        records = records.filter(api_key=api_key)
    if tier is not None:
        records = records.filter(tier=tier)
    return records.order_by()


def build_usage_report(
    *,
    since: datetime.date,
    until: datetime.date,
    by: str = "key",
    period: str = "day",
    api_key: APIKey | None = None,
    tier: Tier | None = None,
) -> UsageReport:
    """Count requests, refusals and tokens per key or tier and per day or month.

    Runs two queries whatever the number of records: one for the refusal
    reasons in the range, and one grouped query for the totals.
    """
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {GROUPINGS}, not {by!r}.")
    if period not in PERIODS:
        raise ValueError(f"period must be one of {PERIODS}, not {period!r}.")
    records = records_between(since=since, until=until, api_key=api_key, tier=tier)
    reasons = list(
        records.filter(status=Status.REFUSED)
        .exclude(reason="")
        .values_list("reason", flat=True)
        .distinct()
        .order_by("reason")
    )
    group_fields = _GROUP_FIELDS[by]
    bucket = _TRUNCATIONS[period](
        "created_at", output_field=DateField(), tzinfo=datetime.UTC
    )
    totals = (
        records.annotate(bucket=bucket)
        .values("bucket", *group_fields)
        .annotate(**_aggregates(reasons))
        .order_by("bucket", *_ORDERINGS[by])
    )
    rows = [_row(values, group_fields, reasons) for values in totals]
    return UsageReport(
        since=since, until=until, by=by, period=period, reasons=reasons, rows=rows
    )


def _aggregates(reasons: list[str]) -> dict:
    aggregates = {
        "requests": Count("pk"),
        "prompt_tokens": Sum("prompt_tokens"),
        "completion_tokens": Sum("completion_tokens"),
    }
    for status in Status.values:
        aggregates[f"status_{status}"] = Count("pk", filter=Q(status=status))
    # Reason codes are indexed rather than used as aliases, because a code is
    # free text and an alias must be a plain identifier.
    for index, reason in enumerate(reasons):
        refused = Q(status=Status.REFUSED, reason=reason)
        aggregates[f"reason_{index}"] = Count("pk", filter=refused)
    return aggregates


def _row(values: dict, group_fields: tuple[str, ...], reasons: list[str]) -> UsageRow:
    return UsageRow(
        period_start=values["bucket"],
        group=values[group_fields[0]],
        label=values[group_fields[-1]],
        requests=values["requests"],
        statuses={status: values[f"status_{status}"] for status in Status.values},
        refusals={
            reason: values[f"reason_{index}"] for index, reason in enumerate(reasons)
        },
        prompt_tokens=values["prompt_tokens"],
        completion_tokens=values["completion_tokens"],
    )


def daily_totals(
    *,
    since: datetime.date,
    until: datetime.date,
    api_key: APIKey | None = None,
    tier: Tier | None = None,
) -> list[DayTotal]:
    """Return one DayTotal per UTC day from `since` to `until`, zero for idle days.

    Without `api_key` and `tier` the totals cover every key. One query.
    """
    records = records_between(since=since, until=until, api_key=api_key, tier=tier)
    day = TruncDay("created_at", output_field=DateField(), tzinfo=datetime.UTC)
    per_day = {
        values["day"]: values
        for values in records.annotate(day=day)
        .values("day")
        .annotate(
            requests=Count("pk"),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
        )
    }
    days = (until - since).days + 1
    totals = []
    for offset in range(days):
        current = since + datetime.timedelta(days=offset)
        values = per_day.get(current, {"requests": 0, "tokens": 0})
        totals.append(
            DayTotal(day=current, requests=values["requests"], tokens=values["tokens"])
        )
    return totals
