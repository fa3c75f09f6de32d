import datetime
import email.utils
import json
import logging

import pytest
from django.conf import settings
from django.db import OperationalError
from django.test import RequestFactory

from generation import quotas, records, usage
from generation.models import QuotaCounter, UsageRecord
from generation.usage import UsageTracker
from generation.views import GenerateTextView
from tests.factories import make_key, make_tier
from tests.fake_upstream import INTERNAL_DETAIL, Behaviour
from tests.replies import (
    MALFORMED_CHUNKS,
    MALFORMED_COMPLETIONS,
    finish_chunk,
    text_chunk,
)

pytestmark = pytest.mark.django_db

URL = "/generate-text/"


def post(client, body, *, key=None, header="x-api-key", **extra):
    headers = {}
    if key is not None:
        if header == "x-api-key":
            headers["x-api-key"] = key
        else:
            headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    content_type = extra.pop("content_type", "application/json")
    return client.post(URL, data, content_type=content_type, headers=headers, **extra)


def test_generation_returns_upstream_text(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "tell me a joke"}, key=raw_key)
    assert response.status_code == 200
    body = response.json()
    assert body["text"] == "echo: tell me a joke"
    assert body["model"] == settings.PROXY_DEFAULT_MODEL
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_upstream_receives_prompt_and_upstream_key(api_client, upstream):
    _, raw_key = make_key()
    post(api_client, {"prompt": "hello there", "system": "be brief"}, key=raw_key)
    [received] = upstream.requests
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == f"Bearer {settings.OPENAI_API_KEY}"
    assert raw_key not in received.body.decode()
    assert raw_key not in str(dict(received.headers))
    assert received.json["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]


def test_bearer_header_is_accepted(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key, header="bearer")
    assert response.status_code == 200


def test_x_api_key_wins_over_bearer(api_client, upstream):
    _, raw_key = make_key()
    response = post(
        api_client,
        {"prompt": "hi"},
        key=raw_key,
        HTTP_AUTHORIZATION="Bearer sk-wrong",
    )
    assert response.status_code == 200


def test_optional_fields_are_forwarded(api_client, upstream):
    _, raw_key = make_key()
    body = {"prompt": "hi", "model": "gpt-4o", "max_tokens": 7, "temperature": 0.5}
    response = post(api_client, body, key=raw_key)
    assert response.status_code == 200
    assert response.json()["model"] == "gpt-4o"
    sent = upstream.requests[0].json
    assert sent["model"] == "gpt-4o"
    assert sent["max_tokens"] == 7
    assert sent["temperature"] == 0.5


def test_tier_default_model_is_used(api_client, upstream):
    _, raw_key = make_key(tier=make_tier("fancy", default_model="gpt-4o"))
    post(api_client, {"prompt": "hi"}, key=raw_key)
    assert upstream.requests[0].json["model"] == "gpt-4o"


def test_response_carries_request_id(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert len(response["X-Request-ID"]) == 32


def test_sane_client_request_id_is_kept(api_client, upstream):
    _, raw_key = make_key()
    response = post(
        api_client, {"prompt": "hi"}, key=raw_key, HTTP_X_REQUEST_ID="trace-42"
    )
    assert response["X-Request-ID"] == "trace-42"


@pytest.mark.parametrize(
    "request_id",
    ["bad id\nx", "trace-42\n", "x" * 129],
    ids=["inner-newline", "trailing-newline", "too-long"],
)
def test_unsafe_client_request_id_is_replaced(api_client, upstream, request_id):
    _, raw_key = make_key()
    response = post(
        api_client, {"prompt": "hi"}, key=raw_key, HTTP_X_REQUEST_ID=request_id
    )
    assert response.status_code == 200
    assert response["X-Request-ID"] != request_id
    assert len(response["X-Request-ID"]) == 32


def test_request_id_is_in_log_line(api_client, upstream, caplog):
    _, raw_key = make_key()
    with caplog.at_level(logging.INFO):
        response = post(api_client, {"prompt": "hi"}, key=raw_key)
    request_id = response["X-Request-ID"]
    access = [r for r in caplog.records if r.name == "proxy.access"]
    assert len(access) == 1
    assert access[0].request_id == request_id
    assert access[0].fields["status"] == 200


# Every way a key can be wrong gets the same 403 and the same message.
def _revoked_key():
    from keys.services import revoke_key

    api_key, raw_key = make_key()
    revoke_key(api_key=api_key)
    return raw_key


def _expired_key():
    import datetime

    from django.utils import timezone

    api_key, raw_key = make_key()
    api_key.expires_at = timezone.now() - datetime.timedelta(minutes=1)
    api_key.save()
    return raw_key


BAD_KEYS = [
    pytest.param(lambda: None, id="missing"),
    pytest.param(lambda: "not-a-key", id="malformed"),
    pytest.param(lambda: "sk-AAAAAAAA-" + "B" * 40, id="unknown"),
    pytest.param(lambda: make_key()[1][:-1] + "#", id="wrong-secret-charset"),
    pytest.param(lambda: make_key()[1][:-2] + "zz", id="wrong-secret"),
    pytest.param(_revoked_key, id="revoked"),
    pytest.param(_expired_key, id="expired"),
]


@pytest.mark.parametrize("bad_key", BAD_KEYS)
@pytest.mark.parametrize("header", ["x-api-key", "bearer"])
def test_bad_key_is_denied_uniformly(api_client, upstream, bad_key, header):
    response = post(api_client, {"prompt": "hi"}, key=bad_key(), header=header)
    assert response.status_code == 403
    assert response.json() == {
        "error": {
            "message": "The API key is missing or invalid.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert upstream.requests == []


BAD_INPUTS = [
    pytest.param({}, "prompt", id="missing-prompt"),
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": "   "}, "prompt", id="blank-prompt"),
    pytest.param({"prompt": 42}, "prompt", id="prompt-number"),
    pytest.param({"prompt": ["a"]}, "prompt", id="prompt-list"),
    pytest.param({"prompt": None}, "prompt", id="prompt-null"),
    pytest.param({"prompt": "hi", "model": 3}, "model", id="model-number"),
    pytest.param(
        {"prompt": "hi", "max_tokens": "5"}, "max_tokens", id="max-tokens-string"
    ),
    pytest.param({"prompt": "hi", "max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param(
        {"prompt": "hi", "max_tokens": True}, "max_tokens", id="max-tokens-bool"
    ),
    pytest.param(
        {"prompt": "hi", "max_tokens": 1.5}, "max_tokens", id="max-tokens-float"
    ),
    pytest.param(
        {"prompt": "hi", "temperature": 3}, "temperature", id="temperature-high"
    ),
    pytest.param(
        {"prompt": "hi", "temperature": "hot"}, "temperature", id="temperature-string"
    ),
    pytest.param({"prompt": "hi", "system": 1}, "system", id="system-number"),
    pytest.param({"prompt": "hi", "promt": "typo"}, "promt", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "param"), BAD_INPUTS)
def test_bad_input_is_rejected(api_client, upstream, body, param):
    _, raw_key = make_key()
    response = post(api_client, body, key=raw_key)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ")
    assert upstream.requests == []


def test_body_that_is_not_an_object_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, ["prompt"], key=raw_key)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


def test_malformed_json_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, '{"prompt": "hi"', key=raw_key)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_unknown_content_type_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, "prompt=hi", key=raw_key, content_type="text/plain")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_form_content_type_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    response = post(
        api_client,
        "prompt=hi",
        key=raw_key,
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 415


def test_oversized_body_is_rejected(api_client, upstream, settings):
    settings.PROXY_MAX_REQUEST_BYTES = 100
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "x" * 200}, key=raw_key)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert upstream.requests == []


def test_body_at_the_limit_is_accepted(api_client, upstream, settings):
    body = json.dumps({"prompt": "x" * 50})
    settings.PROXY_MAX_REQUEST_BYTES = len(body)
    _, raw_key = make_key()
    response = post(api_client, body, key=raw_key)
    assert response.status_code == 200


def test_wrong_method_gets_405_with_allow(api_client, upstream):
    response = api_client.get(URL, HTTP_ACCEPT="application/json")
    assert response.status_code == 405
    assert "POST" in response["Allow"]
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        pytest.param(URL, "POST", id="generate-text"),
        pytest.param("/v1/chat/completions", "POST", id="chat-completions"),
        pytest.param("/v1/models", "GET", id="models"),
        pytest.param("/v1/models/gpt-4o-mini", "GET", id="model-detail"),
        pytest.param("/v1/embeddings", "POST", id="embeddings"),
    ],
)
@pytest.mark.parametrize("with_key", [True, False], ids=["key", "no-key"])
def test_options_gets_405_without_key_lookup(
    api_client, django_assert_num_queries, path, allowed, with_key
):
    _, raw_key = make_key()
    headers = {"x-api-key": raw_key, "Authorization": f"Bearer {raw_key}"}

    with django_assert_num_queries(0):
        response = api_client.options(path, headers=headers if with_key else {})

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert allowed in response["Allow"]
    assert "OPTIONS" not in response["Allow"]
    assert "WWW-Authenticate" not in response
    assert "X-RateLimit-Limit" not in response


def test_browsable_api_shows_form(api_client):
    response = api_client.get(URL, HTTP_ACCEPT="text/html")
    content = response.content.decode()
    assert response["Content-Type"].startswith("text/html")
    assert "<form" in content
    assert "Generate Text" in content


# OpenAI's reply when the account has no credit left.
QUOTA_EXHAUSTED = Behaviour(
    status=429,
    body={
        "error": {
            "message": f"You exceeded your current quota ({INTERNAL_DETAIL}).",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    },
)

UPSTREAM_FAILURES = [
    pytest.param(Behaviour(delay=5), 504, "upstream_timeout", id="timeout"),
    pytest.param(
        Behaviour(close_connection=True), 502, "upstream_error", id="connection-closed"
    ),
    pytest.param(Behaviour(status=500), 502, "upstream_error", id="upstream-500"),
    pytest.param(Behaviour(status=503), 502, "upstream_error", id="upstream-503"),
    pytest.param(
        Behaviour(status=200, body=b"not json"), 502, "upstream_error", id="garbage-200"
    ),
    pytest.param(
        Behaviour(status=429, headers={"retry-after": "7"}),
        503,
        "upstream_rate_limited",
        id="upstream-429",
    ),
    pytest.param(
        Behaviour(status=401), 502, "upstream_misconfigured", id="upstream-401"
    ),
    pytest.param(
        QUOTA_EXHAUSTED, 502, "upstream_misconfigured", id="upstream-quota-exhausted"
    ),
    pytest.param(
        Behaviour(status=403), 502, "upstream_misconfigured", id="upstream-403"
    ),
    pytest.param(
        Behaviour(status=400), 400, "upstream_rejected_request", id="upstream-400"
    ),
    pytest.param(
        Behaviour(status=404), 400, "upstream_rejected_request", id="upstream-404"
    ),
]


@pytest.mark.parametrize(("behaviour", "status", "code"), UPSTREAM_FAILURES)
def test_upstream_failure_is_mapped(
    api_client, upstream, settings, behaviour, status, code, caplog
):
    settings.PROXY_UPSTREAM_TIMEOUT = 0.5
    upstream.queue(behaviour)
    _, raw_key = make_key()
    with caplog.at_level(logging.DEBUG):
        response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    text = response.content.decode() + str(response.headers)
    assert INTERNAL_DETAIL not in text
    assert "127.0.0.1" not in text
    assert settings.OPENAI_API_KEY not in text
    assert settings.OPENAI_API_KEY not in caplog.text


def test_upstream_rate_limit_passes_retry_after(api_client, upstream):
    upstream.queue(Behaviour(status=429, headers={"retry-after": "7"}))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response["Retry-After"] == "7"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"retry-after": "inf"}, id="infinite"),
        pytest.param({"retry-after": "nan"}, id="not-a-number"),
        pytest.param({"retry-after": "-5"}, id="negative"),
        pytest.param({"retry-after": "soon"}, id="not-numeric"),
        pytest.param({"retry-after-ms": "1e400"}, id="milliseconds-overflow"),
        pytest.param(
            {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, id="date-in-past"
        ),
    ],
)
def test_unusable_upstream_retry_after_gets_default(api_client, upstream, headers):
    upstream.queue(Behaviour(status=429, headers=headers))
    api_key, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_rate_limited"
    assert response["Retry-After"] == "1"
    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == "failed"
    assert record.reason == "upstream_rate_limited"


def test_upstream_retry_after_date_is_converted(api_client, upstream):
    # RFC 9110 allows an HTTP date as well as a number of seconds.
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=90)
    date = email.utils.format_datetime(moment, usegmt=True)
    upstream.queue(Behaviour(status=429, headers={"retry-after": date}))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 503
    assert 85 <= int(response["Retry-After"]) <= 90


def test_huge_upstream_retry_after_is_capped(api_client, upstream):
    upstream.queue(Behaviour(status=429, headers={"retry-after": "99999999999999"}))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 503
    assert response["Retry-After"] == "3600"


def test_upstream_retry_after_ms_is_rounded_up(api_client, upstream):
    upstream.queue(Behaviour(status=429, headers={"retry-after-ms": "1500"}))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response["Retry-After"] == "2"


def test_upstream_credential_failure_is_logged_as_error(api_client, upstream, caplog):
    upstream.queue(Behaviour(status=401))
    _, raw_key = make_key()
    with caplog.at_level(logging.INFO):
        post(api_client, {"prompt": "hi"}, key=raw_key)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "credentials" in errors[0].getMessage()


def test_upstream_quota_exhausted_is_not_retryable(api_client, upstream, caplog):
    upstream.queue(QUOTA_EXHAUSTED)
    api_key, raw_key = make_key()
    with caplog.at_level(logging.INFO):
        response = post(api_client, {"prompt": "hi"}, key=raw_key)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_misconfigured"
    assert "Retry-After" not in response
    assert len(errors) == 1
    assert "no quota or credit" in errors[0].getMessage()
    assert UsageRecord.objects.get(api_key=api_key).reason == "upstream_misconfigured"


def test_upstream_rate_limit_with_other_code_is_503(api_client, upstream):
    body = {"error": {"message": "Slow down.", "code": "rate_limit_exceeded"}}
    upstream.queue(Behaviour(status=429, body=body, headers={"retry-after": "3"}))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_rate_limited"
    assert response["Retry-After"] == "3"


def test_upstream_unreachable_is_502(api_client, settings):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


def test_missing_upstream_key_is_a_clear_error(api_client, upstream, settings, caplog):
    settings.OPENAI_API_KEY = ""
    _, raw_key = make_key()
    with caplog.at_level(logging.ERROR):
        response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_misconfigured"
    assert "OPENAI_API_KEY is not set" in caplog.text
    assert upstream.requests == []


def test_no_response_or_log_contains_upstream_key(
    api_client, upstream, settings, caplog
):
    _, raw_key = make_key()
    quoted_key = f"Incorrect API key provided: {settings.OPENAI_API_KEY}"
    with caplog.at_level(logging.DEBUG):
        ok = post(api_client, {"prompt": "hi"}, key=raw_key)
        upstream.queue(
            Behaviour(
                status=401,
                body={
                    "error": {
                        "message": quoted_key,
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
            )
        )
        failed = post(api_client, {"prompt": "hi"}, key=raw_key)
    for response in (ok, failed):
        assert settings.OPENAI_API_KEY not in response.content.decode()
        assert settings.OPENAI_API_KEY not in str(response.headers)
    assert settings.OPENAI_API_KEY not in caplog.text
    assert raw_key not in caplog.text


def test_healthz_needs_no_key(api_client):
    response = api_client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def read_events(response) -> list[str]:
    body = b"".join(response.streaming_content).decode()
    return [block.removeprefix("data: ") for block in body.split("\n\n") if block]


def test_stream_sends_text_then_usage(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "one two", "stream": True}, key=raw_key)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    events = read_events(response)
    assert events[-1] == "[DONE]"
    pieces = [json.loads(event) for event in events[:-1]]
    text = "".join(piece.get("text", "") for piece in pieces)
    assert text == "echo: one two"
    assert pieces[-1]["usage"]["total_tokens"] == 5
    assert pieces[-1]["model"] == settings.PROXY_DEFAULT_MODEL


def test_stream_carries_request_id(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi", "stream": True}, key=raw_key)
    assert len(response["X-Request-ID"]) == 32
    assert response["Cache-Control"] == "no-cache"


def test_stream_failure_ends_with_error_event(api_client, upstream):
    upstream.queue(Behaviour(drop_after_chunks=1))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "one two", "stream": True}, key=raw_key)
    events = read_events(response)
    last = json.loads(events[-1])
    assert last["error"]["code"] == "upstream_error"
    assert "[DONE]" not in events
    assert INTERNAL_DETAIL not in "".join(events)


def test_stream_past_time_limit_ends_with_error(api_client, upstream, settings):
    settings.PROXY_MAX_STREAM_SECONDS = 0.3
    # Each pause is shorter than the read timeout, so only the stream's total
    # length can end it.
    upstream.queue(Behaviour(stall_after_chunks=1, stall_seconds=0.5))
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))
    body = {"prompt": "one two three", "stream": True}

    response = post(api_client, body, key=raw_key)
    events = read_events(response)

    last = json.loads(events[-1])
    assert last["error"]["code"] == "stream_time_limit"
    assert "[DONE]" not in events
    assert json.loads(events[0]) == {"text": "echo:"}
    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == UsageRecord.Status.FAILED
    assert record.reason == "stream_time_limit"
    assert record.http_status == 504
    assert record.completion_tokens > 0
    counter = QuotaCounter.objects.get(api_key=api_key)
    assert counter.reserved == 0
    assert counter.used == record.prompt_tokens + record.completion_tokens


@pytest.mark.parametrize("malformed", MALFORMED_CHUNKS)
@pytest.mark.parametrize("position", [0, 1], ids=["first", "later"])
def test_stream_malformed_event_ends_with_error(
    api_client, upstream, malformed, position
):
    events = [text_chunk("hello"), finish_chunk()]
    events.insert(position, malformed)
    upstream.queue(Behaviour(events=events))
    api_key, raw_key = make_key()
    response = post(api_client, {"prompt": "hi", "stream": True}, key=raw_key)
    assert response.status_code == 200
    events = read_events(response)
    error_events = [event for event in events if '"error"' in event]
    assert error_events == [events[-1]]
    assert json.loads(events[-1])["error"]["code"] == "upstream_error"
    assert len(events) == position + 1
    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == UsageRecord.Status.FAILED
    assert record.reason == "upstream_error"
    assert record.http_status == 502


def test_stream_fault_in_proxy_ends_with_error(
    api_client, upstream, monkeypatch, caplog
):
    from generation.streaming import ChatStreamRelay

    observe = ChatStreamRelay._observe
    seen = []

    def observe_then_fail(self, event):
        seen.append(event)
        if len(seen) == 2:
            raise RuntimeError("fault in the relay")
        observe(self, event)

    monkeypatch.setattr(ChatStreamRelay, "_observe", observe_then_fail)
    upstream.queue(
        Behaviour(events=[text_chunk("hello"), text_chunk(" there"), finish_chunk()])
    )
    api_key, raw_key = make_key()

    with caplog.at_level(logging.ERROR, logger="generation.streaming"):
        response = post(api_client, {"prompt": "hi", "stream": True}, key=raw_key)
        events = read_events(response)

    assert len(events) == 2
    assert json.loads(events[-1])["error"]["code"] == "internal_error"
    assert "fault in the relay" not in "".join(events)
    assert "Stream relay failed." in caplog.text
    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == UsageRecord.Status.FAILED
    assert record.http_status == 500
    assert record.reason == "internal_error"
    assert record.completion_tokens > 0


class DatabaseOutage:
    """Make the usage record and quota statements fail while `down` is true.

    They raise OperationalError, as when the database is unreachable or no
    pooled connection comes free in time.
    """

    def __init__(self, monkeypatch) -> None:
        self.down = False
        # Statements that fail next, whether or not the database is down.
        self.failures_left = 0
        self.failed_statements = 0
        self._execute_together = records.execute_together
        for module in (records, usage, quotas):
            monkeypatch.setattr(module, "execute_together", self._execute)

    def _execute(self, connection, statements):
        if self.down or self.failures_left:
            self.failures_left = max(0, self.failures_left - 1)
            self.failed_statements += 1
            raise OperationalError("connection to the database failed")
        return self._execute_together(connection, statements)


def assert_failed_and_charged(api_key, reason: str, http_status: int) -> None:
    """Check that the key's one record failed with `reason` and was charged."""
    record = UsageRecord.objects.get(api_key=api_key)
    counter = QuotaCounter.objects.get(api_key=api_key, period="day")
    assert record.status == UsageRecord.Status.FAILED
    assert record.reason == reason
    assert record.http_status == http_status
    assert record.total_tokens > 0
    assert counter.used == record.total_tokens
    assert counter.reserved == 0


def read_events_through_outage(response, outage: DatabaseOutage) -> list[str]:
    """Read a stream, with the database down from the first event to the error."""
    events = []
    for chunk in response.streaming_content:
        events.append(chunk.decode().removeprefix("data: ").rstrip("\n"))
        outage.down = "error" not in events[-1]
    return events


@pytest.mark.django_db(transaction=True)
def test_stream_settled_in_outage_ends_with_error(api_client, upstream, monkeypatch):
    outage = DatabaseOutage(monkeypatch)
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    response = post(api_client, {"prompt": "one two", "stream": True}, key=raw_key)
    events = read_events_through_outage(response, outage)

    errors = [event for event in events if "error" in event]
    assert len(errors) == 1
    assert json.loads(events[-1])["error"]["code"] == "database_unavailable"
    assert "[DONE]" not in events
    # The combined statement and the quota's own: no third try before the
    # client gets its event.
    assert outage.failed_statements == 2
    # Closing the response, with the database back, records the stream.
    assert_failed_and_charged(api_key, "database_unavailable", 503)


@pytest.mark.django_db(transaction=True)
def test_stream_failing_in_outage_ends_with_error(api_client, upstream, monkeypatch):
    outage = DatabaseOutage(monkeypatch)
    upstream.queue(Behaviour(drop_after_chunks=2))
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    response = post(api_client, {"prompt": "one two", "stream": True}, key=raw_key)
    events = read_events_through_outage(response, outage)

    errors = [event for event in events if "error" in event]
    assert len(errors) == 1
    assert json.loads(events[-1])["error"]["code"] == "upstream_error"
    assert "[DONE]" not in events
    assert_failed_and_charged(api_key, "upstream_error", 502)


@pytest.mark.django_db(transaction=True)
def test_stream_left_in_outage_is_settled(upstream, monkeypatch):
    outage = DatabaseOutage(monkeypatch)
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    # The view is called without Django's test client, which closes a
    # response twice, where a server closes it once.
    request = RequestFactory().post(
        URL,
        json.dumps({"prompt": "one two", "stream": True}),
        content_type="application/json",
        headers={"x-api-key": raw_key},
    )
    request.request_id = "stream-left-in-outage"
    response = GenerateTextView.as_view()(request)
    next(iter(response.streaming_content))
    # The client leaves, and the database is down for the first settlement.
    outage.failures_left = 2
    response.close()

    record = UsageRecord.objects.get(api_key=api_key)
    counter = QuotaCounter.objects.get(api_key=api_key, period="day")
    assert outage.failures_left == 0
    assert record.status == UsageRecord.Status.FAILED
    assert record.reason == "client_disconnected"
    assert record.total_tokens > 0
    assert counter.used == record.total_tokens
    assert counter.reserved == 0


@pytest.mark.django_db(transaction=True)
def test_completion_settled_in_outage_is_charged(api_client, upstream, monkeypatch):
    outage = DatabaseOutage(monkeypatch)
    succeed = UsageTracker.succeed

    def succeed_in_outage(self, **tokens):
        # The outage ends after the combined statement and the quota's own
        # statement have failed.
        outage.failures_left = 2
        succeed(self, **tokens)

    monkeypatch.setattr(UsageTracker, "succeed", succeed_in_outage)
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    response = post(api_client, {"prompt": "one two"}, key=raw_key)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"
    record = UsageRecord.objects.get(api_key=api_key)
    counter = QuotaCounter.objects.get(api_key=api_key, period="day")
    assert record.status == UsageRecord.Status.FAILED
    assert record.total_tokens > 0
    assert counter.used == record.total_tokens
    assert counter.reserved == 0


def test_stream_refusal_is_plain_error(api_client, upstream):
    upstream.queue(Behaviour(status=500))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi", "stream": True}, key=raw_key)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


def test_stream_must_be_boolean(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi", "stream": "yes"}, key=raw_key)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


def test_path_without_slash_is_served(api_client, upstream):
    _, raw_key = make_key()
    response = api_client.post(
        "/generate-text",
        json.dumps({"prompt": "hi"}),
        content_type="application/json",
        headers={"x-api-key": raw_key},
    )
    assert response.status_code == 200
    assert response.json()["text"] == "echo: hi"


def test_deeply_nested_json_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    body = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = post(api_client, body, key=raw_key)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_special_token_text_is_a_normal_prompt(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "<|endoftext|>"}, key=raw_key)
    assert response.status_code == 200


def test_unknown_path_gets_json_404(client):
    response = client.get("/no-such-page")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_admin_unknown_path_keeps_html_404(client):
    response = client.get("/admin/no-such-page/")
    assert response.status_code in (302, 404)
    assert not response["Content-Type"].startswith("application/json")


def test_disallowed_host_gets_json_400(client):
    response = client.get("/healthz", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_healthz_rejects_post_with_405(client):
    response = client.post("/healthz")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"


def test_reply_without_choices_is_upstream_error(api_client, upstream):
    upstream.queue(Behaviour(status=200, body={"unexpected": True}))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("body", MALFORMED_COMPLETIONS)
def test_malformed_reply_is_upstream_error(api_client, upstream, body):
    upstream.queue(Behaviour(status=200, body=body))
    api_key, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == UsageRecord.Status.FAILED
    assert record.reason == "upstream_error"


def test_nonsense_usage_is_counted_by_proxy(api_client, upstream):
    usage = {"prompt_tokens": -5, "completion_tokens": 2, "total_tokens": -3}
    upstream.queue(Behaviour(usage=usage))
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] > 0
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("huge", [10**19, 2**62, 2**31])
def test_huge_usage_is_counted_by_proxy(api_client, upstream, huge):
    usage = {"prompt_tokens": huge, "completion_tokens": 2, "total_tokens": huge}
    upstream.queue(Behaviour(usage=usage))
    api_key, raw_key = make_key()
    response = post(api_client, {"prompt": "hi"}, key=raw_key)
    assert response.status_code == 200
    assert 0 < response.json()["usage"]["prompt_tokens"] < 100
    assert UsageRecord.objects.get(api_key=api_key).status == "succeeded"


def test_prompt_whitespace_is_kept(api_client, upstream):
    _, raw_key = make_key()
    prompt = "  def f():\n    return 1\n\n"
    post(api_client, {"prompt": prompt}, key=raw_key)
    assert upstream.requests[0].json["messages"][-1]["content"] == prompt


def test_model_with_newline_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, {"prompt": "hi", "model": "gpt\n4o"}, key=raw_key)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_upstream_retries_are_logged(api_client, upstream, settings, caplog):
    settings.PROXY_UPSTREAM_MAX_RETRIES = 1
    upstream.queue(Behaviour(status=500))
    _, raw_key = make_key()
    with caplog.at_level(logging.INFO):
        response = post(api_client, {"prompt": "hi"}, key=raw_key)
    retries = [r for r in caplog.records if "Retrying request" in r.getMessage()]
    assert response.status_code == 200
    assert len(retries) == 1
    assert retries[0].request_id == response["X-Request-ID"]


def test_lone_surrogate_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, '{"prompt": "hi \\ud800"}', key=raw_key)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


def test_surrogate_pair_escape_is_text(api_client, upstream):
    _, raw_key = make_key()
    response = post(api_client, '{"prompt": "hi \\ud83d\\ude00"}', key=raw_key)
    assert response.status_code == 200
    assert response.json()["text"] == "echo: hi \U0001f600"


def test_declared_length_over_django_limit_is_413(api_client, upstream):
    api_key, raw_key = make_key()
    response = post(
        api_client, {"prompt": "hi"}, key=raw_key, CONTENT_LENGTH="99999999"
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == "refused"
    assert record.http_status == 413
    assert record.reason == "request_too_large"


def test_chunked_body_without_length_is_411(api_client, upstream):
    _, raw_key = make_key()
    response = post(
        api_client,
        {"prompt": "hi"},
        key=raw_key,
        CONTENT_LENGTH="",
        HTTP_TRANSFER_ENCODING="chunked",
    )
    assert response.status_code == 411
    assert response.json()["error"]["code"] == "length_required"
