"""The upstream client wrapper: request encoding and the map of upstream errors."""

import logging

import pytest

from generation.upstream import post_json, upstream_errors
from proxy_site.errors import UnencodableRequestBody

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
