"""Usage records written with the prebuilt INSERT and UPDATE."""

import datetime
import json

import pytest
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from generation.models import QuotaCounter, UsageRecord
from generation.records import (
    SETTLED_FIELDS,
    execute_together,
    insert_record,
    update_settled_fields,
)
from keys.models import PromptRule
from tests.factories import make_key, make_tier

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


def test_insert_stores_what_the_orm_reads():
    record = _new_record(model="gpt-4o-mini", http_status=None)
    before = timezone.now()

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
        response = api_client.post(
            "/generate-text/",
            json.dumps({"prompt": "hi"}),
            content_type="application/json",
            headers={"x-api-key": raw_key},
        )

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
    # with it: two round trips. Elsewhere each statement is its own.
    if connection.vendor == "postgresql":
        assert [len(statements) for statements in writes] == [2, 2]
    else:
        assert [len(statements) for statements in writes] == [1, 1, 1, 1]
    tables = [
        "usage" if "usage" in statement.lower() else "quota"
        for statements in writes
        for statement in statements
    ]
    assert tables == ["usage", "quota", "quota", "usage"]


@pytest.mark.django_db(transaction=True)
def test_statements_sent_together_fail_together_on_postgresql():
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
    # Sent as one query, the failure undoes the first statement too; sent
    # one at a time, the first has already been committed.
    expected = "" if connection.vendor == "postgresql" else "written"
    assert stored.reason == expected
