import dataclasses
import datetime
import functools
import math
import uuid
from io import StringIO

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import transaction

from generation.abandoned import (
    ReleaseSummary,
    max_request_age,
    min_release_age,
    release_records,
)
from generation.models import QuotaCounter, UsageRecord
from generation.policy import PreparedChat
from generation.quotas import period_start
from generation.usage import UsageTracker
from keys.models import APIKey
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db

Status = UsageRecord.Status
START = datetime.datetime(2024, 6, 12, 9, 0, tzinfo=datetime.UTC)
# Old enough for the default --older-than with the test settings.
LATER = START + datetime.timedelta(hours=2)


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


@pytest.fixture
def api_key() -> APIKey:
    tier = make_tier(tokens_per_day=10_000, tokens_per_month=100_000)
    api_key, _ = make_key(tier=tier)
    return api_key


def chat(tokens: int) -> PreparedChat:
    return PreparedChat(
        model="gpt-4o-mini",
        messages=[],
        max_tokens=0,
        client_texts=[],
        known_prompt_tokens=tokens,
    )


def start_request(api_key: APIKey, tokens: int) -> UsageTracker:
    """Reserve `tokens` as a request does, leaving its record pending."""
    tracker = UsageTracker(
        api_key=api_key, endpoint="chat.completions", request_id=uuid.uuid4().hex
    )
    tracker.reserve(chat(tokens))
    return tracker


def reserved(api_key: APIKey) -> dict[str, int]:
    return dict(
        QuotaCounter.objects.filter(api_key=api_key).values_list("period", "reserved")
    )


def run(*args: str, verbosity: int = 1) -> str:
    out = StringIO()
    call_command("release_abandoned", *args, stdout=out, verbosity=verbosity)
    return out.getvalue()


def test_abandoned_record_is_released(clock, api_key):
    settled = start_request(api_key, 40)
    settled.succeed(prompt_tokens=10, completion_tokens=5)
    record = start_request(api_key, 100).record
    assert reserved(api_key) == {"day": 100, "month": 100}

    clock.move_to(LATER)
    out = run()

    assert reserved(api_key) == {"day": 0, "month": 0}
    used = dict(QuotaCounter.objects.values_list("period", "used"))
    assert used == {"day": 15, "month": 15}
    record.refresh_from_db()
    assert record.status == Status.FAILED
    assert record.reason == "abandoned"
    assert record.settled_at == LATER
    assert record.reserved_tokens == 100
    assert out.startswith("Released 100 token(s) of 1 abandoned usage record(s)")


def test_recent_record_is_kept(clock, api_key):
    record = start_request(api_key, 100).record

    clock.shift(min_release_age() - datetime.timedelta(minutes=1))
    out = run()

    assert reserved(api_key) == {"day": 100, "month": 100}
    record.refresh_from_db()
    assert record.status == Status.PENDING
    assert out.startswith("Released 0 token(s) of 0 abandoned usage record(s)")


def test_older_than_below_minimum_is_rejected(clock, api_key):
    start_request(api_key, 100)
    minimum = math.ceil(min_release_age().total_seconds() / 60)

    clock.move_to(LATER)
    with pytest.raises(CommandError, match=f"must be at least {minimum} minutes"):
        run("--older-than", str(minimum - 1))

    assert reserved(api_key) == {"day": 100, "month": 100}


def test_minimum_grows_with_stream_limit(settings):
    before = min_release_age()
    settings.PROXY_MAX_STREAM_SECONDS += 600
    assert min_release_age() - before == datetime.timedelta(seconds=600)


def test_record_settled_after_selection_is_kept(clock, api_key):
    abandoned = start_request(api_key, 100).record
    late = start_request(api_key, 30)
    late.succeed(prompt_tokens=10, completion_tokens=10)
    summary = ReleaseSummary()

    # Both were pending when selected; the second settled before the UPDATE.
    with transaction.atomic():
        release_records([abandoned.pk, late.record.pk], summary)

    assert summary.records == 1
    assert summary.tokens == 100
    assert reserved(api_key) == {"day": 0, "month": 0}
    late.record.refresh_from_db()
    assert late.record.status == Status.SUCCEEDED
    assert late.record.reason == ""


def test_second_run_releases_nothing(clock, api_key):
    start_request(api_key, 100)
    start_request(api_key, 50)
    clock.move_to(LATER)

    run()
    out = run()

    assert reserved(api_key) == {"day": 0, "month": 0}
    assert out.startswith("Released 0 token(s) of 0")


def test_counters_never_go_negative(clock, api_key, caplog):
    start_request(api_key, 100)
    QuotaCounter.objects.filter(api_key=api_key, period="day").update(reserved=30)

    clock.move_to(LATER)
    run()

    assert reserved(api_key) == {"day": 0, "month": 0}
    assert "has only 30 reserved tokens, fewer than the 100" in caplog.text


def test_only_reserved_periods_are_released(clock):
    api_key, _ = make_key(tier=make_tier(tokens_per_day=10_000))
    start_request(api_key, 100)
    # A month cap added later: its counter contains other requests' tokens.
    QuotaCounter.objects.create(
        api_key=api_key,
        period="month",
        period_start=period_start("month", START),
        reserved=70,
    )

    clock.move_to(LATER)
    run()

    assert reserved(api_key) == {"day": 0, "month": 70}


def test_uncapped_key_reports_no_tokens(clock):
    api_key, _ = make_key(tier=make_tier())
    record = start_request(api_key, 100).record
    assert record.reserved_periods == ""

    clock.move_to(LATER)
    dry_run = run("--dry-run", verbosity=2)
    out = run(verbosity=2)

    assert dry_run.startswith(f"Key {api_key.prefix}: 1 record(s), 0 token(s).")
    assert "Would release 0 token(s) of 1 pending usage record(s)" in dry_run
    assert out.startswith(f"Key {api_key.prefix}: 1 record(s), 0 token(s).")
    assert "Released 0 token(s) of 1 abandoned usage record(s)" in out
    record.refresh_from_db()
    assert record.status == Status.FAILED


@dataclasses.dataclass(frozen=True)
class SlowlyCountedChat(PreparedChat):
    """A chat whose exact token count takes `counting_time` on `clock`."""

    clock: time_machine.Traveller | None = None
    counting_time: datetime.timedelta = datetime.timedelta(milliseconds=2)

    @property
    def worst_case_tokens(self) -> int:
        self.clock.shift(self.counting_time)
        return super().worst_case_tokens


def test_release_at_midnight_uses_reserved_day():
    last_moment = datetime.datetime(2024, 6, 30, 23, 59, 59, 999000, datetime.UTC)
    api_key, _ = make_key(tier=make_tier(tokens_per_day=3000, tokens_per_month=10**6))
    QuotaCounter.objects.create(
        api_key=api_key,
        period="day",
        period_start=last_moment.date(),
        used=2000,
    )
    # 400 words of two 2-byte letters: the bound of one token per UTF-8
    # byte, about 2,000, does not fit in the 1,000 left, so the tokens are
    # counted, which takes the clock past midnight. The count, about 800, fits.
    prompt = " ".join(["\u00e9\u00e9"] * 400)
    with time_machine.travel(last_moment, tick=False) as clock:
        tracker = UsageTracker(
            api_key=api_key, endpoint="chat.completions", request_id="midnight"
        )
        tracker.reserve(
            SlowlyCountedChat(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=10,
                client_texts=[prompt],
                clock=clock,
            )
        )
        amount = tracker.record.reserved_tokens
        assert 0 < amount < 1000
        assert tracker.record.created_at == last_moment
        june = {"day": last_moment.date(), "month": datetime.date(2024, 6, 1)}
        counters = {
            (counter.period, counter.period_start): counter.reserved
            for counter in QuotaCounter.objects.filter(api_key=api_key)
        }
        assert counters == {
            ("day", june["day"]): amount,
            ("month", june["month"]): amount,
        }

        clock.shift(datetime.timedelta(hours=2))
        run()

    assert reserved(api_key) == {"day": 0, "month": 0}


def test_dry_run_changes_nothing(clock, api_key):
    record = start_request(api_key, 100).record
    start_request(api_key, 20)

    clock.move_to(LATER)
    out = run("--dry-run")

    assert out.startswith("Would release 120 token(s) of 2 pending usage record(s)")
    assert "Nothing was changed (dry run)." in out
    assert reserved(api_key) == {"day": 120, "month": 120}
    record.refresh_from_db()
    assert record.status == Status.PENDING


def test_release_works_in_batches(clock, api_key):
    for tokens in (10, 20, 30, 40, 50):
        start_request(api_key, tokens)

    clock.move_to(LATER)
    out = run("--batch-size", "2")

    assert reserved(api_key) == {"day": 0, "month": 0}
    assert not UsageRecord.objects.filter(status=Status.PENDING).exists()
    assert out.startswith("Released 150 token(s) of 5 abandoned usage record(s)")


def test_verbosity_two_lists_keys(clock, api_key):
    other, _ = make_key(tier=api_key.tier, name="other key")
    start_request(api_key, 100)
    start_request(api_key, 20)
    start_request(other, 5)

    clock.move_to(LATER)
    lines = run(verbosity=2).splitlines()

    # Keys are listed in order of id, the order they were issued in.
    assert lines[:2] == [
        f"Key {api_key.prefix}: 2 record(s), 120 token(s).",
        f"Key {other.prefix}: 1 record(s), 5 token(s).",
    ]
    assert lines[2].startswith("Released 125 token(s) of 3")


@pytest.mark.parametrize("batch_size", ["0", "10001"])
def test_bad_batch_size_is_rejected(batch_size):
    with pytest.raises(CommandError, match="--batch-size must be 1 to 10000"):
        run("--batch-size", batch_size)


def test_request_past_max_age_leaves_release_to_command(clock, api_key, caplog):
    tracker = start_request(api_key, 100)

    clock.shift(max_request_age() + datetime.timedelta(seconds=1))
    tracker.succeed(prompt_tokens=10, completion_tokens=10)

    assert reserved(api_key) == {"day": 100, "month": 100}
    tracker.record.refresh_from_db()
    assert tracker.record.status == Status.PENDING
    assert "its usage is not charged" in caplog.text

    clock.shift(min_release_age())
    run()

    assert reserved(api_key) == {"day": 0, "month": 0}


def test_record_tokens_charged_on_release(clock, api_key):
    # A request that got the upstream's reply but could not release its
    # reservation leaves its record pending with the tokens it used.
    record = start_request(api_key, 100).record
    record.prompt_tokens, record.completion_tokens = 30, 12
    record.save(update_fields=["prompt_tokens", "completion_tokens"])

    clock.move_to(LATER)
    run()

    used = dict(QuotaCounter.objects.values_list("period", "used"))
    assert reserved(api_key) == {"day": 0, "month": 0}
    assert used == {"day": 42, "month": 42}


def test_request_settles_under_huge_stream_limit(clock, api_key, settings):
    # 10**14 seconds is more than timedelta.max, about 8.6 * 10**13 seconds.
    settings.PROXY_MAX_STREAM_SECONDS = 10**14
    tracker = start_request(api_key, 100)

    tracker.succeed(prompt_tokens=10, completion_tokens=10)

    used = dict(QuotaCounter.objects.values_list("period", "used"))
    assert reserved(api_key) == {"day": 0, "month": 0}
    assert used == {"day": 20, "month": 20}


def test_minimum_past_calendar_is_rejected(clock, api_key, settings):
    settings.PROXY_MAX_STREAM_SECONDS = 10**14
    start_request(api_key, 100)

    with pytest.raises(CommandError, match="Lower PROXY_MAX_STREAM_SECONDS"):
        run()

    assert reserved(api_key) == {"day": 100, "month": 100}


@pytest.mark.parametrize("minutes", ["10000000000", "10" + "0" * 20])
def test_older_than_past_calendar_is_rejected(clock, minutes):
    with pytest.raises(CommandError, match="Use a smaller --older-than"):
        run("--older-than", minutes)


@dataclasses.dataclass(frozen=True)
class _ObservedChat(PreparedChat):
    """A chat whose bound is 5,000 tokens and whose exact count, 50, notes
    the usage records as they are while it runs."""

    records_at_count: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def prompt_token_bound(self) -> int:
        return 5_000

    @functools.cached_property
    def prompt_tokens(self) -> int:
        rows = UsageRecord.objects.values_list(
            "request_id", "status", "reserved_tokens"
        )
        self.records_at_count.update(
            (request_id, (status, tokens)) for request_id, status, tokens in rows
        )
        return 50


def test_rejected_bound_reserves_nothing_while_counting(clock, api_key):
    start_request(api_key, 9_000)
    chat = _ObservedChat(
        model="gpt-4o-mini", messages=[], max_tokens=0, client_texts=[]
    )
    tracker = UsageTracker(
        api_key=api_key, endpoint="chat.completions", request_id=uuid.uuid4().hex
    )

    # The bound does not fit beside the 9,000 reserved, so the exact count runs.
    tracker.reserve(chat)

    # While it ran, the record claimed no reserved tokens, so a worker killed
    # then would leave release_abandoned nothing to release.
    request_id = tracker.record.request_id
    assert chat.records_at_count[request_id] == (Status.PENDING, 0)
    assert reserved(api_key) == {"day": 9_050, "month": 9_050}
    tracker.record.refresh_from_db()
    assert tracker.record.reserved_tokens == 50
