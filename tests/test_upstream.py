"""The upstream client wrapper: request encoding and the map of upstream errors."""

import json
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from generation.upstream import post_json, upstream_errors
from proxy_site.errors import UnencodableRequestBody
from tests.factories import make_key
from tests.fake_upstream import Behaviour

HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(float("inf"), id="infinite"),
        pytest.param(float("nan"), id="not-a-number"),
        pytest.param("\ud800", id="lone-surrogate"),
    ],
)
def test_unencodable_body_is_client_error(upstream, caplog, value):
    body = {"model": "gpt-4o-mini", "messages": HELLO, "metadata": {"a": value}}
    with caplog.at_level(logging.INFO), pytest.raises(UnencodableRequestBody):
        with upstream_errors():
            post_json("/chat/completions", body)
    assert upstream.requests == []
    assert "could not be parsed" not in caplog.text
    assert "could not be encoded" in caplog.text


def test_encoded_body_reaches_upstream(upstream):
    body = {"model": "gpt-4o-mini", "messages": HELLO, "metadata": {"city": "Zürich"}}
    with upstream_errors():
        response = post_json("/chat/completions", body)
    [request] = upstream.requests
    assert response.status_code == 200
    assert request.json == body
    assert request.headers["content-type"] == "application/json"


def test_post_json_avoids_deprecated_body(upstream):
    # openai 3.63 warns that raw bytes as `body` will be removed in a future
    # version; the `content` argument (in openai 3.50 too) carries them.
    body = {"model": "gpt-4o-mini", "messages": HELLO}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with upstream_errors():
            response = post_json("/chat/completions", body)
    assert response.status_code == 200


def test_concurrent_calls_keep_connections(upstream):
    # More calls at once than the openai client keeps alive by default (100),
    # as a worker with hundreds of threads makes. Connections it closes after
    # one round would be opened again in the next.
    calls = 150
    body = {"model": "gpt-4o-mini", "messages": HELLO}

    def call(_):
        with upstream_errors():
            return post_json("/chat/completions", body).status_code

    accepted = []
    with ThreadPoolExecutor(max_workers=calls) as pool:
        for _ in range(2):
            upstream.queue(Behaviour(delay=0.5), times=calls)
            assert set(pool.map(call, range(calls))) == {200}
            accepted.append(upstream.connections_accepted)
    assert accepted[1] == accepted[0]


# Nested far deeper than Python's recursion limit (1000 frames by default).
DEEP_JSON = b"[" * 5000 + b"]" * 5000


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        pytest.param(
            "post",
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": HELLO},
            id="chat",
        ),
        pytest.param(
            "post",
            "/v1/embeddings",
            {"model": "text-embedding-3-small", "input": "hi"},
            id="embeddings",
        ),
        pytest.param("get", "/v1/models", None, id="models"),
    ],
)
def test_deeply_nested_reply_is_upstream_error(api_client, upstream, method, url, body):
    reply = b'{"choices": ' + DEEP_JSON + b', "data": ' + DEEP_JSON + b"}"
    upstream.queue(Behaviour(status=200, body=reply))
    _, raw_key = make_key()
    headers = {"x-api-key": raw_key}
    if method == "get":
        response = api_client.get(url, headers=headers)
    else:
        response = api_client.post(
            url, json.dumps(body), content_type="application/json", headers=headers
        )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
