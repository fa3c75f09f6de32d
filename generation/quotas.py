"""Hard token quotas per key and per UTC day and month.

Before an upstream call the proxy reserves the request's worst case with one
conditional UPDATE per capped period, so concurrent requests, in any number of
processes, can never reserve past the cap. When the call ends the reservation
is settled to the tokens the upstream reported, or released on failure.
"""

import datetime
import logging
import math
from dataclasses import dataclass

from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from keys.models import APIKey
from proxy_site.errors import QuotaExceeded

from .models import QuotaCounter, UsageRecord

logger = logging.getLogger(__name__)

Period = QuotaCounter.Period


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one request in each capped period's counter."""

    api_key_id: int
    amount: int
    # (period, period_start) of every counter the amount was added to.
    counters: tuple[tuple[str, datetime.date], ...]


def period_start(period: str, now: datetime.datetime) -> datetime.date:
    today = now.astimezone(datetime.UTC).date()
    return today if period == Period.DAY else today.replace(day=1)


def period_end(period: str, now: datetime.datetime) -> datetime.datetime:
    """Return when the period containing `now` ends (the next one starts), in UTC."""
    start = period_start(period, now)
    if period == Period.DAY:
        end = start + datetime.timedelta(days=1)
    elif start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return datetime.datetime.combine(end, datetime.time(), tzinfo=datetime.UTC)


def seconds_until(moment: datetime.datetime) -> int:
    """Return whole seconds from now until `moment`, at least 1."""
    return max(1, math.ceil((moment - timezone.now()).total_seconds()))


def caps(api_key: APIKey) -> list[tuple[str, int]]:
    """Return (period, cap) for each period in which the key has a cap."""
    pairs = [
        (Period.DAY, api_key.effective_tokens_per_day),
        (Period.MONTH, api_key.effective_tokens_per_month),
    ]
    return [(period, cap) for period, cap in pairs if cap is not None]


def reserve(*, api_key: APIKey, amount: int) -> Reservation:
    """Hold `amount` tokens in every capped period, or raise QuotaExceeded.

    Call inside a transaction that also records the request, so that the
    hold and its usage record are committed together.
    """
    now = timezone.now()
    counters = []
    with transaction.atomic():
        for period, cap in caps(api_key):
            start = period_start(period, now)
            counter, _ = QuotaCounter.objects.get_or_create(
                api_key=api_key, period=period, period_start=start
            )
            reserved = (
                QuotaCounter.objects.filter(pk=counter.pk)
                .alias(total=F("used") + F("reserved"))
                .filter(total__lte=cap - amount)
                .update(reserved=F("reserved") + amount)
            )
            if not reserved:
                raise _quota_exceeded(counter.pk, period, cap, amount, now)
            counters.append((period, start))
    return Reservation(api_key_id=api_key.pk, amount=amount, counters=tuple(counters))


def _quota_exceeded(
    counter_pk: int, period: str, cap: int, amount: int, now: datetime.datetime
) -> QuotaExceeded:
    counter = QuotaCounter.objects.get(pk=counter_pk)
    left = max(0, cap - counter.used - counter.reserved)
    return quota_exceeded_error(
        period=period, cap=cap, left=left, amount=amount, now=now
    )


def quota_exceeded_error(
    *, period: str, cap: int, left: int, amount: int, now: datetime.datetime
) -> QuotaExceeded:
    """Build the error for a request of `amount` tokens with `left` of `cap` left."""
    resets_at = period_end(period, now)
    label = "daily" if period == Period.DAY else "monthly"
    return QuotaExceeded(
        f"This API key's {label} token quota has {left} of {cap} tokens left, "
        f"and this request may use up to {amount} (prompt plus max_tokens). "
        f"Lower max_tokens or wait until the quota resets at "
        f"{resets_at.isoformat()}.",
        retry_after=(resets_at - now).total_seconds(),
        extra={"quota_period": period, "quota_resets_at": resets_at.isoformat()},
    )


def settle(reservation: Reservation, *, used_tokens: int) -> None:
    """Replace a reservation with the tokens really used (0 to release it)."""
    if not reservation.counters:
        return
    with transaction.atomic():
        for period, start in reservation.counters:
            QuotaCounter.objects.filter(
                api_key_id=reservation.api_key_id, period=period, period_start=start
            ).update(
                reserved=F("reserved") - reservation.amount,
                used=F("used") + used_tokens,
            )


def usage_summary(api_key: APIKey) -> list[dict]:
    """Return the key's tokens in the current UTC day and month, against its caps.

    For a capped period the counter is read (it includes reservations of
    requests in flight); otherwise the usage records are summed.
    """
    now = timezone.now()
    key_caps = dict(caps(api_key))
    summary = []
    for period, label in ((Period.DAY, "Today"), (Period.MONTH, "This month")):
        start = period_start(period, now)
        cap = key_caps.get(period)
        if cap is not None:
            counter = QuotaCounter.objects.filter(
                api_key=api_key, period=period, period_start=start
            ).first()
            used = counter.used if counter else 0
            reserved = counter.reserved if counter else 0
        else:
            since = datetime.datetime.combine(
                start, datetime.time(), tzinfo=datetime.UTC
            )
            totals = UsageRecord.objects.filter(
                api_key=api_key, created_at__gte=since
            ).aggregate(
                prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
            )
            used = (totals["prompt"] or 0) + (totals["completion"] or 0)
            reserved = 0
        summary.append(
            {
                "period": period,
                "label": label,
                "cap": cap,
                "used": used,
                "reserved": reserved,
                "resets_at": period_end(period, now),
            }
        )
    return summary
