import csv
import datetime
import json
import uuid
from io import StringIO

import pytest
import time_machine
from django.core.management import CommandError, call_command

from generation.models import UsageRecord
from keys.models import APIKey, Tier
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db

UTC = datetime.UTC


def at(day: str, time: str = "12:00") -> datetime.datetime:
    return datetime.datetime.fromisoformat(f"{day}T{time}").replace(tzinfo=UTC)


def add_record(
    api_key: APIKey,
    *,
    when: datetime.datetime,
    status: str = "succeeded",
    reason: str = "",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    tier: Tier | None = None,
) -> UsageRecord:
    record = UsageRecord.objects.create(
        api_key=api_key,
        tier=tier or api_key.tier,
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        status=status,
        reason=reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        request_id=uuid.uuid4().hex,
    )
    # created_at is auto_now_add, so it is set after the insert.
    UsageRecord.objects.filter(pk=record.pk).update(created_at=when)
    return record


def run(*args: str, verbosity: int = 1) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("usage_report", *args, stdout=out, stderr=err, verbosity=verbosity)
    return out.getvalue(), err.getvalue()


def run_json(*args: str) -> dict:
    out, _ = run(*args, "--format", "json")
    return json.loads(out)


@pytest.fixture
def keys() -> dict[str, APIKey]:
    gold, silver = make_tier("gold"), make_tier("silver")
    alpha, _ = make_key(tier=gold, name="alpha")
    beta, _ = make_key(tier=gold, name="beta")
    gamma, _ = make_key(tier=silver, name="gamma")
    return {"alpha": alpha, "beta": beta, "gamma": gamma}


@pytest.fixture
def may_usage(keys) -> dict[str, APIKey]:
    alpha, beta, gamma = keys["alpha"], keys["beta"], keys["gamma"]
    add_record(alpha, when=at("2024-05-01"), prompt_tokens=10, completion_tokens=5)
    add_record(alpha, when=at("2024-05-01"), prompt_tokens=20, completion_tokens=7)
    add_record(
        alpha, when=at("2024-05-01"), status="refused", reason="rate_limit_exceeded"
    )
    add_record(alpha, when=at("2024-05-02"), status="refused", reason="prompt_rejected")
    add_record(alpha, when=at("2024-05-02"), status="failed", reason="upstream_error")
    add_record(beta, when=at("2024-05-02"), status="pending")
    add_record(beta, when=at("2024-05-31", "23:59:59"), prompt_tokens=3)
    add_record(gamma, when=at("2024-05-15"), status="refused", reason="prompt_rejected")
    # Outside the range of the tests below.
    add_record(alpha, when=at("2024-04-30", "23:59:59"), prompt_tokens=1000)
    add_record(alpha, when=at("2024-06-01", "00:00"), prompt_tokens=1000)
    return keys


MAY = ["--since", "2024-05-01", "--until", "2024-05-31"]


def test_report_by_key_per_day(may_usage):
    alpha = may_usage["alpha"]
    rows = run_json(*MAY)["rows"]
    first = rows[0]
    assert [(row["period"], row["name"]) for row in rows] == [
        ("2024-05-01", "alpha"),
        ("2024-05-02", "alpha"),
        ("2024-05-02", "beta"),
        ("2024-05-15", "gamma"),
        ("2024-05-31", "beta"),
    ]
    assert first["key"] == alpha.prefix
    assert first["requests"] == 3
    assert first["statuses"] == {
        "pending": 0,
        "succeeded": 2,
        "refused": 1,
        "failed": 0,
    }
    assert first["refusals"] == {"rate_limit_exceeded": 1}
    assert first["prompt_tokens"] == 30
    assert first["completion_tokens"] == 12


def test_failures_are_not_counted_as_refusals(may_usage):
    rows = run_json(*MAY)["rows"]
    alpha_second_day = rows[1]
    assert alpha_second_day["statuses"]["failed"] == 1
    assert alpha_second_day["refusals"] == {"prompt_rejected": 1}


def test_report_by_tier_per_month(may_usage):
    report = run_json(*MAY, "--by", "tier", "--period", "month")
    gold, silver = report["rows"]
    assert gold["period"] == "2024-05"
    assert gold["tier"] == "gold"
    assert gold["requests"] == 7
    assert gold["refusals"] == {"prompt_rejected": 1, "rate_limit_exceeded": 1}
    assert gold["prompt_tokens"] == 33
    assert silver["tier"] == "silver"
    assert silver["requests"] == 1


def test_tier_is_the_tier_at_request_time(keys):
    alpha = keys["alpha"]
    add_record(alpha, when=at("2024-05-03"), tier=make_tier("bronze"))
    rows = run_json(*MAY, "--by", "tier")["rows"]
    assert [row["tier"] for row in rows] == ["bronze"]


@pytest.mark.parametrize(
    ("period", "expected"),
    [
        pytest.param("day", "2024-05-01", id="day"),
        pytest.param("month", "2024-05", id="month"),
    ],
)
def test_periods_are_utc_whatever_time_zone(keys, settings, period, expected):
    settings.TIME_ZONE = "America/New_York"
    # 02:00 UTC is still the previous day, and month, in New York.
    add_record(keys["alpha"], when=at("2024-05-01", "02:00"))
    rows = run_json(*MAY, "--period", period)["rows"]
    assert [row["period"] for row in rows] == [expected]


def test_range_includes_both_days(may_usage):
    rows = run_json("--since", "2024-05-31", "--until", "2024-05-31")["rows"]
    assert len(rows) == 1
    assert rows[0]["prompt_tokens"] == 3


def test_range_may_end_on_last_date(may_usage):
    report = run_json("--since", "2024-05-31", "--until", "9999-12-31")
    assert report["until"] == "9999-12-31"
    assert [row["prompt_tokens"] for row in report["rows"]] == [3, 1000]


def test_range_may_cover_every_date(may_usage):
    report = run_json("--since", "0001-01-01", "--until", "9999-12-31")
    assert len(report["rows"]) == 7


@pytest.mark.parametrize(
    ("option", "value", "names"),
    [
        pytest.param("--key", "alpha", {"alpha"}, id="key-prefix"),
        pytest.param("--tier", "silver", {"gamma"}, id="tier"),
    ],
)
def test_filters(may_usage, option, value, names):
    if option == "--key":
        value = may_usage[value].prefix
    rows = run_json(*MAY, option, value)["rows"]
    assert {row["name"] for row in rows} == names


def test_key_filter_accepts_whole_key(keys):
    alpha, raw_key = make_key(name="delta")
    add_record(alpha, when=at("2024-05-03"))
    rows = run_json(*MAY, "--key", raw_key)["rows"]
    assert [row["name"] for row in rows] == ["delta"]


def test_csv_rows_per_key_and_day(may_usage):
    out, _ = run(*MAY, "--format", "csv")
    header, *rows = list(csv.reader(StringIO(out)))
    assert header == [
        "period",
        "key",
        "name",
        "requests",
        "pending",
        "succeeded",
        "refused",
        "failed",
        "refused_prompt_rejected",
        "refused_rate_limit_exceeded",
        "prompt_tokens",
        "completion_tokens",
    ]
    assert len(rows) == 5
    assert rows[0] == [
        "2024-05-01",
        may_usage["alpha"].prefix,
        "alpha",
        "3",
        "0",
        "2",
        "1",
        "0",
        "0",
        "1",
        "30",
        "12",
    ]


def test_table_lists_rows_and_total(may_usage):
    out, _ = run(*MAY, "--by", "tier", "--period", "month")
    header, gold, silver, total = out.splitlines()
    assert header.split()[:3] == ["PERIOD", "TIER", "REQUESTS"]
    assert gold.split()[:3] == ["2024-05", "gold", "7"]
    assert silver.split()[:3] == ["2024-05", "silver", "1"]
    assert total.split()[:2] == ["total", "8"]
    assert total.split()[-2:] == ["33", "12"]


def test_default_range_is_current_month(may_usage):
    with time_machine.travel(at("2024-05-20"), tick=False):
        report = run_json()
    assert report["since"] == "2024-05-01"
    assert report["until"] == "2024-05-20"
    assert len(report["rows"]) == 4


def test_query_count_does_not_grow_with_records(keys, django_assert_num_queries):
    for day in range(1, 29):
        for api_key in keys.values():
            add_record(
                api_key,
                when=at(f"2024-02-{day:02d}"),
                status="refused",
                reason=f"reason_{day % 4}",
            )
    # One query finds the key, one the refusal reasons, one the totals.
    with django_assert_num_queries(3):
        report = run_json(
            "--since",
            "2024-02-01",
            "--until",
            "2024-02-29",
            "--key",
            keys["alpha"].prefix,
        )
    assert len(report["rows"]) == 28


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--since", "2024-13-01"], "--since must be a date", id="bad-since"
        ),
        pytest.param(
            ["--until", "yesterday"], "--until must be a date", id="bad-until"
        ),
        pytest.param(
            ["--since", "2024-05-02", "--until", "2024-05-01"],
            r"--until \(2024-05-01\) is before --since \(2024-05-02\)",
            id="until-before-since",
        ),
        pytest.param(
            ["--key", "nokey123"],
            "No API key has the prefix 'nokey123'",
            id="unknown-key",
        ),
        pytest.param(
            ["--tier", "platinum"],
            "Tier 'platinum' not found. Known tiers: .*gold, silver",
            id="unknown-tier",
        ),
        pytest.param(
            ["--period", "week"], "invalid choice: 'week'", id="unknown-period"
        ),
    ],
)
def test_bad_arguments_raise_command_error(keys, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


@pytest.mark.parametrize(
    ("verbosity", "expected"),
    [
        pytest.param(0, "", id="quiet"),
        pytest.param(
            1,
            "5 row(s): usage per key and day from 2024-05-01 to 2024-05-31 (UTC).\n",
            id="normal",
        ),
    ],
)
def test_verbosity_controls_summary(may_usage, verbosity, expected):
    _, err = run(*MAY, "--format", "csv", verbosity=verbosity)
    assert err == expected


def test_empty_range_reports_no_rows(keys):
    out, err = run("--since", "2020-01-01", "--until", "2020-01-31", "--format", "json")
    assert json.loads(out)["rows"] == []
    assert "No usage records from 2020-01-01 to 2020-01-31" in err
