"""Tests of the fake upstream, driven by the real openai client over loopback."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests.fake_upstream import (
    DEFAULT_MODELS,
    EMBEDDING_DIMENSIONS,
    INTERNAL_DETAIL,
    Behaviour,
    FakeUpstream,
    embedding_vector,
)

API_KEY = "sk-upstream-test"
CLIENT_TIMEOUT = 1.0  # seconds
SHORT_TIMEOUT = 0.3  # seconds, for tests that expect a timeout
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def make_client(
    upstream: FakeUpstream, timeout: float = CLIENT_TIMEOUT
) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=upstream.base_url,
        api_key=API_KEY,
        max_retries=0,
        timeout=timeout,
    )


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with make_client(upstream) as openai_client:
        yield openai_client


def test_base_url_is_loopback_v1(upstream: FakeUpstream) -> None:
    assert upstream.base_url == f"http://127.0.0.1:{upstream.port}/v1"
    assert upstream.port > 0


def test_chat_completion_echoes_last_user_message(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "hello there"},
    ]

    completion = client.chat.completions.create(model="gpt-4o", messages=messages)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o"
    assert len(completion.choices) == 1
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 8  # words in all four messages
    assert completion.usage.completion_tokens == 3  # "echo: hello there"
    assert completion.usage.total_tokens == 11


def test_chat_completion_reads_text_parts(client: openai.OpenAI) -> None:
    content = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]

    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}]
    )

    assert completion.choices[0].message.content == "echo: one two"


def test_chat_stream_sends_one_chunk_per_word(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True
    )
    chunks = list(stream)

    assert len(chunks) == 4  # three words and the finish chunk
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.role is None
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "echo: hello there"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


def test_stream_include_usage_adds_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert len(chunks) == 5
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 2
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.total_tokens == 5


def test_stream_is_chunked_event_stream(upstream: FakeUpstream) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": HELLO, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=1)
    connection.request("POST", "/v1/chat/completions", body=body)
    response = connection.getresponse()
    events = response.read().decode().split("\n\n")
    connection.close()

    assert response.status == 200
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Content-Length") is None
    assert events[-2] == "data: [DONE]"
    assert events[-1] == ""


def test_chat_stream_waits_chunk_delay(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.set_default(chunk_delay=0.05)

    started = time.monotonic()
    list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    elapsed = time.monotonic() - started

    # Five events (three words, finish chunk, [DONE]) have four gaps between them.
    assert elapsed >= 0.2


def test_embeddings_return_one_vector_per_input(client: openai.OpenAI) -> None:
    inputs = ["alpha beta", "gamma"]

    default_format = client.embeddings.create(
        model="text-embedding-3-small", input=inputs
    )
    float_format = client.embeddings.create(
        model="text-embedding-3-small", input=inputs, encoding_format="float"
    )

    assert [item.index for item in default_format.data] == [0, 1]
    for item, text in zip(default_format.data, inputs, strict=True):
        assert item.embedding == embedding_vector(text, EMBEDDING_DIMENSIONS)
    for item, text in zip(float_format.data, inputs, strict=True):
        assert item.embedding == embedding_vector(text, EMBEDDING_DIMENSIONS)
    assert default_format.data[0].embedding != default_format.data[1].embedding
    assert default_format.model == "text-embedding-3-small"
    assert default_format.usage.prompt_tokens == 3
    assert default_format.usage.total_tokens == 3


def test_embeddings_accept_string_and_dimensions(client: openai.OpenAI) -> None:
    response = client.embeddings.create(
        model="text-embedding-3-small", input="alpha", dimensions=40
    )

    assert len(response.data) == 1
    assert len(response.data[0].embedding) == 40
    assert response.data[0].embedding == embedding_vector("alpha", 40)


def test_embeddings_reject_missing_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input=[])

    assert caught.value.status_code == 400


def test_models_list_returns_configured_ids(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    assert [model.id for model in client.models.list()] == list(DEFAULT_MODELS)

    upstream.set_default(models=["only-model"])

    assert [model.id for model in client.models.list()] == ["only-model"]
    assert client.models.retrieve("only-model").id == "only-model"


def test_unknown_model_returns_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")

    assert caught.value.code == "model_not_found"


def test_unknown_path_returns_error_envelope(upstream: FakeUpstream) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=1)
    connection.request("GET", "/v1/unknown")
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()

    assert response.status == 404
    assert body["error"]["message"] == "Invalid URL (GET /v1/unknown)"
    assert body["error"]["type"] == "invalid_request_error"


def test_replies_keep_connection_alive(upstream: FakeUpstream) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=1)
    connection.request("GET", "/v1/models")
    connection.getresponse().read()
    first_socket = connection.sock
    connection.request("GET", "/v1/missing")
    response = connection.getresponse()
    response.read()
    second_socket = connection.sock
    connection.close()

    assert response.status == 404
    assert first_socket is not None
    assert second_socket is first_socket


def test_queued_500_raises_internal_server_error(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(status=500), times=2)

    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert caught.value.status_code == 500
        assert INTERNAL_DETAIL in caught.value.message
        assert caught.value.type == "server_error"

    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert completion.choices[0].message.content == "echo: hello there"


def test_queued_429_sends_retry_after(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(status=429, headers={"retry-after": "7"}))

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"


def test_queued_body_replaces_error_envelope(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    body = {"error": {"message": "custom", "type": "custom_type", "code": "x"}}
    upstream.queue(Behaviour(status=400, body=body))

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert caught.value.body == body["error"]


def test_delay_beyond_timeout_raises_timeout(upstream: FakeUpstream) -> None:
    upstream.queue(Behaviour(delay=5))

    started = time.monotonic()
    with make_client(upstream, timeout=SHORT_TIMEOUT) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert time.monotonic() - started < 2


def test_delay_within_timeout_still_replies(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(delay=0.1))

    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert completion.choices[0].message.content == "echo: hello there"


def test_stop_interrupts_pending_delay() -> None:
    upstream = FakeUpstream().start()
    upstream.queue(Behaviour(delay=30))
    errors: list[Exception] = []

    def call() -> None:
        with make_client(upstream, timeout=10) as client:
            try:
                client.chat.completions.create(model="gpt-4o", messages=HELLO)
            except openai.APIConnectionError as exc:
                errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while not upstream.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    upstream.stop()
    caller.join(timeout=5)

    assert not caller.is_alive()
    assert time.monotonic() - started < 2
    assert len(errors) == 1


def test_closed_connection_raises_connection_error(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(close_connection=True))

    with pytest.raises(openai.APIConnectionError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert not isinstance(caught.value, openai.APITimeoutError)


def test_garbage_body_fails_to_parse(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(body=b"<html>not json</html>"))

    # openai 3.60 lets the decoder's error through for a JSON content type.
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_stream_dropped_midway_raises(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(drop_after_chunks=2))
    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    received = []

    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)

    assert received == ["echo:", " hello"]


def test_drop_after_done_truncates_body(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    drop_after_done = Behaviour(drop_after_chunks=5)  # 3 words, finish, [DONE]
    upstream.queue(drop_after_done, times=2)
    body = json.dumps({"model": "gpt-4o", "messages": HELLO, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=1)
    connection.request("POST", "/v1/chat/completions", body=body)
    response = connection.getresponse()

    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()

    # The openai client stops reading at [DONE], so it does not notice the drop.
    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    assert len(list(stream)) == 4


def test_stream_stall_beyond_timeout_raises(upstream: FakeUpstream) -> None:
    upstream.queue(Behaviour(stall_after_chunks=1, stall_seconds=5))
    received = []

    with make_client(upstream, timeout=SHORT_TIMEOUT) as client:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=HELLO, stream=True
        )
        with pytest.raises(openai.APITimeoutError):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content)

    assert received == ["echo:"]


def test_stream_stall_within_timeout_completes(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(stall_after_chunks=2, stall_seconds=0.1))

    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert text == "echo: hello there"


def test_reply_text_and_usage_override(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    upstream.queue(Behaviour(reply_text="scripted reply", usage=usage))

    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert completion.choices[0].message.content == "scripted reply"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 100
    assert completion.usage.completion_tokens == 20
    assert completion.usage.total_tokens == 120


def test_scripted_events_replace_chunks(upstream: FakeUpstream) -> None:
    scripted = [{"choices": 5}, "not json"]
    upstream.queue(Behaviour(events=scripted))
    body = json.dumps({"model": "gpt-4o", "messages": HELLO, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=1)
    connection.request("POST", "/v1/chat/completions", body=body)
    events = connection.getresponse().read().decode().split("\n\n")
    connection.close()

    assert events[0] == 'data: {"choices": 5}'
    assert events[1] == "data: not json"
    assert events[2] == "data: [DONE]"
    assert events[3] == ""


def test_omit_usage_leaves_usage_out(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(omit_usage=True), times=2)

    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert completion.usage is None
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_requests_are_recorded(upstream: FakeUpstream, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    client.models.list()

    recorded = upstream.requests

    assert len(recorded) == 2
    assert recorded[0].method == "POST"
    assert recorded[0].path == "/v1/chat/completions"
    assert recorded[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert recorded[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert recorded[0].json == {"model": "gpt-4o", "messages": HELLO}
    assert json.loads(recorded[0].body) == recorded[0].json
    assert recorded[1].method == "GET"
    assert recorded[1].path == "/v1/models"
    assert recorded[1].json is None


def test_failed_requests_are_recorded(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.queue(Behaviour(close_connection=True))

    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert len(upstream.requests) == 1


def test_reset_clears_requests_and_queue(
    upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    upstream.set_default(models=["kept-model"])
    client.models.list()
    upstream.queue(Behaviour(status=500))

    upstream.reset()

    assert upstream.requests == []
    assert [model.id for model in client.models.list()] == ["kept-model"]


def test_chat_rejects_missing_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[])

    assert "messages" in caught.value.message


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"status": 99}, id="status-too-low"),
        pytest.param({"status": 600}, id="status-too-high"),
        pytest.param({"delay": -1}, id="negative-delay"),
        pytest.param({"drop_after_chunks": -1}, id="negative-drop"),
        pytest.param({"close_connection": True, "status": 500}, id="close-and-status"),
        pytest.param({"omit_usage": True, "usage": {}}, id="omit-and-usage"),
        pytest.param({"events": [], "status": 200}, id="events-and-status"),
    ],
)
def test_behaviour_rejects_invalid_fields(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Behaviour(**fields)


def test_queue_rejects_zero_times(upstream: FakeUpstream) -> None:
    with pytest.raises(ValueError):
        upstream.queue(Behaviour(), times=0)
