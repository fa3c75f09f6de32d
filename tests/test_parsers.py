"""The JSON parser: nesting depth and lone surrogates, at any depth."""

import gzip
import json

import pytest

from generation.parsers import MAX_JSON_DEPTH, exceeds_depth, has_lone_surrogate
from tests.factories import make_key, make_tier

URL = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


def post(client, body: str, raw_key: str):
    return client.post(
        URL, body, content_type="application/json", headers={"x-api-key": raw_key}
    )


def nested_list(depth: int, leaf: str = "1") -> str:
    """Return JSON text of lists nested `depth` deep around `leaf`."""
    return "[" * depth + leaf + "]" * depth


def chat_body(field: str, depth: int, leaf: str = "1") -> str:
    """Return a chat body whose `field` makes the whole body `depth` deep."""
    if field == "metadata":
        # The body, then metadata's object, then the lists.
        inner = nested_list(depth - 2, leaf)
        extra = f'"metadata": {{"a": {inner}}}'
    elif field == "tools":
        # The body, the tools list, a tool, its function, its parameters,
        # then the lists.
        inner = nested_list(depth - 5, leaf)
        function = f'{{"name": "f", "parameters": {{"a": {inner}}}}}'
        extra = f'"tools": [{{"type": "function", "function": {function}}}]'
    else:
        # The body, the messages list, a message, its content list, a part,
        # then the lists.
        inner = nested_list(depth - 5, leaf)
        part = f'{{"type": "text", "text": "hi", "a": {inner}}}'
        extra = f'"messages": [{{"role": "user", "content": [{part}]}}]'
        return f'{{"model": "gpt-4o-mini", {extra}}}'
    return f'{{"model": "gpt-4o-mini", "messages": {json.dumps(HELLO)}, {extra}}}'


@pytest.mark.django_db
@pytest.mark.parametrize(
    "leaf",
    [pytest.param('"\\ud800"', id="lone-surrogate"), pytest.param("1", id="number")],
)
def test_body_900_deep_is_invalid_json(api_client, upstream, leaf):
    _, raw_key = make_key()
    response = post(api_client, chat_body("metadata", 900, leaf), raw_key)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["metadata", "tools", "messages"])
def test_body_over_depth_limit_is_rejected(api_client, upstream, field):
    _, raw_key = make_key()
    response = post(api_client, chat_body(field, MAX_JSON_DEPTH + 1), raw_key)
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_json"
    assert f"at most {MAX_JSON_DEPTH} levels" in error["message"]
    assert upstream.requests == []


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["metadata", "tools", "messages"])
def test_body_at_depth_limit_is_served(api_client, upstream, field):
    _, raw_key = make_key()
    body = chat_body(field, MAX_JSON_DEPTH)
    assert not exceeds_depth(json.loads(body), MAX_JSON_DEPTH)
    assert exceeds_depth(json.loads(body), MAX_JSON_DEPTH - 1)

    response = post(api_client, body, raw_key)

    assert response.status_code == 200
    assert len(upstream.requests) == 1


def test_lone_surrogate_found_at_any_depth():
    value = "\ud800"
    for _ in range(10_000):
        value = {"key": [value]}
    assert has_lone_surrogate(value)


def test_lone_surrogate_in_key_is_found():
    assert has_lone_surrogate({"a": {"\udc00": 1}})


def test_surrogate_pair_is_not_lone():
    assert not has_lone_surrogate({"text": ["\U0001f600", 1, None]})


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        pytest.param("text", 0, False, id="scalar"),
        pytest.param([], 1, False, id="empty-list-at-limit"),
        pytest.param([], 0, True, id="empty-list-over"),
        pytest.param({"a": [1]}, 2, False, id="dict-at-limit"),
        pytest.param({"a": [1]}, 1, True, id="dict-over"),
        pytest.param([1, [2], [[3]]], 3, False, id="mixed-at-limit"),
        pytest.param([1, [2], [[3]]], 2, True, id="mixed-over"),
    ],
)
def test_exceeds_depth_counts_containers(value, limit, expected):
    assert exceeds_depth(value, limit) is expected


def test_exceeds_depth_works_at_any_depth():
    value = 1
    for _ in range(10_000):
        value = [value]
    assert exceeds_depth(value, MAX_JSON_DEPTH)
    assert not exceeds_depth(value, 10_000)


@pytest.mark.django_db
@pytest.mark.parametrize("encoding", ["gzip", "br", "GZIP, identity"])
def test_compressed_body_is_unsupported(api_client, upstream, encoding):
    _, raw_key = make_key(tier=make_tier(rate_limits="60/m"))
    body = json.dumps({"model": "gpt-4o-mini", "messages": HELLO})
    response = api_client.post(
        URL,
        gzip.compress(body.encode()),
        content_type="application/json",
        headers={"x-api-key": raw_key, "Content-Encoding": encoding},
    )
    error = response.json()["error"]
    assert response.status_code == 415
    assert error["code"] == "unsupported_media_type"
    assert "uncompressed" in error["message"]
    assert response["X-RateLimit-Limit"] == "60"
    assert upstream.requests == []


@pytest.mark.django_db
def test_identity_content_encoding_is_served(api_client, upstream):
    _, raw_key = make_key()
    body = json.dumps({"model": "gpt-4o-mini", "messages": HELLO})
    response = api_client.post(
        URL,
        body,
        content_type="application/json",
        headers={"x-api-key": raw_key, "Content-Encoding": "identity"},
    )
    assert response.status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("charset", ["utf-16", "utf-32"])
@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HELLO}),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
    ],
    ids=["chat", "embeddings"],
)
def test_lone_surrogate_in_other_charset_is_invalid_json(
    api_client, upstream, charset, path, body
):
    # The escape's bytes differ in these charsets, but it decodes the same.
    text = json.dumps(body).replace('"hi"', '"hi \\ud800"')
    response = api_client.post(
        path,
        text.encode(charset),
        content_type=f"application/json; charset={charset}",
        headers={"x-api-key": make_key()[1]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


@pytest.mark.django_db
def test_invalid_utf8_body_message(api_client, upstream):
    _, raw_key = make_key()
    response = api_client.post(
        "/generate-text/",
        data=b'{"prompt": "caf\xe9"}',
        content_type="application/json",
        headers={"x-api-key": raw_key},
    )
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_json"
    assert error["message"] == (
        "JSON parse error - the body is not valid utf-8: byte 0xe9 at "
        "position 15. Send the body as UTF-8."
    )


@pytest.mark.django_db
def test_overlong_number_message(api_client, upstream):
    _, raw_key = make_key()
    response = post(
        api_client, '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", raw_key
    )
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_json"
    assert "sys." not in error["message"]
    assert error["message"] == "JSON parse error - a number has more than 4300 digits."


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        pytest.param(
            b'\xef\xbb\xbf{"prompt": "hi"}',
            "application/json",
            "JSON parse error - the body starts with a UTF-8 byte order mark. "
            "Send the JSON without it.",
            id="utf-8-bom",
        ),
        pytest.param(
            '{"prompt": "hi"}'.encode("utf-16-le"),
            "application/json; charset=utf-16",
            "JSON parse error - the body is not valid utf-16. Send the body as UTF-8.",
            id="utf-16-without-bom",
        ),
    ],
)
def test_undecodable_body_message(api_client, upstream, body, content_type, message):
    _, raw_key = make_key()
    response = api_client.post(
        "/generate-text/",
        data=body,
        content_type=content_type,
        headers={"x-api-key": raw_key},
    )
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "invalid_json"
    assert error["message"] == message
