import datetime
import json

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.test import RequestFactory

from generation.models import UsageRecord
from keys.ratelimits import KEY_GROUP, client_ip, count_request
from keys.validators import split_rate, validate_rate, validate_rate_list
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db

URL = "/generate-text/"
START = datetime.datetime(2026, 3, 10, 12, 0, 0, tzinfo=datetime.UTC)
BROKEN_CACHE = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        # Port 1 on loopback: nothing listens, so every call fails at once.
        "LOCATION": "redis://127.0.0.1:1/0",
    }
}


def post(client, key, prompt="hello", **headers):
    return client.post(
        URL,
        json.dumps({"prompt": prompt}),
        content_type="application/json",
        headers={"x-api-key": key, **headers},
    )


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


def test_sixth_request_in_a_minute_is_refused(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("five", rate_limits="5/m"))
    statuses = [post(api_client, raw_key).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]


def test_refusal_has_retry_after_until_window_frees(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("five", rate_limits="5/m"))
    for _ in range(5):
        post(api_client, raw_key)
    refused = post(api_client, raw_key)
    retry_after = int(refused["Retry-After"])
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= retry_after <= 60
    assert refused["X-RateLimit-Remaining"] == "0"

    clock.shift(retry_after - 1)
    assert post(api_client, raw_key).status_code == 429
    clock.shift(1)
    assert post(api_client, raw_key).status_code == 200


def test_refused_request_never_reaches_upstream(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("one", rate_limits="1/m"))
    post(api_client, raw_key)
    post(api_client, raw_key)
    assert len(upstream.requests) == 1


def test_success_carries_rate_limit_headers(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("three", rate_limits="3/m"))
    response = post(api_client, raw_key)
    assert response.status_code == 200
    assert response["X-RateLimit-Limit"] == "3"
    assert response["X-RateLimit-Remaining"] == "2"
    assert 1 <= int(response["X-RateLimit-Reset"]) <= 60


def test_error_after_rate_check_carries_headers(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("three", rate_limits="3/m"))
    response = api_client.post(
        URL, "{}", content_type="application/json", headers={"x-api-key": raw_key}
    )
    assert response.status_code == 400
    assert response["X-RateLimit-Remaining"] == "2"


def test_headers_show_tightest_window(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("two-windows", rate_limits="100/m, 2/h"))
    response = post(api_client, raw_key)
    assert response["X-RateLimit-Limit"] == "2"
    assert response["X-RateLimit-Remaining"] == "1"


def _start_new_hour(clock, api_key) -> None:
    """Move the clock to the start of the key's next hour window.

    django-ratelimit offsets each key's windows by an amount derived from the
    key, so the hour may end during a test's requests unless one starts now.
    """
    [hour] = count_request(
        RequestFactory().get("/"),
        group=KEY_GROUP,
        value=str(api_key.pk),
        rates=["3/h"],
        increment=False,
    )
    clock.shift(hour.reset)


def test_every_window_applies(api_client, upstream, clock):
    api_key, raw_key = make_key(tier=make_tier("two-windows", rate_limits="10/m, 3/h"))
    _start_new_hour(clock, api_key)
    statuses = []
    for _ in range(4):
        statuses.append(post(api_client, raw_key).status_code)
        clock.shift(61)
    assert statuses == [200, 200, 200, 429]


def test_retry_after_waits_for_every_used_up_window(api_client, upstream, clock):
    api_key, raw_key = make_key(tier=make_tier("two-windows", rate_limits="2/m, 3/h"))
    _start_new_hour(clock, api_key)
    post(api_client, raw_key)
    post(api_client, raw_key)
    # Over the minute's limit, and the refusal uses up the hour's last request.
    refused = post(api_client, raw_key)
    assert refused.status_code == 429
    assert refused["X-RateLimit-Remaining"] == "0"
    assert refused["Retry-After"] == refused["X-RateLimit-Reset"]

    clock.shift(int(refused["Retry-After"]))
    assert post(api_client, raw_key).status_code == 200


def test_same_period_rates_count_once(api_client, upstream, clock):
    # "60s" and "m" are the same window, which django-ratelimit keeps in one
    # counter, so each request must add 1 to it and not 1 per rate.
    _, raw_key = make_key(tier=make_tier("same-period", rate_limits="3/m, 100/60s"))
    responses = [post(api_client, raw_key) for _ in range(4)]
    statuses = [response.status_code for response in responses]
    assert statuses == [200, 200, 200, 429]
    assert responses[0]["X-RateLimit-Remaining"] == "2"


def test_lowered_limit_keeps_requests_counted(api_client, upstream, clock):
    tier = make_tier("ten", rate_limits="10/m")
    _, raw_key = make_key(tier=tier)
    for _ in range(8):
        assert post(api_client, raw_key).status_code == 200
    tier.rate_limits = "9/m"
    tier.save()

    ninth = post(api_client, raw_key)
    assert ninth.status_code == 200
    assert ninth["X-RateLimit-Limit"] == "9"
    assert ninth["X-RateLimit-Remaining"] == "0"
    refused = post(api_client, raw_key)
    assert refused.status_code == 429
    assert refused["X-RateLimit-Limit"] == "9"


def test_lowered_key_limit_keeps_requests_counted(api_client, upstream, clock):
    api_key, raw_key = make_key(tier=make_tier("ten", rate_limits="10/m"))
    for _ in range(3):
        post(api_client, raw_key)
    api_key.rate_limits = "3/m"
    api_key.save()
    assert post(api_client, raw_key).status_code == 429


def test_raised_limit_keeps_requests_counted(api_client, upstream, clock):
    tier = make_tier("two", rate_limits="2/m")
    _, raw_key = make_key(tier=tier)
    for _ in range(2):
        post(api_client, raw_key)
    tier.rate_limits = "5/m"
    tier.save()
    response = post(api_client, raw_key)
    assert response.status_code == 200
    assert response["X-RateLimit-Remaining"] == "2"


def test_key_rates_override_tier_rates(api_client, upstream, clock):
    tier = make_tier("generous", rate_limits="100/m")
    api_key, raw_key = make_key(tier=tier)
    api_key.rate_limits = "1/m"
    api_key.save()
    assert post(api_client, raw_key).status_code == 200
    assert post(api_client, raw_key).status_code == 429


def test_keys_are_counted_separately(api_client, upstream, clock):
    tier = make_tier("one", rate_limits="1/m")
    _, first = make_key(tier=tier)
    _, second = make_key(tier=tier)
    assert post(api_client, first).status_code == 200
    assert post(api_client, second).status_code == 200


def test_tier_without_rates_sends_no_headers(api_client, upstream):
    _, raw_key = make_key(tier=make_tier("unlimited"))
    response = post(api_client, raw_key)
    assert response.status_code == 200
    assert "X-RateLimit-Limit" not in response


def test_rate_refusal_is_recorded(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("one", rate_limits="1/m"))
    post(api_client, raw_key)
    post(api_client, raw_key)
    refused = UsageRecord.objects.get(status=UsageRecord.Status.REFUSED)
    assert refused.reason == "rate_limit_exceeded"
    assert refused.http_status == 429


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("60/m", id="per-minute"),
        pytest.param("1000/d, 10/s", id="two-rates"),
        pytest.param("5/10s", id="multiplier"),
        pytest.param("", id="empty"),
    ],
)
def test_valid_rates_pass(value):
    validate_rate_list(value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("60", id="no-period"),
        pytest.param("60/minute", id="word-period"),
        pytest.param("0/m", id="zero-count"),
        pytest.param("5/0m", id="zero-multiplier"),
        pytest.param("-1/m", id="negative"),
        pytest.param("60/m; 5/s", id="semicolon"),
        pytest.param("1/99999999999999d", id="huge-period"),
        pytest.param("1/367d", id="over-a-year"),
        pytest.param("9999999999/m", id="huge-count"),
    ],
)
def test_invalid_rates_are_rejected(value):
    with pytest.raises(ValidationError, match="not a valid rate"):
        validate_rate_list(value)


def test_rate_with_trailing_newline_is_invalid():
    # The rate limits at request time read a rate the same way.
    with pytest.raises(ValidationError, match="not a valid rate"):
        validate_rate("60/m\n")


def test_tier_with_bad_rate_fails_validation():
    tier = make_tier("bad")
    tier.rate_limits = "lots/m"
    with pytest.raises(ValidationError) as excinfo:
        tier.full_clean()
    assert "rate_limits" in excinfo.value.message_dict


class TestCacheDown:
    def test_fails_closed_by_default(self, api_client, upstream, settings, caplog):
        _, raw_key = make_key(tier=make_tier("five", rate_limits="5/m"))
        settings.CACHES = BROKEN_CACHE
        response = post(api_client, raw_key)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "limits_unavailable"
        assert "failing closed" in caplog.text
        assert upstream.requests == []

    def test_fails_open_when_configured(self, api_client, upstream, settings):
        _, raw_key = make_key(tier=make_tier("five", rate_limits="5/m"))
        settings.CACHES = BROKEN_CACHE
        settings.PROXY_LIMITS_FAIL_OPEN = True
        response = post(api_client, raw_key)
        assert response.status_code == 200


@pytest.mark.parametrize("fail_open", [False, True], ids=["closed", "open"])
def test_invalid_rate_is_not_cache_failure(settings, caplog, fail_open):
    settings.PROXY_LIMITS_FAIL_OPEN = fail_open
    with pytest.raises(ValueError, match="'abc' is not a valid rate"):
        count_request(
            RequestFactory().get("/"),
            group=KEY_GROUP,
            value="1",
            rates=["abc"],
            increment=True,
        )
    assert "cache failed" not in caplog.text


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        pytest.param("60/m", (60, 60), id="per-minute"),
        pytest.param("5/10s", (5, 10), id="multiplier"),
        pytest.param("1000/d", (1000, 86400), id="per-day"),
    ],
)
def test_split_rate_returns_count_and_period(rate, expected):
    assert split_rate(rate) == expected


@pytest.mark.parametrize("rate", ["abc", "60", "0/m", "5/0m", "60/m ", "60/m\n"])
def test_split_rate_rejects_invalid_rate(rate):
    with pytest.raises(ValueError, match="not a valid rate"):
        split_rate(rate)


class TestFailedAttempts:
    def test_wrong_keys_are_limited_per_address(self, api_client, settings, clock):
        settings.PROXY_FAILED_AUTH_RATE = "3/m"
        wrong = "sk-AAAAAAAA-" + "B" * 40
        statuses = [post(api_client, wrong).status_code for _ in range(4)]
        assert statuses == [403, 403, 403, 429]

    def test_blocked_address_cannot_use_right_key(
        self, api_client, upstream, settings, clock
    ):
        settings.PROXY_FAILED_AUTH_RATE = "2/m"
        _, raw_key = make_key()
        for _ in range(2):
            post(api_client, "sk-AAAAAAAA-" + "B" * 40)
        response = post(api_client, raw_key)
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "too_many_failed_attempts"
        assert int(response["Retry-After"]) >= 1

    def test_block_lifts_after_window(self, api_client, upstream, settings, clock):
        settings.PROXY_FAILED_AUTH_RATE = "1/m"
        _, raw_key = make_key()
        post(api_client, "sk-AAAAAAAA-" + "B" * 40)
        clock.shift(61)
        assert post(api_client, raw_key).status_code == 200

    def test_lowered_rate_keeps_attempts_counted(self, api_client, settings, clock):
        settings.PROXY_FAILED_AUTH_RATE = "5/m"
        wrong = "sk-AAAAAAAA-" + "B" * 40
        for _ in range(2):
            post(api_client, wrong)
        settings.PROXY_FAILED_AUTH_RATE = "3/m"
        statuses = [post(api_client, wrong).status_code for _ in range(2)]
        assert statuses == [403, 429]

    def test_forwarded_for_does_not_change_address(self, api_client, settings, clock):
        settings.PROXY_FAILED_AUTH_RATE = "1/m"
        wrong = "sk-AAAAAAAA-" + "B" * 40
        post(api_client, wrong, **{"X-Forwarded-For": "203.0.113.1"})
        response = post(api_client, wrong, **{"X-Forwarded-For": "203.0.113.2"})
        assert response.status_code == 429


class TestClientIp:
    def test_socket_address_without_trusted_proxies(self):
        request = RequestFactory().get(
            "/", REMOTE_ADDR="198.51.100.7", HTTP_X_FORWARDED_FOR="203.0.113.9"
        )
        assert client_ip(request) == "198.51.100.7"

    def test_forwarded_address_from_trusted_proxy(self, settings):
        settings.PROXY_TRUSTED_PROXIES = ["10.0.0.0/8"]
        request = RequestFactory().get(
            "/",
            REMOTE_ADDR="10.0.0.5",
            HTTP_X_FORWARDED_FOR="198.51.100.1, 203.0.113.9, 10.0.0.4",
        )
        assert client_ip(request) == "203.0.113.9"

    def test_untrusted_peer_forwarded_header_ignored(self, settings):
        settings.PROXY_TRUSTED_PROXIES = ["10.0.0.0/8"]
        request = RequestFactory().get(
            "/", REMOTE_ADDR="198.51.100.7", HTTP_X_FORWARDED_FOR="203.0.113.9"
        )
        assert client_ip(request) == "198.51.100.7"

    def test_garbage_forwarded_value_falls_back_to_peer(self, settings):
        settings.PROXY_TRUSTED_PROXIES = ["10.0.0.0/8"]
        request = RequestFactory().get(
            "/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="not-an-ip"
        )
        assert client_ip(request) == "10.0.0.5"


def test_refusal_is_json_for_browsers(api_client, upstream, clock):
    _, raw_key = make_key(tier=make_tier("one", rate_limits="1/m"))
    post(api_client, raw_key)
    refused = post(api_client, raw_key, Accept="text/html")
    assert refused.status_code == 429
    assert refused["Content-Type"] == "application/json"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_bad_rate_is_rejected_on_save():
    tier = make_tier("saved")
    tier.rate_limits = "ten/m"
    with pytest.raises(ValidationError, match="not a valid rate"):
        tier.save()
