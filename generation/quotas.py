"""Hard token quotas per key and per UTC day and month.

Before an upstream call the proxy reserves the request's worst case with one
conditional upsert of the capped periods' counters, so concurrent requests,
in any number of processes, can never reserve past the cap. When the call
ends the reservation is settled to the tokens the upstream reported, or
released on failure.
"""

import dataclasses
import datetime
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from keys.models import APIKey
from proxy_site.errors import QuotaExceeded, RequestOverQuota

from .models import QuotaCounter, UsageRecord
from .records import Statement, StatementResult, execute_together

logger = logging.getLogger(__name__)

Period = QuotaCounter.Period


@dataclass(frozen=True)
class QuotaState:
    """One capped period's counter as a statement left it."""

    period: str
    cap: int
    used: int
    reserved: int
    resets_at: datetime.datetime

    @property
    def left(self) -> int:
        return max(0, self.cap - self.used - self.reserved)


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one request in each capped period's counter."""

    api_key_id: int
    amount: int
    # (period, period_start) of every counter the amount was added to.
    counters: tuple[tuple[str, datetime.date], ...]
    # The counters just after the amount was added.
    states: tuple[QuotaState, ...] = ()


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


def capped_periods(api_key: APIKey) -> str:
    """Return the key's capped periods, comma-separated, in reserve()'s order."""
    return ",".join(sorted(period for period, _ in caps(api_key)))


def caps(api_key: APIKey) -> list[tuple[str, int]]:
    """Return (period, cap) for each period in which the key has a cap."""
    pairs = [
        (Period.DAY, api_key.effective_tokens_per_day),
        (Period.MONTH, api_key.effective_tokens_per_month),
    ]
    return [(period, cap) for period, cap in pairs if cap is not None]


def reserve(
    *,
    api_key: APIKey,
    amount: int,
    along_with: Statement | None = None,
    on_result: Callable[[StatementResult], None] | None = None,
    now: datetime.datetime | None = None,
) -> Reservation:
    """Hold `amount` tokens in every capped period, or raise QuotaExceeded.

    One statement adds the amount to each capped period's counter, creating
    counters for a new day or month, and only where it still fits under the
    cap. When a period refuses, the periods that accepted are given back. A
    concurrent request may see them as fuller than they are in between, which
    can reject a request near the cap but never admit one past it.

    `along_with`, a statement of the caller's, runs just before that
    statement, in the same query where the database allows (see
    execute_together), and `on_result` gets its result, also when the
    reservation is then rejected. An amount larger than a whole cap is
    rejected before either runs.

    `now` picks the day and month whose counters hold the amount, by default
    the current time.
    """
    now = now or timezone.now()
    key_caps = caps(api_key)
    if not key_caps:
        if along_with is not None:
            _execute([], along_with, on_result)
        return Reservation(api_key_id=api_key.pk, amount=amount, counters=())
    # Plain strings: the rows come back with the period as a str, and an
    # enum member does not hash like its value.
    periods = {
        str(period): (period_start(period, now), cap)
        for period, cap in sorted(key_caps)
    }
    for period, (start, cap) in periods.items():
        if amount > cap:
            # A new counter is created without the cap check, so an amount
            # larger than the whole cap is rejected before the statement.
            raise _quota_exceeded(api_key, period, start, cap, amount, now)
    # The rows are listed, and so locked, in order of period (see
    # _counter_filter).
    reserve_statement = _reserve_statement(api_key.pk, periods, amount)
    rows = _execute([reserve_statement], along_with, on_result)[0].rows
    states = {period: (used, reserved) for period, used, reserved in rows}
    rejected = [period for period in periods if period not in states]
    if rejected:
        if states:
            _release_counters(api_key.pk, periods, amount, states)
        # The error names the period that resets last, whose reset is the
        # earliest time a request can fit in every rejected period.
        period = max(rejected, key=lambda name: period_end(name, now))
        start, cap = periods[period]
        raise _quota_exceeded(api_key, period, start, cap, amount, now)
    return Reservation(
        api_key_id=api_key.pk,
        amount=amount,
        counters=tuple((period, start) for period, (start, _) in periods.items()),
        states=tuple(
            QuotaState(
                period=period,
                cap=cap,
                used=states[period][0],
                reserved=states[period][1],
                resets_at=period_end(period, now),
            )
            for period, (_, cap) in periods.items()
        ),
    )


def _table() -> str:
    return connection.ops.quote_name(QuotaCounter._meta.db_table)


def _execute(
    statements: list[Statement],
    along_with: Statement | None,
    on_result: Callable[[StatementResult], None] | None,
) -> list[StatementResult]:
    """Run `along_with`, if given, then `statements`.

    Returns the results of `statements`, and passes the result of
    `along_with` to `on_result`.
    """
    if along_with is None:
        return execute_together(connection, statements)
    first, *results = execute_together(connection, [along_with, *statements])
    if on_result is not None:
        on_result(first)
    return results


def _reserve_statement(
    api_key_id: int, periods: dict[str, tuple[datetime.date, int]], amount: int
) -> Statement:
    table = _table()
    values = ", ".join(["(%s, %s, %s, 0, %s)"] * len(periods))
    params: list = []
    for period, (start, _) in periods.items():
        params += [api_key_id, period, start, amount]
    cap_cases = " ".join(f"WHEN {table}.period = %s THEN %s" for _ in periods)
    for period, (_, cap) in periods.items():
        params += [period, cap]
    sql = (
        f"INSERT INTO {table} (api_key_id, period, period_start, used, reserved) "
        f"VALUES {values} "
        "ON CONFLICT (api_key_id, period, period_start) DO UPDATE "
        f"SET reserved = {table}.reserved + excluded.reserved "
        f"WHERE {table}.used + {table}.reserved + excluded.reserved "
        f"<= CASE {cap_cases} END "
        "RETURNING period, used, reserved"
    )
    return sql, params


def _counter_filter(
    api_key_id: int, counters: Iterable[tuple[str, datetime.date]]
) -> tuple[str, list]:
    """Return a WHERE clause and its parameters matching the given counters.

    Where the database locks rows, the clause locks them in order of period,
    the order in which the reservation's upsert takes them. Two statements
    that took a key's day and month rows in opposite orders could deadlock.
    """
    clauses = []
    params: list = [api_key_id]
    for period, start in counters:
        clauses.append("(period = %s AND period_start = %s)")
        params += [period, start]
    table = _table()
    matches = f"api_key_id = %s AND ({' OR '.join(clauses)})"
    if not connection.features.has_select_for_update:
        return matches, params
    return (
        f"id IN (SELECT id FROM {table} WHERE {matches} ORDER BY period FOR UPDATE)",
        params,
    )


def _release_counters(
    api_key_id: int,
    periods: dict[str, tuple[datetime.date, int]],
    amount: int,
    accepted: dict,
) -> None:
    where, params = _counter_filter(
        api_key_id, [(period, periods[period][0]) for period in accepted]
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_table()} SET reserved = reserved - %s WHERE {where}",
            [amount, *params],
        )


def _quota_exceeded(
    api_key: APIKey,
    period: str,
    start: datetime.date,
    cap: int,
    amount: int,
    now: datetime.datetime,
) -> QuotaExceeded:
    counter = QuotaCounter.objects.filter(
        api_key=api_key, period=period, period_start=start
    ).first()
    in_use = (counter.used + counter.reserved) if counter else 0
    left = max(0, cap - in_use)
    return quota_exceeded_error(
        period=period, cap=cap, left=left, amount=amount, now=now
    )


def quota_exceeded_error(
    *, period: str, cap: int, left: int, amount: int, now: datetime.datetime
) -> QuotaExceeded:
    """Build the error for a request of `amount` tokens with `left` of `cap` left."""
    resets_at = period_end(period, now)
    label = "daily" if period == Period.DAY else "monthly"
    if amount > cap:
        return RequestOverQuota(
            f"This request may use up to {amount} tokens (prompt plus "
            f"max_tokens), more than this API key's whole {label} token quota "
            f"of {cap}. Lower max_tokens or shorten the prompt; waiting will "
            "not help.",
            extra={"quota_period": period},
        )
    return QuotaExceeded(
        f"This API key's {label} token quota has {left} of {cap} tokens left, "
        f"and this request may use up to {amount} (prompt plus max_tokens). "
        f"Lower max_tokens or wait until the quota resets at "
        f"{resets_at.isoformat()}.",
        retry_after=(resets_at - now).total_seconds(),
        extra={"quota_period": period, "quota_resets_at": resets_at.isoformat()},
    )


def settle(reservation: Reservation, *, used_tokens: int) -> tuple["QuotaState", ...]:
    """Replace a reservation with the tokens really used (0 to release it).

    Returns the counters as they stand afterwards.
    """
    statement = settle_statement(reservation, used_tokens=used_tokens)
    if statement is None:
        return ()
    [result] = execute_together(connection, [statement])
    return states_after_settle(reservation, result)


def settle_statement(reservation: Reservation, *, used_tokens: int) -> Statement | None:
    """Return the UPDATE that settles a reservation, or None without counters.

    Pass its result to states_after_settle().
    """
    if not reservation.counters:
        return None
    where, params = _counter_filter(reservation.api_key_id, reservation.counters)
    return (
        f"UPDATE {_table()} SET reserved = reserved - %s, used = used + %s "
        f"WHERE {where} RETURNING period, used, reserved",
        [reservation.amount, used_tokens, *params],
    )


def states_after_settle(
    reservation: Reservation, result: StatementResult
) -> tuple["QuotaState", ...]:
    """Return the reservation's counters as the settling UPDATE left them."""
    rows = {period: (used, reserved) for period, used, reserved in result.rows}
    return tuple(
        dataclasses.replace(
            state, used=rows[state.period][0], reserved=rows[state.period][1]
        )
        for state in reservation.states
        if state.period in rows
    )


def tightest(states: Iterable["QuotaState"]) -> "QuotaState | None":
    """Return the capped period with the fewest tokens left, if any."""
    return min(states, key=lambda state: state.left, default=None)


def current_states(api_key: APIKey) -> tuple["QuotaState", ...]:
    """Read the key's capped counters for the current day and month."""
    return tuple(
        QuotaState(
            period=entry["period"],
            cap=entry["cap"],
            used=entry["used"],
            reserved=entry["reserved"],
            resets_at=entry["resets_at"],
        )
        for entry in usage_summary(api_key)
        if entry["cap"] is not None
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
