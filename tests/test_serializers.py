"""Request bodies that validation rejects before any upstream call."""

import json

import pytest

from tests.factories import make_key

pytestmark = pytest.mark.django_db

CHAT_URL = "/v1/chat/completions"
HELLO = '[{"role": "user", "content": "hi"}]'


def post_chat(client, body: str, raw_key: str):
    return client.post(
        CHAT_URL, body, content_type="application/json", headers={"x-api-key": raw_key}
    )


def chat_body(extra: str) -> str:
    """Return a chat body as JSON text, with `extra` fields written as JSON text."""
    return f'{{"model": "gpt-4o-mini", "messages": {HELLO}, {extra}}}'


OUT_OF_RANGE_FIELDS = [
    pytest.param('"metadata": {"a": 1e400}', "metadata", id="metadata"),
    pytest.param('"logit_bias": {"50256": -1e400}', "logit_bias", id="logit-bias"),
    pytest.param(
        '"tools": [{"type": "function", "function": {"name": "f", '
        '"parameters": {"type": "number", "maximum": 1e400}}}]',
        "tools",
        id="tools",
    ),
    pytest.param(
        '"response_format": {"type": "json_schema", "json_schema": '
        '{"name": "n", "schema": {"minimum": -1e999}}}',
        "response_format",
        id="response-format",
    ),
    pytest.param(
        '"tool_choice": {"type": "function", "weight": 1e400}',
        "tool_choice",
        id="tool-choice",
    ),
    pytest.param('"stop": ["a", 1e400]', "stop", id="stop"),
    pytest.param('"stream_options": {"weight": 1e400}', "stream_options", id="opts"),
    pytest.param('"temperature": 1e400', "temperature", id="temperature"),
    pytest.param('"top_p": -1e400', "top_p", id="top-p"),
    pytest.param('"seed": 1e400', "seed", id="seed"),
]


@pytest.mark.parametrize(("extra", "param"), OUT_OF_RANGE_FIELDS)
def test_out_of_range_number_is_rejected(api_client, upstream, extra, param):
    _, raw_key = make_key()
    response = post_chat(api_client, chat_body(extra), raw_key)
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_request"
    assert error["param"] == param
    assert upstream.requests == []


@pytest.mark.parametrize("field", ["metadata", "logit_bias"])
def test_out_of_range_message_names_problem(api_client, upstream, field):
    _, raw_key = make_key()
    response = post_chat(api_client, chat_body(f'"{field}": {{"1": 1e400}}'), raw_key)
    message = response.json()["error"]["message"]
    assert message.startswith(f"{field}: ")
    assert "out of range" in message


def test_out_of_range_number_in_message_is_rejected(api_client, upstream):
    _, raw_key = make_key()
    body = (
        '{"model": "gpt-4o-mini", "messages": '
        '[{"role": "user", "content": [{"type": "text", "text": "hi", "w": 1e400}]}]}'
    )
    response = post_chat(api_client, body, raw_key)
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_request"
    assert error["param"] == "messages"
    assert "out of range" in error["message"]
    assert upstream.requests == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_is_rejected(api_client, upstream, literal):
    _, raw_key = make_key()
    response = post_chat(
        api_client, chat_body(f'"metadata": {{"a": {literal}}}'), raw_key
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


def test_finite_numbers_are_forwarded(api_client, upstream):
    _, raw_key = make_key()
    body = chat_body('"logit_bias": {"50256": -100}, "metadata": {"a": 1.5e308}')
    response = post_chat(api_client, body, raw_key)
    assert response.status_code == 200
    sent = upstream.requests[0].json
    assert sent["logit_bias"] == {"50256": -100}
    assert json.dumps(sent["metadata"]) == '{"a": 1.5e+308}'


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param("[1, 2]", id="numbers"),
        pytest.param('["end", null]', id="null-item"),
        pytest.param('["end", ["nested"]]', id="list-item"),
    ],
)
def test_stop_with_non_string_item_is_rejected(api_client, upstream, stop):
    _, raw_key = make_key()
    response = post_chat(api_client, chat_body(f'"stop": {stop}'), raw_key)
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_request"
    assert error["param"] == "stop"
    assert error["message"] == "stop: Expected a string or a list of strings."
    assert upstream.requests == []


@pytest.mark.parametrize("stop", ['"end"', '["end", "\\n\\n"]', "[]"])
def test_stop_strings_are_forwarded(api_client, upstream, stop):
    _, raw_key = make_key()
    response = post_chat(api_client, chat_body(f'"stop": {stop}'), raw_key)
    assert response.status_code == 200
    assert upstream.requests[0].json["stop"] == json.loads(stop)


@pytest.mark.parametrize("include_usage", ['"no"', '"false"', "0", "1", "null"])
def test_include_usage_must_be_boolean(api_client, upstream, include_usage):
    _, raw_key = make_key()
    extra = f'"stream": true, "stream_options": {{"include_usage": {include_usage}}}'
    response = post_chat(api_client, chat_body(extra), raw_key)
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_request"
    assert error["param"] == "stream_options"
    assert "include_usage must be true or false" in error["message"]
    assert upstream.requests == []


def test_include_usage_false_leaves_out_usage(api_client, upstream):
    _, raw_key = make_key()
    extra = '"stream": true, "stream_options": {"include_usage": false}'
    response = post_chat(api_client, chat_body(extra), raw_key)
    events = b"".join(response.streaming_content).decode()
    assert response.status_code == 200
    assert '"prompt_tokens"' not in events
    assert events.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        pytest.param("null", "null", id="null"),
        pytest.param("[]", "an array", id="array"),
        pytest.param('"hi"', "a string", id="string"),
        pytest.param("3", "a number", id="number"),
        pytest.param("true", "a boolean", id="boolean"),
    ],
)
@pytest.mark.parametrize(
    "url", ["/generate-text/", "/v1/chat/completions", "/v1/embeddings"]
)
def test_body_that_is_not_an_object_is_rejected(api_client, upstream, url, body, kind):
    _, raw_key = make_key()
    response = api_client.post(
        url, body, content_type="application/json", headers={"x-api-key": raw_key}
    )
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_request"
    assert error["param"] is None
    assert (
        error["message"] == f"The request body must be a JSON object, but it is {kind}."
    )
    assert upstream.requests == []
