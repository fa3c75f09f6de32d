"""Usage records: one per authenticated request, kept in step with the quota."""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError, connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from keys.models import APIKey
from proxy_site import metrics
from proxy_site.errors import (
    PromptRejected,
    QuotaExceeded,
    as_api_exception,
    error_code,
)
from proxy_site.middleware import current_request_log

from . import quotas
from .abandoned import max_request_age
from .models import UsageRecord
from .policy import PreparedChat
from .records import (
    Statement,
    StatementResult,
    check_settled,
    execute_together,
    insert_record,
    inserting,
    settling_update,
    update_settled_fields,
)

logger = logging.getLogger(__name__)

Status = UsageRecord.Status
T = TypeVar("T")
# A statement that saves a usage record, its database, and the function, if
# any, that takes the statement's result.
RecordWrite = tuple[
    BaseDatabaseWrapper, Statement, Callable[[StatementResult], None] | None
]


class UsageTracker:
    """Record one request's outcome, and hold and settle its token quota.

    Use it as a context manager around everything after authentication. An
    exception leaving the block releases any reservation and saves the record
    as refused (before the upstream call) or failed (from the call on).
    """

    def __init__(self, *, api_key: APIKey, endpoint: str, request_id: str) -> None:
        self.api_key = api_key
        self.record = UsageRecord(
            api_key=api_key,
            tier=api_key.tier,
            endpoint=endpoint,
            request_id=request_id,
            status=Status.PENDING,
        )
        self.reservation: quotas.Reservation | None = None
        # The capped periods' counters as this request last left them.
        self.quota_states: tuple[quotas.QuotaState, ...] = ()
        self.called_upstream = False
        self._upstream_stream_open = False
        # The access log line and the request metrics read the outcome here.
        request_log = current_request_log()
        if request_log is not None:
            request_log.usage_record = self.record

    def __enter__(self) -> "UsageTracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc is None or self._outlived_reservation():
            return False
        # The record is saved even if releasing the reservation or naming the
        # error fails, so that it shows the outcome.
        try:
            self._record_failure(exc)
            self._release_or_leave_pending()
        finally:
            self._save()
        return False

    def _release_or_leave_pending(self) -> None:
        """Release the reservation; if the database fails, leave the record pending.

        A pending record with its reserved tokens is what release_abandoned
        looks for, so the reservation is released once the record is old
        enough, and the tokens the record shows are charged then.
        """
        try:
            self._release()
        except DatabaseError:
            self.record.status = Status.PENDING
            self.record.settled_at = None
            logger.warning(
                "Releasing the reservation of request %s failed, so its record "
                "stays pending for release_abandoned.",
                self.record.request_id,
            )
            raise

    def _record_failure(self, exc: BaseException) -> None:
        self.record.status = Status.FAILED if self.called_upstream else Status.REFUSED
        self.record.http_status = 500
        self.record.reason = "internal_error"
        api_exception = as_api_exception(exc)
        if api_exception is not None:
            try:
                reason = error_code(api_exception)
            except Exception:
                # The exception handler fails the same way, so the client
                # gets a 500, as recorded.
                logger.exception(
                    "Building the error response for %s failed.", type(exc).__name__
                )
                return
            self.record.http_status = api_exception.status_code
            self.record.reason = reason
        if isinstance(exc, PromptRejected):
            self.record.rule_id = exc.extra.get("rule_id")

    def reserve(self, chat: PreparedChat) -> None:
        """Hold the request's worst case and save the record as in flight.

        Raises QuotaExceeded when even the exact worst case does not fit.
        """
        self.record.model = chat.model
        if self.api_key.tier.store_prompts:
            self.record.prompt_text = "\n\n".join(chat.client_texts)
        # Counting tokens needs the model's encoding, which is slow to load and
        # large, so the cheap bound is tried first. Only when the bound does
        # not fit is the prompt counted, and the exact worst case tried.
        try:
            self._reserve(chat.worst_case_bound)
        except QuotaExceeded:
            if self.record.pk is not None:
                # The record went in with the rejected bound as its
                # reservation. It is set back to 0 before the slow count, so
                # that a worker killed meanwhile leaves no tokens for
                # release_abandoned to take from other requests.
                update_settled_fields(self.record)
            if chat.worst_case_tokens >= chat.worst_case_bound:
                raise
            self._reserve(chat.worst_case_tokens)
        self.quota_states = self.reservation.states

    def _reserve(self, amount: int) -> None:
        """Reserve `amount` and save the record with it in the same query.

        The record goes in as the reservation is tried, so a rejected request
        has its record saved already, with no tokens reserved. A second
        attempt writes its own amount to the saved record.
        """
        self.record.reserved_tokens = amount
        self.record.reserved_periods = quotas.capped_periods(self.api_key)
        # The reservation takes its day and month from the record's created_at,
        # so that a request started at 23:59:59.999 UTC and reserved a moment
        # later reserves in the counters of the day that the record names.
        now = self.record.created_at
        write = self._in_flight_write()
        try:
            if write is None or write[0].alias != connection.alias:
                self.reservation = quotas.reserve(
                    api_key=self.api_key, amount=amount, now=now
                )
                if self.record.pk is None:
                    insert_record(self.record)
                else:
                    update_settled_fields(self.record)
                return
            _, statement, on_result = write
            self.reservation = quotas.reserve(
                api_key=self.api_key,
                amount=amount,
                along_with=statement,
                on_result=on_result,
                now=now,
            )
        except Exception:
            # Rejected or failed, the attempt leaves nothing reserved.
            self.record.reserved_tokens = 0
            raise

    def _in_flight_write(self) -> RecordWrite | None:
        """Return the statement that saves the record as in flight, and its database.

        The third item, if any, takes the statement's result. Returns None
        where the record's INSERT cannot go with the reservation (see
        inserting).
        """
        if self.record.pk is None:
            return inserting(self.record)
        # No result check here: a record deleted in flight makes the settling
        # UPDATE fail (check_settled), after the reservation is settled.
        record_connection, update = settling_update(self.record)
        return record_connection, update, None

    def call_upstream(self, call: Callable[[], T], *, stream: bool = False) -> T:
        """Run the upstream call, timing it for the record and the metrics.

        With `stream`, a call that returns (the upstream's response, still
        being read) stays counted as in flight until `end_upstream_stream`
        is called.
        """
        self.called_upstream = True
        release_pooled_connection()
        started = time.monotonic()
        metrics.UPSTREAM_IN_FLIGHT.inc()
        result_is_stream = False
        try:
            result = call()
            result_is_stream = stream
            return result
        finally:
            elapsed = time.monotonic() - started
            self.record.upstream_latency_ms = round(elapsed * 1000)
            metrics.UPSTREAM_LATENCY.labels(endpoint=self.record.endpoint).observe(
                elapsed
            )
            if result_is_stream:
                self._upstream_stream_open = True
            else:
                metrics.UPSTREAM_IN_FLIGHT.dec()

    def end_upstream_stream(self) -> None:
        """Count the upstream stream as ended; later calls do nothing."""
        if self._upstream_stream_open:
            self._upstream_stream_open = False
            metrics.UPSTREAM_IN_FLIGHT.dec()

    def succeed(self, *, prompt_tokens: int, completion_tokens: int) -> None:
        """Settle the reservation to the upstream's usage and close the record."""
        self.settle(
            status=Status.SUCCEEDED,
            http_status=200,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def settle(
        self,
        *,
        status: str,
        http_status: int,
        prompt_tokens: int,
        completion_tokens: int,
        reason: str = "",
    ) -> None:
        """Charge the tokens used, release the rest, and close the record.

        A stream that fails or loses its client part-way is settled here too,
        charged for what was generated before it ended. A request older than
        max_request_age() writes nothing (see _outlived_reservation).
        """
        if self._outlived_reservation():
            return
        self.record.status = status
        self.record.http_status = http_status
        self.record.reason = reason
        self.record.prompt_tokens = prompt_tokens
        self.record.completion_tokens = completion_tokens
        used = prompt_tokens + completion_tokens
        if self.reservation is not None and self._settle_with_record(used):
            return
        if self.reservation is not None:
            self.quota_states = quotas.settle(self.reservation, used_tokens=used)
            self.reservation = None
        self._save()

    def _settle_with_record(self, used_tokens: int) -> bool:
        """Settle the reservation and save the record in one query, if possible.

        Returns False, having written nothing, when the two cannot go
        together: the record is not saved yet, the reservation has no
        counter, or the record is in another database. If the query fails,
        the quota is settled on its own and the error raised.
        """
        settle = quotas.settle_statement(self.reservation, used_tokens=used_tokens)
        if settle is None or self.record.pk is None:
            return False
        self.record.settled_at = timezone.now()
        record_connection, update = settling_update(self.record)
        if record_connection.alias != connection.alias:
            return False
        # The record first: the key's counter rows, which all its requests
        # share, stay locked only from the counters' UPDATE to the commit.
        try:
            updated, settled = execute_together(connection, [update, settle])
        except DatabaseError:
            # Neither statement took effect. Charge the tokens anyway, since
            # the upstream replied. A stream has no error path that would
            # release the reservation otherwise.
            # When another session holds the counters' rows past the
            # statement timeout, this fails too, and so does the release on
            # the way out, which then leaves the record pending for
            # release_abandoned.
            self.quota_states = quotas.settle(self.reservation, used_tokens=used_tokens)
            self.reservation = None
            raise
        self.quota_states = quotas.states_after_settle(self.reservation, settled)
        self.reservation = None
        check_settled(self.record, updated)
        return True

    def _outlived_reservation(self) -> bool:
        """Return whether the request is too old to settle its own reservation.

        Past max_request_age(), release_abandoned may have released the
        reservation already, and settling it too would release it twice. The
        record then stays pending for that command, which releases the
        reserved tokens and charges none of the usage.
        """
        if self.reservation is None or not self.reservation.counters:
            return False
        age = timezone.now() - self.record.created_at
        if age <= max_request_age():
            return False
        logger.warning(
            "Request %s ran for %d s, longer than a request may keep its token "
            "reservation, so its usage is not charged and its record stays "
            "pending for release_abandoned.",
            self.record.request_id,
            age.total_seconds(),
        )
        return True

    def _release(self) -> None:
        if self.reservation is not None:
            # The record's tokens are 0 unless settling them failed after the
            # upstream replied. Then they are charged here, as the record
            # shows them. The error response's token headers read the states.
            used = self.record.prompt_tokens + self.record.completion_tokens
            self.quota_states = quotas.settle(self.reservation, used_tokens=used)
            self.reservation = None

    def _save(self) -> None:
        if self.record.status != Status.PENDING:
            self.record.settled_at = timezone.now()
        if self.record.pk is None:
            insert_record(self.record)
        else:
            update_settled_fields(self.record)


def release_pooled_connection() -> None:
    """Give the database connection back to the pool for the length of a call.

    Upstream calls take seconds, and a request holding its connection through
    one would cap the requests in flight at the pool size. The next query
    takes a connection from the pool again. Outside a pool, or inside a
    transaction, the connection stays.
    """
    if getattr(connection, "pool", None) and not connection.in_atomic_block:
        connection.close()
