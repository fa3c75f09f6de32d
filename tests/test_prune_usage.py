import datetime
import uuid
from io import StringIO

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from generation.models import UsageRecord
from keys.models import APIKey
from tests.factories import make_key

pytestmark = pytest.mark.django_db

NOW = datetime.datetime(2024, 6, 30, 12, 0, tzinfo=datetime.UTC)


def add_record(
    api_key: APIKey, *, days_ago: float, status: str = "succeeded"
) -> UsageRecord:
    record = UsageRecord.objects.create(
        api_key=api_key,
        tier=api_key.tier,
        endpoint="/generate-text/",
        status=status,
        request_id=uuid.uuid4().hex,
    )
    # created_at is auto_now_add, so it is set after the insert.
    created_at = NOW - datetime.timedelta(days=days_ago)
    UsageRecord.objects.filter(pk=record.pk).update(created_at=created_at)
    return record


def run(*args: str, verbosity: int = 1) -> str:
    out = StringIO()
    with time_machine.travel(NOW, tick=False):
        call_command("prune_usage", *args, stdout=out, verbosity=verbosity)
    return out.getvalue()


@pytest.fixture
def api_key() -> APIKey:
    api_key, _ = make_key()
    return api_key


@pytest.fixture
def records(api_key) -> dict[str, UsageRecord]:
    return {
        "old_succeeded": add_record(api_key, days_ago=40),
        "old_refused": add_record(api_key, days_ago=31, status="refused"),
        "old_failed": add_record(api_key, days_ago=30.01, status="failed"),
        "old_pending": add_record(api_key, days_ago=90, status="pending"),
        "recent": add_record(api_key, days_ago=29.99),
        "recent_pending": add_record(api_key, days_ago=1, status="pending"),
    }


def remaining(records: dict[str, UsageRecord]) -> set[str]:
    kept = set(UsageRecord.objects.values_list("pk", flat=True))
    return {name for name, record in records.items() if record.pk in kept}


def test_prune_keeps_recent_and_pending_records(records):
    out = run("--older-than", "30")
    assert remaining(records) == {"old_pending", "recent", "recent_pending"}
    assert out == "Deleted 3 usage record(s) created before 2024-05-31 12:00 UTC.\n"


def test_include_pending_deletes_old_pending_records(records):
    out = run("--older-than", "30", "--include-pending")
    assert remaining(records) == {"recent", "recent_pending"}
    assert out.startswith("Deleted 4 usage record(s)")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param([], 3, id="without-pending"),
        pytest.param(["--include-pending"], 4, id="with-pending"),
    ],
)
def test_dry_run_counts_and_deletes_nothing(records, extra, expected):
    out = run("--older-than", "30", "--dry-run", *extra)
    assert remaining(records) == set(records)
    assert out.startswith(f"Would delete {expected} usage record(s) created before")
    assert "Nothing was deleted (dry run)." in out


def test_prune_deletes_in_batches_by_id(api_key):
    old = [add_record(api_key, days_ago=60) for _ in range(5)]
    recent = add_record(api_key, days_ago=2)
    with CaptureQueriesContext(connection) as queries:
        out = run("--older-than", "7", "--batch-size", "2", verbosity=2)
    deletes = [q["sql"] for q in queries if q["sql"].upper().startswith("DELETE")]
    assert len(deletes) == 3
    assert all("IN" in sql.upper() for sql in deletes)
    assert not UsageRecord.objects.filter(pk__in=[r.pk for r in old]).exists()
    assert UsageRecord.objects.filter(pk=recent.pk).exists()
    assert out.splitlines() == [
        "Deleted a batch of 2, 2 so far.",
        "Deleted a batch of 2, 4 so far.",
        "Deleted a batch of 1, 5 so far.",
        "Deleted 5 usage record(s) created before 2024-06-23 12:00 UTC.",
    ]


def test_verbosity_zero_prints_nothing(records):
    out = run("--older-than", "30", verbosity=0)
    assert out == ""
    assert remaining(records) == {"old_pending", "recent", "recent_pending"}


def test_nothing_to_delete(api_key):
    add_record(api_key, days_ago=1)
    out = run("--older-than", "30")
    assert out.startswith("Deleted 0 usage record(s)")
    assert UsageRecord.objects.count() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "--older-than", id="missing-days"),
        pytest.param(["--older-than", "0"], "must be 1 to 3650 days, not 0", id="zero"),
        pytest.param(
            ["--older-than", "-5"], "must be 1 to 3650 days, not -5", id="negative"
        ),
        pytest.param(["--older-than", "x"], "invalid int value", id="not-a-number"),
        pytest.param(
            ["--older-than", "30", "--batch-size", "0"],
            "--batch-size must be 1 to 10000, not 0",
            id="zero-batch",
        ),
        pytest.param(
            ["--older-than", "30", "--batch-size", "100000"],
            "--batch-size must be 1 to 10000, not 100000",
            id="huge-batch",
        ),
    ],
)
def test_bad_arguments_delete_nothing(records, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert remaining(records) == set(records)
