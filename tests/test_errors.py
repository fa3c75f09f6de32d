"""The error envelope, and the usage record of a request whose envelope fails."""

import json
import socket
import subprocess

import pytest

from generation import usage
from generation.models import UsageRecord
from generation.usage import UsageTracker
from proxy_site.errors import RateLimitExceeded, UpstreamRateLimited, envelope_for
from tests.factories import make_key
from tests.servers import HOST, run_in_project


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        pytest.param(0.2, "1", id="under-a-second"),
        pytest.param(7.0, "7", id="whole"),
        pytest.param(7.1, "8", id="fraction"),
        pytest.param(float("inf"), "1", id="infinite"),
        pytest.param(float("nan"), "1", id="not-a-number"),
    ],
)
def test_retry_after_header_is_whole_seconds(seconds, header):
    _, headers = envelope_for(UpstreamRateLimited(retry_after=seconds))
    assert headers["Retry-After"] == header


@pytest.mark.django_db
def test_failed_envelope_still_settles_record(monkeypatch):
    def fail(exc):
        raise RuntimeError("envelope failed")

    monkeypatch.setattr(usage, "error_code", fail)
    api_key, _ = make_key()
    tracker = UsageTracker(api_key=api_key, endpoint="generate-text", request_id="r1")

    with pytest.raises(RateLimitExceeded), tracker:
        raise RateLimitExceeded()

    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == "refused"
    assert record.http_status == 500
    assert record.reason == "internal_error"
    assert record.settled_at is not None


# A client in a separate process, whose database is a port where nothing
# listens. It prints one JSON line per request: status, headers and body.
_UNREACHABLE_DATABASE_CLIENT = """
import json, django
django.setup()
from django.test import Client
from keys.services import SECRET_LENGTH
key = "sk-abcdefgh-" + "a" * SECRET_LENGTH
client = Client(raise_request_exception=False)
chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
for method, path, body, headers in [
    ("post", "/v1/chat/completions", chat, {"authorization": "Bearer " + key}),
    ("get", "/v1/models", None, {"authorization": "Bearer " + key}),
    ("post", "/generate-text/", {"prompt": "hi"}, {"x-api-key": key}),
]:
    kwargs = {"data": body, "content_type": "application/json"} if body else {}
    response = getattr(client, method)(path, headers=headers, **kwargs)
    print(json.dumps({
        "path": path,
        "status": response.status_code,
        "headers": dict(response.headers),
        "body": response.content.decode(),
    }))
"""


# Production settings, so that errors are the API's JSON, not Django's
# debug page.
_PRODUCTION_ENVIRONMENT = {
    "DEBUG": "off",
    "SECRET_KEY": "a-secret-key-for-this-test-only",
    "ALLOWED_HOSTS": "testserver",
    "PROXY_READ_DOTENV": "off",
}


def _database_unavailable_responses(result) -> list[dict]:
    """Check that the client process got 503 database_unavailable for each request."""
    responses = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0, result.stderr
    assert [response["path"] for response in responses] == [
        "/v1/chat/completions",
        "/v1/models",
        "/generate-text/",
    ]
    for response in responses:
        assert response["status"] == 503, response
        error = json.loads(response["body"])["error"]
        assert error["code"] == "database_unavailable"
    return responses


@pytest.mark.parametrize("pool", ["off", "on"])
def test_unreachable_database_gets_503(pool):
    result = run_in_project(
        ["-c", _UNREACHABLE_DATABASE_CLIENT],
        DATABASE_URL="postgres://postgres@127.0.0.1:1/proxy",
        DATABASE_POOL=pool,
        DATABASE_CONN_MAX_AGE="0",
        DATABASE_POOL_MIN_SIZE="0",
        DATABASE_POOL_TIMEOUT="0.5",
        **_PRODUCTION_ENVIRONMENT,
    )
    responses = _database_unavailable_responses(result)

    for response in responses:
        assert "127.0.0.1" not in response["body"]
    # The log keeps what the client does not see.
    assert "Database call failed with OperationalError" in result.stderr
    assert "port 1 failed" in result.stderr


# Seconds the client process may take. Without a connect timeout it would
# wait for the silent database forever.
SILENT_DATABASE_RUN_TIMEOUT = 30


def test_silent_database_gets_503():
    # The kernel accepts connections to a listening socket, so the client
    # connects, then waits for a response that never comes.
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        try:
            result = run_in_project(
                ["-c", _UNREACHABLE_DATABASE_CLIENT],
                timeout=SILENT_DATABASE_RUN_TIMEOUT,
                DATABASE_URL=f"postgres://postgres@{HOST}:{port}/proxy",
                DATABASE_CONNECT_TIMEOUT="2",
                DATABASE_POOL="off",
                DATABASE_CONN_MAX_AGE="0",
                **_PRODUCTION_ENVIRONMENT,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"Requests waited more than {SILENT_DATABASE_RUN_TIMEOUT} s "
                "for a database that does not respond."
            )
    _database_unavailable_responses(result)
