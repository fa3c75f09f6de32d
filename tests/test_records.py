"""Usage records written with the prebuilt INSERT and UPDATE."""

import contextlib
import datetime
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from generation.models import QuotaCounter, UsageRecord
from generation.quotas import period_start
from generation.records import (
    SETTLED_FIELDS,
    execute_together,
    insert_record,
    update_settled_fields,
)
from keys.models import PromptRule
from tests.factories import make_key, make_tier
from tests.fake_upstream import Behaviour

pytestmark = pytest.mark.django_db

Status = UsageRecord.Status


def _values(record: UsageRecord) -> dict:
    return {
        field.attname: getattr(record, field.attname)
        for field in UsageRecord._meta.concrete_fields
    }


def _new_record(**fields) -> UsageRecord:
    api_key, _ = make_key()
    defaults = {
        "api_key": api_key,
        "tier": api_key.tier,
        "endpoint": "chat.completions",
        "request_id": "req-1",
        "status": Status.PENDING,
        "reserved_tokens": 120,
        "prompt_text": "hello",
    }
    return UsageRecord(**{**defaults, **fields})


def _generate(api_client, raw_key, **fields):
    return api_client.post(
        "/generate-text/",
        json.dumps({"prompt": "hi", **fields}),
        content_type="application/json",
        headers={"x-api-key": raw_key},
    )


def test_insert_stores_what_the_orm_reads():
    before = timezone.now()
    record = _new_record(model="gpt-4o-mini", http_status=None)

    insert_record(record)

    assert record.pk is not None
    assert record._state.adding is False
    stored = UsageRecord.objects.get(pk=record.pk)
    assert _values(stored) == _values(record)
    assert stored.created_at >= before
    assert stored.settled_at is None


def test_insert_gives_each_record_its_own_key():
    first, second = _new_record(), _new_record(request_id="req-2")
    insert_record(first)
    insert_record(second)

    assert first.pk != second.pk
    assert UsageRecord.objects.filter(pk__in=[first.pk, second.pk]).count() == 2


def test_update_writes_only_the_settled_fields():
    record = _new_record()
    insert_record(record)
    UsageRecord.objects.filter(pk=record.pk).update(prompt_text="changed elsewhere")
    rule = PromptRule.objects.create(name="r", pattern="x", message="No.")
    settled_at = timezone.now() + datetime.timedelta(seconds=2)
    record.model = "gpt-4o"
    record.status = Status.FAILED
    record.http_status = 400
    record.reason = "prompt_rejected"
    record.rule = rule
    record.prompt_tokens = 7
    record.completion_tokens = 9
    record.upstream_latency_ms = 321
    record.settled_at = settled_at
    record.reserved_tokens = 999

    update_settled_fields(record)

    stored = UsageRecord.objects.get(pk=record.pk)
    for name in SETTLED_FIELDS:
        field = UsageRecord._meta.get_field(name)
        assert getattr(stored, field.attname) == getattr(record, field.attname)
    assert stored.rule_id == rule.pk
    assert stored.settled_at == settled_at
    assert stored.prompt_text == "changed elsewhere"


def test_update_of_deleted_record_raises():
    record = _new_record()
    insert_record(record)
    UsageRecord.objects.filter(pk=record.pk).delete()
    record.status = Status.SUCCEEDED

    with pytest.raises(DatabaseError, match="not found"):
        update_settled_fields(record)


def test_request_writes_quota_and_record_together(api_client, upstream):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    with CaptureQueriesContext(connection) as queries:
        response = _generate(api_client, raw_key)

    assert response.status_code == 200
    record = UsageRecord.objects.get(api_key=api_key)
    counter = QuotaCounter.objects.get(api_key=api_key)
    assert record.status == Status.SUCCEEDED
    assert counter.used == record.prompt_tokens + record.completion_tokens > 0
    assert counter.reserved == 0
    writes = [
        query["sql"].split("; ")
        for query in queries.captured_queries
        if "generation_" in query["sql"]
    ]
    # On PostgreSQL, the record goes in with the reservation and is settled
    # with it: two round trips. Elsewhere each statement is a query of its own.
    if connection.vendor == "postgresql":
        assert [len(statements) for statements in writes] == [2, 2]
    else:
        assert [len(statements) for statements in writes] == [1, 1, 1, 1]
    tables = [
        "usage" if "usage" in statement.lower() else "quota"
        for statements in writes
        for statement in statements
    ]
    assert tables == ["usage", "quota", "usage", "quota"]


def test_single_statement_runs_without_transaction():
    record = _new_record()
    insert_record(record)
    table = UsageRecord._meta.db_table
    statement = (f"UPDATE {table} SET reason = %s WHERE id = %s", ["one", record.pk])

    with CaptureQueriesContext(connection) as queries:
        [result] = execute_together(connection, [statement])

    # Inside the test's transaction, a transaction would show as a savepoint.
    assert [query["sql"][:6] for query in queries.captured_queries] == ["UPDATE"]
    assert result.rowcount == 1


@pytest.mark.django_db(transaction=True)
def test_statements_run_together_fail_together():
    record = _new_record()
    insert_record(record)
    table = UsageRecord._meta.db_table
    statements = [
        (f"UPDATE {table} SET reason = %s WHERE id = %s", ["written", record.pk]),
        (f"UPDATE {table} SET no_such_column = 1", []),
    ]

    with pytest.raises(DatabaseError):
        execute_together(connection, statements)

    stored = UsageRecord.objects.get(pk=record.pk)
    assert stored.reason == ""


@contextlib.contextmanager
def _rejecting_trigger(
    name: str, model, event: str, when: str = "", errcode: str = "P0001"
):
    """Make the database reject `event` ("UPDATE", "INSERT") on a model's table.

    `when`, an SQL condition on NEW, limits the rejection to matching rows.
    `errcode` is the SQLSTATE that PostgreSQL reports; SQLite has none.
    """
    table = model._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN "
                f"RAISE EXCEPTION '{name}' USING ERRCODE = '{errcode}'; "
                "END $$ LANGUAGE plpgsql"
            )
            condition = f"WHEN ({when}) " if when else ""
            cursor.execute(
                f"CREATE TRIGGER {name} BEFORE {event} ON {table} "
                f"FOR EACH ROW {condition}EXECUTE FUNCTION {name}()"
            )
        else:
            condition = f"WHEN {when} " if when else ""
            cursor.execute(
                f"CREATE TRIGGER {name} BEFORE {event} ON {table} {condition}"
                f"BEGIN SELECT RAISE(ABORT, '{name}'); END"
            )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(f"DROP TRIGGER {name} ON {table}")
                cursor.execute(f"DROP FUNCTION {name}()")
            else:
                cursor.execute(f"DROP TRIGGER {name}")


@pytest.fixture
def failing_settle():
    """Make the database reject the UPDATE that settles a record as succeeded."""
    with _rejecting_trigger(
        "reject_settle", UsageRecord, "UPDATE", when="NEW.status = 'succeeded'"
    ):
        yield


@pytest.mark.django_db(transaction=True)
def test_failed_settle_still_charges_completion(api_client, upstream, failing_settle):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    with pytest.raises(DatabaseError):
        _generate(api_client, raw_key)

    counter = QuotaCounter.objects.get(api_key=api_key, period="day")
    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == Status.FAILED
    assert record.total_tokens > 0
    assert counter.used == record.total_tokens
    # Released once: a second release would take reserved below zero.
    assert counter.reserved == 0


@pytest.mark.django_db(transaction=True)
def test_failed_settle_still_charges_stream(api_client, upstream, failing_settle):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    response = _generate(api_client, raw_key, stream=True)
    body = b"".join(response.streaming_content)
    response.close()

    counter = QuotaCounter.objects.get(api_key=api_key, period="day")
    record = UsageRecord.objects.get(api_key=api_key)
    # The stream had started, so the failure ends it with an error event.
    assert b'"internal_error"' in body
    assert counter.reserved == 0
    assert counter.used > 0
    # The record shows that error too, as for a completion, and the tokens
    # charged to the counter.
    assert record.status == Status.FAILED
    assert record.reason == "internal_error"
    assert record.settled_at is not None
    assert record.total_tokens > 0
    assert record.total_tokens == counter.used


@pytest.mark.django_db(transaction=True)
def test_retried_reservation_updates_pending_record(upstream):
    # 400 two-letter words of two-byte letters: the first attempt reserves
    # one token per UTF-8 byte, about 2,000, which does not fit in the 1,000
    # left. The exact count, about 800, fits.
    prompt = " ".join(["\u00e9\u00e9"] * 400)
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=3000))
    QuotaCounter.objects.create(
        api_key=api_key,
        period="day",
        period_start=period_start("day", timezone.now()),
        used=2000,
        reserved=0,
    )
    upstream.queue(Behaviour(delay=1.0))

    with ThreadPoolExecutor(max_workers=1) as pool:
        request = pool.submit(
            _generate, APIClient(), raw_key, prompt=prompt, max_tokens=10
        )
        deadline = time.monotonic() + 5
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        in_flight = UsageRecord.objects.get(api_key=api_key)
        counter = QuotaCounter.objects.get(api_key=api_key, period="day")
        response = request.result()

    assert response.status_code == 200
    assert in_flight.status == Status.PENDING
    assert 0 < counter.reserved < 1000
    assert in_flight.reserved_tokens == counter.reserved


@pytest.fixture
def failing_reservation():
    """Make the database reject the upsert that reserves quota."""
    with _rejecting_trigger("reject_reserve", QuotaCounter, "INSERT"):
        yield


@pytest.mark.django_db(transaction=True)
def test_failed_reservation_leaves_one_record(
    api_client, upstream, failing_reservation
):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    with pytest.raises(DatabaseError):
        _generate(api_client, raw_key)

    # The record's INSERT went with the failed upsert and was undone, so the
    # only record is the one the error path saved.
    [record] = UsageRecord.objects.filter(api_key=api_key)
    assert record.status == Status.REFUSED
    assert record.reason == "internal_error"
    assert record.reserved_tokens == 0
    assert not QuotaCounter.objects.filter(api_key=api_key).exists()
    assert upstream.requests == []


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite reports no SQLSTATE"
)
@pytest.mark.django_db(transaction=True)
def test_cancelled_reservation_gets_503(api_client, upstream):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    # 57014 is query_canceled, which the driver raises as an OperationalError,
    # as it does for a server that shut down or a lost connection.
    with _rejecting_trigger("cancel_reserve", QuotaCounter, "INSERT", errcode="57014"):
        response = api_client.post(
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            format="json",
            headers={"authorization": f"Bearer {raw_key}"},
        )

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"
    [record] = UsageRecord.objects.filter(api_key=api_key)
    assert record.status == Status.REFUSED
    assert record.reason == "database_unavailable"
    assert record.http_status == 503
    assert upstream.requests == []
