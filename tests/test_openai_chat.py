"""The /v1/chat/completions endpoint, driven by the real openai client over HTTP."""

import itertools
import json
import socket
import statistics
import time
import urllib.parse

import openai
import pytest

from generation.models import QuotaCounter, UsageRecord
from generation.streaming import split_lines
from generation.tokens import count_text_tokens
from keys.models import PromptRule
from tests.factories import make_key, make_tier
from tests.fake_upstream import INTERNAL_DETAIL, Behaviour
from tests.replies import (
    GENERATED_DELTAS,
    GENERATED_MESSAGES,
    MALFORMED_CHUNKS,
    MALFORMED_COMPLETIONS,
    chunk,
    completion,
    finish_chunk,
    text_chunk,
)

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def tier():
    return make_tier("sdk", rate_limits="100/m", tokens_per_day=100_000)


@pytest.fixture
def raw_key(tier):
    return make_key(tier=tier)[1]


@pytest.fixture
def sdk(live_server, upstream, raw_key):
    client = openai.OpenAI(
        base_url=live_server.url + "/v1", api_key=raw_key, max_retries=0, timeout=10
    )
    yield client
    client.close()


def create(sdk, **kwargs):
    kwargs.setdefault("model", "gpt-4o-mini")
    kwargs.setdefault("messages", MESSAGES)
    return sdk.chat.completions.create(**kwargs)


class TestCompletions:
    def test_completion_returns_upstream_reply(self, sdk, upstream):
        completion = create(sdk)
        assert completion.choices[0].message.content == "echo: hello there"
        assert completion.usage.total_tokens == 5

    def test_null_stream_gets_completion(self, sdk, upstream):
        # OpenAI's API takes "stream": null as false, and the SDK sends null
        # for stream=None.
        completion = create(sdk, stream=None)
        assert completion.choices[0].message.content == "echo: hello there"
        assert "stream" not in upstream.requests[0].json

    def test_upstream_gets_proxy_key_not_clients(
        self, sdk, upstream, raw_key, settings
    ):
        create(sdk)
        received = upstream.requests[0]
        assert received.headers["Authorization"] == f"Bearer {settings.OPENAI_API_KEY}"
        assert raw_key not in str(dict(received.headers))

    def test_options_are_forwarded(self, sdk, upstream):
        create(sdk, temperature=0.2, seed=7, stop=["x"], user="u-1")
        sent = upstream.requests[0].json
        assert sent["temperature"] == 0.2
        assert sent["seed"] == 7
        assert sent["stop"] == ["x"]
        assert sent["user"] == "u-1"

    def test_usage_is_recorded_and_settled(self, sdk, upstream):
        completion = create(sdk)
        record = UsageRecord.objects.get()
        assert record.endpoint == "chat.completions"
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert record.prompt_tokens == completion.usage.prompt_tokens
        day = QuotaCounter.objects.get(period="day")
        assert day.reserved == 0
        assert day.used == completion.usage.total_tokens

    @pytest.mark.parametrize("message", GENERATED_MESSAGES)
    def test_output_without_content_is_counted(self, sdk, upstream, message):
        upstream.queue(Behaviour(status=200, body=completion(**message)))
        create(sdk)
        record = UsageRecord.objects.get()
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert record.completion_tokens >= 300
        assert QuotaCounter.objects.get(period="day").used == record.total_tokens

    def test_rate_headers_use_openai_names(self, sdk, upstream):
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "100"
        assert raw.headers["x-ratelimit-remaining-requests"] == "99"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100_000 - 5
        assert raw.headers["X-RateLimit-Limit"] == "100"

    @pytest.mark.parametrize("status", [400, 500])
    def test_failed_call_headers_show_released_tokens(self, sdk, upstream, status):
        upstream.queue(Behaviour(status=status))
        with pytest.raises(openai.APIStatusError) as excinfo:
            create(sdk)
        headers = excinfo.value.response.headers
        # The failed call was charged nothing and its reservation released.
        assert QuotaCounter.objects.get(period="day").used == 0
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert headers["x-ratelimit-remaining-tokens"] == "100000"


class TestCostCaps:
    def test_max_tokens_is_capped(self, sdk, upstream, tier):
        tier.max_tokens_cap = 30
        tier.save()
        create(sdk, max_tokens=1000)
        assert upstream.requests[0].json["max_tokens"] == 30

    def test_max_completion_tokens_keeps_its_name(self, sdk, upstream, tier):
        tier.max_tokens_cap = 30
        tier.save()
        create(sdk, max_completion_tokens=1000)
        sent = upstream.requests[0].json
        assert sent["max_completion_tokens"] == 30
        assert "max_tokens" not in sent

    def test_n_is_capped_by_tier(self, sdk, upstream, tier):
        tier.max_choices = 2
        tier.save()
        create(sdk, n=5)
        assert upstream.requests[0].json["n"] == 2

    def test_n_multiplies_reservation(self, sdk, upstream, tier):
        tier.max_choices = 4
        tier.max_tokens_cap = 100
        tier.tokens_per_day = 250
        tier.save()
        # One choice's worst case fits in 250 tokens, and three do not.
        create(sdk, n=1)
        with pytest.raises(openai.BadRequestError) as excinfo:
            create(sdk, n=3)
        assert excinfo.value.code == "invalid_request"
        assert "whole daily token quota of 250" in excinfo.value.message
        assert len(upstream.requests) == 1


class TestUpstreamIsFixed:
    def test_body_api_key_is_rejected(self, sdk, upstream):
        with pytest.raises(openai.BadRequestError) as excinfo:
            create(sdk, extra_body={"api_key": "sk-mine"})
        assert excinfo.value.body["param"] == "api_key"
        assert upstream.requests == []

    def test_body_base_url_is_rejected(self, sdk, upstream):
        with pytest.raises(openai.BadRequestError):
            create(sdk, extra_body={"base_url": "http://127.0.0.1:1/v1"})

    def test_client_headers_are_not_forwarded(self, live_server, upstream, raw_key):
        client = openai.OpenAI(
            base_url=live_server.url + "/v1",
            api_key=raw_key,
            organization="org-client",
            project="proj-client",
            max_retries=0,
        )
        create(client)
        headers = upstream.requests[0].headers
        assert headers["OpenAI-Organization"] is None
        assert headers["OpenAI-Project"] is None


class TestErrors:
    def test_bad_key_raises_authentication_error(self, live_server, upstream):
        client = openai.OpenAI(
            base_url=live_server.url + "/v1", api_key="sk-wrong", max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as excinfo:
            create(client)
        assert excinfo.value.code == "invalid_api_key"
        assert excinfo.value.response.headers["WWW-Authenticate"].startswith("Bearer")

    def test_x_api_key_header_is_accepted(self, live_server, upstream, raw_key):
        client = openai.OpenAI(
            base_url=live_server.url + "/v1",
            api_key="unused",
            default_headers={"Authorization": "", "x-api-key": raw_key},
            max_retries=0,
        )
        assert create(client).choices[0].message.content == "echo: hello there"

    @pytest.mark.parametrize("accept", ["text/html", "text/plain", "image/png"])
    def test_any_accept_header_gets_json(self, live_server, upstream, raw_key, accept):
        client = openai.OpenAI(
            base_url=live_server.url + "/v1",
            api_key=raw_key,
            default_headers={"Accept": accept},
            max_retries=0,
        )
        assert create(client).choices[0].message.content == "echo: hello there"

    def test_bearer_key_wins_over_x_api_key(self, live_server, upstream, raw_key):
        client = openai.OpenAI(
            base_url=live_server.url + "/v1",
            api_key=raw_key,
            default_headers={"x-api-key": "sk-wrong"},
            max_retries=0,
        )
        assert create(client).choices[0].message.content == "echo: hello there"

    def test_disallowed_model_raises_permission_denied(self, sdk, upstream, tier):
        tier.allowed_models = "gpt-4o-mini"
        tier.save()
        with pytest.raises(openai.PermissionDeniedError) as excinfo:
            create(sdk, model="gpt-4o")
        assert excinfo.value.code == "model_not_allowed"

    def test_rate_limit_raises_rate_limit_error(self, sdk, upstream, tier):
        tier.rate_limits = "1/m"
        tier.save()
        create(sdk)
        with pytest.raises(openai.RateLimitError) as excinfo:
            create(sdk)
        assert excinfo.value.code == "rate_limit_exceeded"

    def test_rate_refusal_has_openai_headers(self, sdk, upstream, tier):
        tier.rate_limits = "1/m"
        tier.save()
        create(sdk)
        with pytest.raises(openai.RateLimitError) as excinfo:
            create(sdk)
        headers = excinfo.value.response.headers
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == headers["Retry-After"] + "s"
        assert headers["x-ratelimit-limit-tokens"] == "100000"

    def test_bad_input_raises_bad_request(self, sdk, upstream):
        with pytest.raises(openai.BadRequestError) as excinfo:
            create(sdk, messages=[{"role": "wizard", "content": "hi"}])
        assert excinfo.value.code == "invalid_request"
        assert excinfo.value.body["param"] == "messages"

    @pytest.mark.parametrize(
        "message",
        [
            pytest.param(
                {"role": "assistant", "tool_calls": 5}, id="tool-calls-number"
            ),
            pytest.param(
                {"role": "assistant", "tool_calls": True}, id="tool-calls-bool"
            ),
            pytest.param(
                {"role": "assistant", "tool_calls": [7]}, id="tool-call-number"
            ),
            pytest.param(
                {"role": "assistant", "tool_calls": [{"function": {"name": 3}}]},
                id="tool-call-name-number",
            ),
            pytest.param(
                {"role": "assistant", "tool_calls": [{"id": "c", "note": "x"}]},
                id="tool-call-unknown-field",
            ),
            pytest.param(
                {"role": "assistant", "function_call": "f"}, id="function-call-string"
            ),
            pytest.param(
                {"role": "assistant", "function_call": {"name": "f", "extra": "x"}},
                id="function-call-unknown-field",
            ),
            pytest.param({"role": "assistant", "refusal": 1}, id="refusal-number"),
            pytest.param({"role": "user", "content": "hi", "name": []}, id="name-list"),
            pytest.param(
                {"role": "user", "content": [{"type": "text", "text": 5}]},
                id="part-text-number",
            ),
            pytest.param(
                {"role": "user", "content": "hi", "notes": "unseen text"},
                id="unknown-field",
            ),
        ],
    )
    def test_malformed_message_raises_bad_request(self, sdk, upstream, message):
        with pytest.raises(openai.BadRequestError) as excinfo:
            create(sdk, messages=[message, {"role": "user", "content": "hi"}])
        assert excinfo.value.code == "invalid_request"
        assert excinfo.value.body["param"] == "messages"
        assert upstream.requests == []

    def test_empty_messages_raise_bad_request(self, sdk, upstream):
        with pytest.raises(openai.BadRequestError):
            create(sdk, messages=[])

    def test_unknown_parameter_raises_bad_request(self, sdk, upstream):
        with pytest.raises(openai.BadRequestError) as excinfo:
            create(sdk, extra_body={"store": True})
        assert excinfo.value.body["param"] == "store"

    def test_upstream_500_raises_internal_server_error(self, sdk, upstream):
        upstream.queue(Behaviour(status=500))
        with pytest.raises(openai.InternalServerError) as excinfo:
            create(sdk)
        assert excinfo.value.status_code == 502
        assert INTERNAL_DETAIL not in excinfo.value.response.text

    def test_upstream_timeout_is_504(self, sdk, upstream, settings):
        settings.PROXY_UPSTREAM_TIMEOUT = 0.3
        upstream.queue(Behaviour(delay=3))
        with pytest.raises(openai.InternalServerError) as excinfo:
            create(sdk)
        assert excinfo.value.status_code == 504
        assert excinfo.value.code == "upstream_timeout"

    @pytest.mark.parametrize("body", MALFORMED_COMPLETIONS)
    def test_malformed_reply_is_bad_gateway(self, sdk, upstream, body):
        upstream.queue(Behaviour(status=200, body=body))
        with pytest.raises(openai.InternalServerError) as excinfo:
            create(sdk)
        assert excinfo.value.status_code == 502
        assert excinfo.value.body["code"] == "upstream_error"
        _assert_failed_and_settled("upstream_error", 502)

    def test_upstream_context_error_is_400(self, sdk, upstream):
        upstream.queue(Behaviour(status=400))
        with pytest.raises(openai.BadRequestError) as excinfo:
            create(sdk)
        assert excinfo.value.code == "upstream_rejected_request"

    def test_unknown_v1_route_is_404_json(self, sdk, upstream):
        with pytest.raises(openai.NotFoundError) as excinfo:
            sdk.get("/no-such-thing", cast_to=object)
        assert excinfo.value.code == "unknown_url"

    @pytest.mark.parametrize("path", ["/responses", "/chat/completions/"])
    def test_post_to_unknown_v1_route_is_404_json(self, sdk, upstream, path):
        # A POST carries no CSRF token, which must not turn the 404 into a 403.
        with pytest.raises(openai.NotFoundError) as excinfo:
            sdk.post(path, body={"model": "gpt-4o-mini"}, cast_to=object)
        assert excinfo.value.code == "unknown_url"

    def test_wrong_method_is_405(self, live_server, raw_key):
        import urllib.request

        request = urllib.request.Request(
            live_server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {raw_key}"},
        )
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(request)
        assert excinfo.value.code == 405
        assert "POST" in excinfo.value.headers["Allow"]


class TestRules:
    def test_rule_checks_every_message_shape(self, sdk, upstream, tier):
        rule = PromptRule.objects.create(name="r", pattern="forbidden", message="No.")
        tier.rules.add(rule)
        shapes = [
            [{"role": "system", "content": "f\u200borbidden"}],
            [{"role": "user", "content": [{"type": "text", "text": "FORBIDDEN"}]}],
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {
                                "name": "f",
                                "arguments": '{"q": "forbidden"}',
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
            [{"role": "tool", "tool_call_id": "c1", "content": "forbidden"}],
            [
                {
                    "role": "assistant",
                    "function_call": {"name": "f", "arguments": "forbidden"},
                }
            ],
            [{"role": "assistant", "content": None, "refusal": "forbidden"}],
            [
                {
                    "role": "assistant",
                    "content": [{"type": "refusal", "refusal": "forbidden"}],
                }
            ],
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "forbidden", "arguments": "{}"},
                        }
                    ],
                }
            ],
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "custom",
                            "custom": {"name": "f", "input": "forbidden"},
                        }
                    ],
                }
            ],
        ]
        for messages in shapes:
            with pytest.raises(openai.BadRequestError) as excinfo:
                create(sdk, messages=messages)
            assert excinfo.value.code == "prompt_rejected"
        assert upstream.requests == []

    def test_rule_checks_tool_descriptions(self, sdk, upstream, tier):
        rule = PromptRule.objects.create(name="r", pattern="forbidden", message="No.")
        tier.rules.add(rule)
        tools = [
            {
                "type": "function",
                "function": {"name": "f", "description": "a forbidden tool"},
            }
        ]
        with pytest.raises(openai.BadRequestError):
            create(sdk, tools=tools)

    def test_rule_checks_response_format(self, sdk, upstream, tier):
        rule = PromptRule.objects.create(name="r", pattern="forbidden", message="No.")
        tier.rules.add(rule)
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "description": "a forbidden schema"},
        }
        with pytest.raises(openai.BadRequestError):
            create(sdk, response_format=response_format)

    def test_metadata_is_accepted(self, sdk, upstream):
        create(sdk, metadata={"team": "search"})
        assert upstream.requests[0].json["metadata"] == {"team": "search"}


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(["data: a\n\ndata: b\n\n"], id="one-chunk"),
        pytest.param(["da", "ta: a\n", "\nd", "ata: b\n\n"], id="split-lines"),
        pytest.param(["data: a\r\n\r\ndata: b\r\n\r\n"], id="crlf"),
        pytest.param(["data: a\r", "\n\r\ndata: b\r\r"], id="crlf-split"),
        pytest.param(["data: a\n\n", "data: b"], id="no-final-break"),
    ],
)
def test_split_lines_finds_each_line(chunks):
    lines = [line for line in split_lines(iter(chunks)) if line]
    assert lines == ["data: a", "data: b"]


class TestStreaming:
    def test_stream_without_usage_strips_usage_chunk(self, sdk, upstream):
        chunks = list(create(sdk, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: hello there"
        assert all(chunk.choices for chunk in chunks)
        assert upstream.requests[0].json["stream_options"] == {"include_usage": True}

    def test_stream_with_usage_ends_with_usage_chunk(self, sdk, upstream):
        chunks = list(create(sdk, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == []
        assert chunks[-1].usage.total_tokens == 5

    def test_stream_settles_quota_from_usage(self, sdk, upstream):
        list(create(sdk, stream=True))
        day = QuotaCounter.objects.get(period="day")
        record = UsageRecord.objects.get()
        assert day.reserved == 0
        assert day.used == 5
        assert record.status == UsageRecord.Status.SUCCEEDED

    def test_stream_with_huge_usage_is_counted(self, sdk, upstream):
        usage = {"prompt_tokens": 10**19, "completion_tokens": 1, "total_tokens": 1}
        upstream.queue(Behaviour(usage=usage))
        list(create(sdk, stream=True))
        record = UsageRecord.objects.get()
        day = QuotaCounter.objects.get(period="day")
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert 0 < record.prompt_tokens < 100
        assert record.completion_tokens == 1
        assert day.reserved == 0
        assert day.used == record.total_tokens

    def test_stream_without_upstream_usage_is_counted(self, sdk, upstream):
        upstream.queue(Behaviour(omit_usage=True))
        list(create(sdk, stream=True, stream_options={"include_usage": True}))
        record = UsageRecord.objects.get()
        assert record.completion_tokens > 0
        assert record.prompt_tokens > 0
        assert QuotaCounter.objects.get(period="day").used == record.total_tokens

    @pytest.mark.parametrize("deltas", GENERATED_DELTAS)
    def test_stream_output_without_content_is_counted(self, sdk, upstream, deltas):
        events = [chunk(delta=delta) for delta in deltas]
        upstream.queue(Behaviour(events=[*events, finish_chunk("tool_calls")]))
        list(create(sdk, stream=True))
        record = UsageRecord.objects.get()
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert record.completion_tokens >= 300
        assert QuotaCounter.objects.get(period="day").used == record.total_tokens

    def test_stream_failing_half_way_ends_with_error_event(self, sdk, upstream):
        upstream.queue(Behaviour(drop_after_chunks=2))
        received, error = _read_until_error(create(sdk, stream=True))
        assert len(received) == 2
        assert "upstream service failed" in error.message
        record = UsageRecord.objects.get()
        assert record.status == UsageRecord.Status.FAILED
        assert record.reason == "upstream_error"
        assert QuotaCounter.objects.get(period="day").reserved == 0

    def test_stream_stall_past_timeout_ends_with_timeout(self, sdk, upstream, settings):
        settings.PROXY_UPSTREAM_TIMEOUT = 0.3
        upstream.queue(Behaviour(stall_after_chunks=1, stall_seconds=3))
        with pytest.raises(openai.APIError) as excinfo:
            list(create(sdk, stream=True))
        assert "did not answer in time" in excinfo.value.message
        assert UsageRecord.objects.get().reason == "upstream_timeout"

    def test_stream_relays_every_choice(self, sdk, upstream, tier):
        tier.max_choices = 2
        tier.save()
        chunks = list(create(sdk, stream=True, n=2))
        texts = {0: "", 1: ""}
        for received in chunks:
            for choice in received.choices:
                texts[choice.index] += choice.delta.content or ""
        assert texts == {0: "echo: hello there", 1: "echo: hello there"}
        assert UsageRecord.objects.get().status == UsageRecord.Status.SUCCEEDED

    def test_stream_with_unfinished_choice_fails(self, sdk, upstream, tier):
        tier.max_choices = 2
        tier.save()
        # The second choice never gets its finish_reason before [DONE].
        events = [
            text_chunk("hi"),
            finish_chunk(),
            chunk(index=1, delta={"content": "yo"}),
        ]
        upstream.queue(Behaviour(events=events))
        received, error = _read_until_error(create(sdk, stream=True, n=2))
        assert len(received) == 3
        assert error.body["code"] == "upstream_error"
        _assert_failed_and_settled("upstream_error", 502)

    @pytest.mark.parametrize("malformed", MALFORMED_CHUNKS)
    def test_malformed_first_event_ends_with_error_event(
        self, sdk, upstream, malformed
    ):
        upstream.queue(Behaviour(events=[malformed, finish_chunk()]))
        received, error = _read_until_error(create(sdk, stream=True))
        assert received == []
        assert error.body["code"] == "upstream_error"
        _assert_failed_and_settled("upstream_error", 502)

    @pytest.mark.parametrize("malformed", MALFORMED_CHUNKS)
    def test_malformed_later_event_ends_with_error_event(
        self, sdk, upstream, malformed
    ):
        events = [text_chunk("hello"), malformed, finish_chunk()]
        upstream.queue(Behaviour(events=events))
        received, error = _read_until_error(create(sdk, stream=True))
        assert len(received) == 1
        assert error.body["code"] == "upstream_error"
        _assert_failed_and_settled("upstream_error", 502)

    @pytest.mark.parametrize(
        ("behaviour", "reason"),
        [
            pytest.param(
                Behaviour(drop_after_chunks=0), "upstream_error", id="dropped"
            ),
            pytest.param(
                Behaviour(stall_after_chunks=0, stall_seconds=3),
                "upstream_timeout",
                id="stalled",
            ),
            pytest.param(
                Behaviour(status=200, body=b"<html>maintenance</html>"),
                "upstream_error",
                id="not-event-stream",
            ),
            pytest.param(
                Behaviour(events=[{"error": {"message": INTERNAL_DETAIL}}]),
                "upstream_error",
                id="error-event",
            ),
            pytest.param(
                Behaviour(events=[{"choices": 5}]),
                "upstream_error",
                id="malformed-event",
            ),
        ],
    )
    def test_stream_failing_before_first_event_is_free(
        self, sdk, upstream, settings, behaviour, reason
    ):
        settings.PROXY_UPSTREAM_TIMEOUT = 0.5
        upstream.queue(behaviour)
        with pytest.raises(openai.APIError):
            list(create(sdk, stream=True))
        record = UsageRecord.objects.get()
        day = QuotaCounter.objects.get(period="day")
        assert record.status == UsageRecord.Status.FAILED
        assert record.reason == reason
        assert record.prompt_tokens == 0
        assert record.completion_tokens == 0
        assert day.reserved == 0
        assert day.used == 0

    def test_stream_failing_after_first_event_is_charged(self, sdk, upstream):
        upstream.queue(Behaviour(drop_after_chunks=1))
        with pytest.raises(openai.APIError):
            list(create(sdk, stream=True))
        record = UsageRecord.objects.get()
        assert record.status == UsageRecord.Status.FAILED
        assert record.prompt_tokens > 0
        assert record.completion_tokens > 0
        assert QuotaCounter.objects.get(period="day").used == record.total_tokens

    def test_refusal_before_stream_is_plain_http_error(self, sdk, upstream, tier):
        tier.allowed_models = "gpt-4o"
        tier.save()
        with pytest.raises(openai.PermissionDeniedError):
            create(sdk, stream=True)

    def test_streams_reuse_the_upstream_connection(self, sdk, upstream):
        before = upstream.connections_accepted
        for _ in range(3):
            list(create(sdk, stream=True))
        # The first stream may open a connection; the next ones reuse it.
        assert upstream.connections_accepted - before <= 1

    def test_stall_after_done_does_not_delay_client(self, sdk, upstream, settings):
        settings.PROXY_UPSTREAM_TIMEOUT = 5
        # The upstream sends [DONE] as its third event, then holds back the
        # end of its body for 3 s.
        events = [text_chunk("hello"), finish_chunk()]
        upstream.queue(Behaviour(events=events, stall_after_chunks=3, stall_seconds=3))
        started = time.monotonic()
        chunks = list(create(sdk, stream=True))
        elapsed = time.monotonic() - started
        record = UsageRecord.objects.get()
        day = QuotaCounter.objects.get(period="day")
        assert len(chunks) == 2
        assert elapsed < 1
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert day.reserved == 0
        assert day.used == record.total_tokens

    def test_long_tail_after_done_closes_connection(self, sdk, upstream):
        events = [text_chunk("hello"), finish_chunk()]
        # Within what the relay reads after [DONE]: the connection is reused.
        upstream.queue(Behaviour(events=events, trailing_bytes=10_000))
        list(create(sdk, stream=True))
        before = upstream.connections_accepted
        # Past it: the relay stops reading and closes the connection.
        upstream.queue(Behaviour(events=events, trailing_bytes=500_000))
        chunks = list(create(sdk, stream=True))
        list(create(sdk, stream=True))

        assert len(chunks) == 2
        assert UsageRecord.objects.filter(status="succeeded").count() == 3
        assert upstream.connections_accepted == before + 1

    def test_chunks_arrive_as_produced(self, sdk, upstream):
        upstream.set_default(chunk_delay=0.2)
        try:
            started = time.monotonic()
            arrivals = [time.monotonic() - started for _ in create(sdk, stream=True)]
        finally:
            upstream.set_default(chunk_delay=0.0)
        # The upstream spaces its events 0.2 s apart; buffering anywhere on the
        # way would deliver them together at the end. The median gap, not the
        # smallest, is checked, so that one late read on a busy machine, which
        # brings two chunks close together, does not fail the test.
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        assert len(arrivals) >= 4
        assert arrivals[0] < 0.5
        assert statistics.median(gaps) > 0.1
        assert arrivals[-1] - arrivals[0] > 0.1 * len(gaps)

    def test_client_disconnect_stops_upstream_and_charges(
        self, live_server, upstream, raw_key
    ):
        upstream.set_default(chunk_delay=0.3)
        try:
            url = urllib.parse.urlsplit(live_server.url)
            body = json.dumps(
                {
                    "model": "gpt-4o-mini",
                    "stream": True,
                    "messages": [
                        {"role": "user", "content": "one two three four five"}
                    ],
                }
            ).encode()
            with socket.create_connection((url.hostname, url.port)) as conn:
                conn.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                    + f"Authorization: Bearer {raw_key}\r\n".encode()
                    + b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                first = conn.recv(4096)
                assert b"200" in first.split(b"\r\n")[0]
                # Leave once some content has arrived, so that something was
                # generated to charge for.
                received = first
                while b'"content"' not in received:
                    data = conn.recv(4096)
                    assert data, "The stream ended before any content."
                    received += data
            record = _wait_for_settled_record()
        finally:
            upstream.set_default(chunk_delay=0.0)
        full_reply = count_text_tokens("gpt-4o-mini", "echo: one two three four five")
        assert record.status == UsageRecord.Status.FAILED
        assert record.reason == "client_disconnected"
        assert record.prompt_tokens > 0
        # Charged for what was generated before the client left, not the whole
        # reply: the upstream request was stopped part-way.
        assert 0 < record.completion_tokens < full_reply
        day = QuotaCounter.objects.get(period="day")
        assert day.reserved == 0
        assert day.used == record.total_tokens


def _read_until_error(stream) -> tuple[list, openai.APIError]:
    """Read a stream until the SDK raises its error event; return both."""
    received = []
    with pytest.raises(openai.APIError) as excinfo:
        for item in stream:
            received.append(item)
    return received, excinfo.value


def _assert_failed_and_settled(reason: str, http_status: int) -> None:
    record = UsageRecord.objects.get()
    day = QuotaCounter.objects.get(period="day")
    assert record.status == UsageRecord.Status.FAILED
    assert record.reason == reason
    assert record.http_status == http_status
    assert day.reserved == 0
    assert day.used == record.total_tokens


def _wait_for_settled_record(timeout: float = 10.0) -> UsageRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = UsageRecord.objects.filter(settled_at__isnull=False).first()
        if record is not None:
            return record
        time.sleep(0.1)
    raise AssertionError("No usage record was settled after the client left.")
