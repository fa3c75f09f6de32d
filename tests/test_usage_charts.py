import datetime
import re
import uuid
import xml.etree.ElementTree as ET

import pytest
import time_machine
from django.contrib.auth.models import User

from generation.admin import UsageRecordAdmin
from generation.charts import (
    axis_ceiling,
    compact_number,
    usage_chart,
    usage_chart_html,
)
from generation.models import UsageRecord
from keys.models import APIKey, Tier
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db

NOW = datetime.datetime(2024, 6, 30, 15, 0, tzinfo=datetime.UTC)
TODAY = NOW.date()
SVG = "{http://www.w3.org/2000/svg}"


def add_record(
    api_key: APIKey,
    *,
    days_ago: int,
    status: str = "succeeded",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    tier: Tier | None = None,
) -> UsageRecord:
    record = UsageRecord.objects.create(
        api_key=api_key,
        tier=tier or api_key.tier,
        endpoint="/v1/chat/completions",
        status=status,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        request_id=uuid.uuid4().hex,
    )
    # created_at is auto_now_add, so it is set after the insert.
    created_at = NOW - datetime.timedelta(days=days_ago)
    UsageRecord.objects.filter(pk=record.pk).update(created_at=created_at)
    return record


def render(**kwargs) -> str:
    with time_machine.travel(NOW, tick=False):
        return usage_chart_html(**kwargs)


def parse_charts(html: str) -> list[ET.Element]:
    return [ET.fromstring(svg) for svg in re.findall(r"<svg.*?</svg>", html, re.S)]


def bars(chart: ET.Element) -> list[ET.Element]:
    return chart.findall(f"{SVG}g/{SVG}rect")


def bar_values(chart: ET.Element) -> dict[str, int]:
    return {bar.get("data-day"): int(bar.get("data-value")) for bar in bars(chart)}


def texts(chart: ET.Element, css_class: str) -> list[str]:
    return [
        text.text for text in chart.iter(f"{SVG}text") if text.get("class") == css_class
    ]


@pytest.fixture
def api_key() -> APIKey:
    api_key, _ = make_key(tier=make_tier("gold"), name="charted")
    return api_key


@pytest.fixture
def usage(api_key) -> APIKey:
    """Requests on three days. The busiest is 3 days ago, with 3 requests."""
    add_record(api_key, days_ago=0, prompt_tokens=100, completion_tokens=20)
    for _ in range(3):
        add_record(api_key, days_ago=3, prompt_tokens=10, completion_tokens=5)
    add_record(api_key, days_ago=29, status="refused")
    # Outside the 30 days.
    add_record(api_key, days_ago=30, prompt_tokens=5000)
    return api_key


def test_chart_has_one_bar_per_day(usage):
    requests, tokens = parse_charts(render(api_key=usage))
    assert len(bars(requests)) == 30
    assert len(bars(tokens)) == 30
    days = list(bar_values(requests))
    assert days[0] == (TODAY - datetime.timedelta(days=29)).isoformat()
    assert days[-1] == TODAY.isoformat()


@pytest.mark.parametrize("days", [1, 7, 90], ids=["one-day", "week", "quarter"])
def test_chart_length_follows_days(usage, days):
    requests, _ = parse_charts(render(api_key=usage, days=days))
    assert len(bars(requests)) == days


def test_chart_values_per_day(usage):
    requests, tokens = parse_charts(render(api_key=usage))
    request_values, token_values = bar_values(requests), bar_values(tokens)
    three_days_ago = (TODAY - datetime.timedelta(days=3)).isoformat()
    first_day = (TODAY - datetime.timedelta(days=29)).isoformat()
    assert request_values[TODAY.isoformat()] == 1
    assert request_values[three_days_ago] == 3
    assert request_values[first_day] == 1
    assert sum(request_values.values()) == 5
    assert token_values[TODAY.isoformat()] == 120
    assert token_values[three_days_ago] == 45
    assert sum(token_values.values()) == 165


def test_bar_heights_scale_with_values(usage):
    for chart in parse_charts(render(api_key=usage)):
        chart_bars = bars(chart)
        tallest = max(chart_bars, key=lambda bar: float(bar.get("height")))
        peak = max(int(bar.get("data-value")) for bar in chart_bars)
        assert int(tallest.get("data-value")) == peak
        unit = float(tallest.get("height")) / peak
        for bar in chart_bars:
            expected = int(bar.get("data-value")) * unit
            assert float(bar.get("height")) == pytest.approx(expected, abs=0.02)


def test_bars_stand_on_one_baseline(usage):
    requests, _ = parse_charts(render(api_key=usage))
    bottoms = {
        round(float(bar.get("y")) + float(bar.get("height")), 1)
        for bar in bars(requests)
    }
    assert len(bottoms) == 1


def test_axis_maximum_label_is_round_and_covers_peak(usage):
    requests, tokens = parse_charts(render(api_key=usage))
    assert texts(requests, "y-label") == ["0", "3"]
    assert texts(tokens, "y-label") == ["0", "150"]


def test_chart_is_accessible_and_self_contained(usage):
    html = render(api_key=usage)
    requests, _ = parse_charts(html)
    assert requests.get("role") == "img"
    assert requests.get("aria-label") == requests.find(f"{SVG}title").text
    assert "5 requests in total, at most 3 on" in requests.get("aria-label")
    assert "<script" not in html
    assert "href" not in html
    assert "url(" not in html


def test_chart_labels_first_middle_and_last_day(usage):
    requests, _ = parse_charts(render(api_key=usage))
    assert texts(requests, "x-label") == [
        (TODAY - datetime.timedelta(days=29)).isoformat(),
        (TODAY - datetime.timedelta(days=14)).isoformat(),
        TODAY.isoformat(),
    ]


def test_chart_makes_one_query(usage, django_assert_num_queries):
    for days_ago in range(30):
        add_record(usage, days_ago=days_ago)
    with django_assert_num_queries(1):
        render(api_key=usage)


def test_chart_counts_only_given_key(usage):
    other, _ = make_key(tier=usage.tier, name="other")
    add_record(other, days_ago=0)
    requests, _ = parse_charts(render(api_key=usage))
    assert sum(bar_values(requests).values()) == 5


def test_tier_chart_counts_every_key_of_tier(usage):
    other, _ = make_key(tier=usage.tier, name="other")
    add_record(other, days_ago=0)
    elsewhere, _ = make_key(tier=make_tier("silver"), name="elsewhere")
    add_record(elsewhere, days_ago=0)
    requests, _ = parse_charts(render(tier=usage.tier))
    assert sum(bar_values(requests).values()) == 6


def test_chart_without_usage_says_so(api_key):
    html = render(api_key=api_key)
    requests, _ = parse_charts(html)
    assert set(bar_values(requests).values()) == {0}
    assert "No requests in these days." in html


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 1),
        (1, 1),
        (2, 2),
        (3, 3),
        (7, 8),
        (10, 10),
        (11, 15),
        (16, 20),
        (21, 25),
        (120, 150),
        (501, 600),
        (801, 1000),
        (1001, 1500),
    ],
    ids=lambda value: str(value),
)
def test_axis_ceiling(value, expected):
    assert axis_ceiling(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (950, "950"),
        (1000, "1k"),
        (12_345, "12.3k"),
        (1_500_000, "1.5M"),
        (2 * 10**9, "2G"),
    ],
    ids=lambda value: str(value),
)
def test_compact_number(value, expected):
    assert compact_number(value) == expected


def test_admin_field_renders_key_and_tier_charts(usage):
    with time_machine.travel(NOW, tick=False):
        key_html = usage_chart(usage)
        tier_html = usage_chart(usage.tier)
    assert len(parse_charts(key_html)) == 2
    assert len(parse_charts(tier_html)) == 2
    assert usage_chart(Tier(name="unsaved")) == "-"


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "pw-for-tests")
    client.force_login(user)
    return client


@pytest.fixture
def listed_usage(api_key) -> dict[str, Tier]:
    gold = api_key.tier
    add_record(api_key, days_ago=1, prompt_tokens=10, completion_tokens=2)
    add_record(api_key, days_ago=2, prompt_tokens=30, completion_tokens=4)
    add_record(api_key, days_ago=2, status="refused")
    silver = make_tier("silver")
    other, _ = make_key(tier=silver, name="other")
    add_record(other, days_ago=1, prompt_tokens=500, completion_tokens=60)
    add_record(other, days_ago=1, status="pending")
    return {"gold": gold, "silver": silver}


def totals_by_status(response) -> dict[str, tuple[int, int, int]]:
    return {
        row["status"] or "all": (
            row["requests"],
            row["prompt_tokens"],
            row["completion_tokens"],
        )
        for row in response.context["usage_totals"]
    }


def test_usage_list_shows_totals_of_all_records(admin_client, listed_usage):
    response = admin_client.get("/admin/generation/usagerecord/")
    totals = totals_by_status(response)
    assert totals["all"] == (5, 540, 66)
    assert totals["succeeded"] == (3, 540, 66)
    assert totals["refused"] == (1, 0, 0)
    assert totals["pending"] == (1, 0, 0)
    assert totals["failed"] == (0, 0, 0)
    assert 'id="usage-totals"' in response.content.decode()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("status__exact=succeeded", (3, 540, 66), id="status"),
        pytest.param("tier__id__exact={gold}", (3, 40, 6), id="tier"),
        pytest.param(
            "tier__id__exact={silver}&status__exact=pending",
            (1, 0, 0),
            id="tier-and-status",
        ),
        pytest.param("q=other", (2, 500, 60), id="search"),
    ],
)
def test_usage_list_totals_follow_filters(admin_client, listed_usage, query, expected):
    query = query.format(gold=listed_usage["gold"].pk, silver=listed_usage["silver"].pk)
    response = admin_client.get(f"/admin/generation/usagerecord/?{query}")
    assert totals_by_status(response)["all"] == expected
    assert len(response.context["cl"].result_list) == expected[0]


def test_usage_list_totals_cover_every_page(admin_client, listed_usage, monkeypatch):
    monkeypatch.setattr(UsageRecordAdmin, "list_per_page", 2)
    response = admin_client.get("/admin/generation/usagerecord/")
    assert len(response.context["cl"].result_list) == 2
    assert totals_by_status(response)["all"] == (5, 540, 66)


def test_usage_list_with_invalid_filter_redirects(admin_client, listed_usage):
    response = admin_client.get("/admin/generation/usagerecord/?nonsense=1")
    assert response.status_code == 302
