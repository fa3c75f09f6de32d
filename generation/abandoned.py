"""Release the token reservations of requests whose process died mid-request.

A worker killed mid-request (SIGKILL, out of memory, gunicorn's worker
timeout, a deploy whose graceful timeout ran out) leaves its usage record
pending and its reserved tokens in the quota counters until the day or month
ends. release_records() closes such records as failed with the reason
"abandoned" and subtracts their tokens from the counters they were reserved in.

A request that is still running must never be released here, because its own
settlement releases the same tokens, and a double release would let the key
spend more than its cap. Two rules keep them apart. A request settles only
while its record is at most max_request_age() old, and past that the
UsageTracker leaves the pending record and its reservation to this module.
The release_abandoned command takes only records older than
min_release_age(), which adds a margin to max_request_age().
"""

import datetime
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, QuerySet
from django.db.models.functions import Greatest
from django.utils import timezone

from keys.models import APIKey

from .models import QuotaCounter, UsageRecord
from .quotas import period_start

logger = logging.getLogger(__name__)

Status = UsageRecord.Status
ABANDONED = "abandoned"
# Maximum wait of the openai client between two attempts. It follows a
# Retry-After of up to 120 s, and backs off at most 8 s otherwise (openai 3.63,
# openai/_constants.py).
MAX_RETRY_WAIT_SECONDS = 120
# Waits of up to PROXY_UPSTREAM_TIMEOUT in one attempt: for a pooled
# connection, to connect, to send the body, and for the response headers.
TIMEOUTS_PER_ATTEMPT = 4
# The request's own work around the upstream call: rate limits, counting the
# prompt's tokens, and the database writes.
LOCAL_WORK_SECONDS = 60
# Added to max_request_age() for the release. It covers a clock difference
# between the workers' hosts and the command's, and a settling query that
# started just before max_request_age() and runs slowly.
RELEASE_MARGIN_SECONDS = 300


def max_request_age() -> datetime.timedelta:
    """Return the age past which a request leaves its reservation to the release.

    The age counts from the record's created_at, the request's start. A
    request that keeps to its limits ends well before it: the upstream call
    with every retry, then at most PROXY_MAX_STREAM_SECONDS of stream and one
    last read.
    """
    timeout = settings.PROXY_UPSTREAM_TIMEOUT
    attempts = settings.PROXY_UPSTREAM_MAX_RETRIES + 1
    call = attempts * TIMEOUTS_PER_ATTEMPT * timeout
    retry_waits = (attempts - 1) * MAX_RETRY_WAIT_SECONDS
    stream = settings.PROXY_MAX_STREAM_SECONDS + timeout
    return _age(LOCAL_WORK_SECONDS + call + retry_waits + stream)


def min_release_age() -> datetime.timedelta:
    """Return the youngest age at which a pending record may be released."""
    return _age(max_request_age().total_seconds() + RELEASE_MARGIN_SECONDS)


def _age(seconds: float) -> datetime.timedelta:
    """Return `seconds` as a timedelta, or timedelta.max if it does not fit.

    timedelta.max is about 2.7 million years. Settings that add up to more
    let a request keep its reservation however long it runs.
    """
    try:
        return datetime.timedelta(seconds=seconds)
    except OverflowError:
        return datetime.timedelta.max


@dataclass
class ReleaseSummary:
    """Records closed and tokens released, in total and per API key id."""

    records: int = 0
    tokens: int = 0
    records_by_key: Counter = field(default_factory=Counter)
    tokens_by_key: Counter = field(default_factory=Counter)

    def add(self, api_key_id: int, tokens: int) -> None:
        self.records += 1
        self.tokens += tokens
        self.records_by_key[api_key_id] += 1
        self.tokens_by_key[api_key_id] += tokens


def abandoned_records(cutoff: datetime.datetime) -> QuerySet:
    """Return the pending records created before `cutoff`, oldest id first."""
    return UsageRecord.objects.filter(
        status=Status.PENDING, created_at__lt=cutoff
    ).order_by("pk")


def count_abandoned(cutoff: datetime.datetime) -> ReleaseSummary:
    """Sum what release_abandoned() would release now, changing nothing."""
    summary = ReleaseSummary()
    rows = abandoned_records(cutoff).values_list(
        "api_key_id", "reserved_tokens", "reserved_periods"
    )
    for api_key_id, tokens, periods in rows.iterator():
        summary.add(api_key_id, _released_tokens(tokens, periods))
    return summary


def release_abandoned(cutoff: datetime.datetime, *, batch_size: int) -> ReleaseSummary:
    """Close the pending records created before `cutoff` and release their tokens.

    Each batch is one transaction. Its SELECT locks the batch's records and
    skips records that another run or a settling request holds locked.
    """
    summary = ReleaseSummary()
    while True:
        with transaction.atomic():
            batch = abandoned_records(cutoff).select_for_update(skip_locked=True)
            ids = list(batch.values_list("pk", flat=True)[:batch_size])
            if not ids:
                return summary
            release_records(ids, summary)


def release_records(ids: list[int], summary: ReleaseSummary) -> None:
    """Close the records of `ids` that are still pending, and release their tokens.

    Only the records that the conditional UPDATE changed are released, so a
    record settled or released since it was selected is left alone. Call it
    inside a transaction, so that a failure releases nothing.
    """
    changed = _close_pending(ids)
    # NOTE: records written before reserved_periods existed have it empty, so
    # they are closed without releasing any tokens.
    records = UsageRecord.objects.filter(pk__in=changed).values_list(
        "api_key_id",
        "reserved_tokens",
        "prompt_tokens",
        "completion_tokens",
        "reserved_periods",
        "created_at",
    )
    amounts: dict[tuple[int, str, datetime.date], _Amounts] = defaultdict(_Amounts)
    for api_key_id, tokens, prompt, completion, periods, created_at in records:
        summary.add(api_key_id, _released_tokens(tokens, periods))
        for period in _split_periods(periods):
            start = period_start(period, created_at)
            amount = amounts[(api_key_id, period, start)]
            amount.reserved += tokens
            # A record shows tokens only when its request got the upstream's
            # reply and then failed to settle, and those were used.
            amount.used += prompt + completion
    _release_counters(amounts)


@dataclass
class _Amounts:
    """Tokens to take from one counter's reserved and add to its used."""

    reserved: int = 0
    used: int = 0


def _close_pending(ids: list[int]) -> list[int]:
    """Mark the records of `ids` that are still pending as abandoned.

    Returns the ids of the records changed.
    """
    meta = UsageRecord._meta

    def column(name: str) -> str:
        return connection.ops.quote_name(meta.get_field(name).column)

    settled_at = meta.get_field("settled_at").get_db_prep_save(
        timezone.now(), connection
    )
    placeholders = ", ".join(["%s"] * len(ids))
    sql = (
        f"UPDATE {connection.ops.quote_name(meta.db_table)} "
        f"SET {column('status')} = %s, {column('reason')} = %s, "
        f"{column('settled_at')} = %s "
        f"WHERE {column('id')} IN ({placeholders}) AND {column('status')} = %s "
        f"RETURNING {column('id')}"
    )
    params = [Status.FAILED, ABANDONED, settled_at, *ids, Status.PENDING]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def _split_periods(periods: str) -> list[str]:
    return [period for period in periods.split(",") if period]


def _released_tokens(tokens: int, periods: str) -> int:
    """Return the tokens a record's release takes from the counters.

    A key without a token cap reserves in no counter, although its record
    stores the worst case in reserved_tokens, so its release frees nothing.
    """
    return tokens if _split_periods(periods) else 0


def _release_counters(amounts: dict[tuple[int, str, datetime.date], _Amounts]) -> None:
    """Move each counter's amounts from reserved (stopping at 0) to used.

    The rows are updated in order of key and period, the order in which a
    reservation or a settlement locks one key's rows, so that the command
    takes row locks in the same order as requests do.
    """
    for (api_key_id, period, start), amount in sorted(
        amounts.items(), key=lambda item: item[0]
    ):
        counters = QuotaCounter.objects.filter(
            api_key_id=api_key_id, period=period, period_start=start
        )
        short = counters.filter(reserved__lt=amount.reserved).values_list(
            "reserved", flat=True
        )
        for reserved in short:
            logger.warning(
                "Quota counter of key %s, %s %s, has only %s reserved tokens, "
                "fewer than the %s to release, so it is set to 0.",
                api_key_id,
                period,
                start,
                reserved,
                amount.reserved,
            )
        counters.update(
            reserved=Greatest(F("reserved") - amount.reserved, 0),
            used=F("used") + amount.used,
        )


def key_prefixes(api_key_ids: Iterable[int]) -> dict[int, str]:
    """Return the public prefix of each API key id."""
    return dict(
        APIKey.objects.filter(pk__in=list(api_key_ids)).values_list("pk", "prefix")
    )
