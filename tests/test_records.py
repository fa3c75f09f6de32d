"""Usage records written with the prebuilt INSERT and UPDATE."""

import datetime

import pytest
from django.db import DatabaseError
from django.utils import timezone

from generation.models import UsageRecord
from generation.records import SETTLED_FIELDS, insert_record, update_settled_fields
from keys.models import PromptRule
from tests.factories import make_key

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
    assert stored.reserved_tokens == 120


def test_update_of_deleted_record_raises():
    record = _new_record()
    insert_record(record)
    UsageRecord.objects.filter(pk=record.pk).delete()
    record.status = Status.SUCCEEDED

    with pytest.raises(DatabaseError, match="not found"):
        update_settled_fields(record)
