"""Clients that stall while sending a request body, against a real gunicorn."""

import json
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests.servers import HOST, ProxyServer, run_in_project

# PROXY_REQUEST_BODY_TIMEOUT of the server under test, in seconds.
BODY_TIMEOUT = 1.0
# Seconds the test waits for a response before it calls the server stuck.
RESPONSE_TIMEOUT = 10.0
BODY = json.dumps({"prompt": "hello there"}).encode()


@pytest.fixture
def server_and_key(tmp_path, upstream) -> Iterator[tuple[ProxyServer, str]]:
    """A gunicorn server on its own SQLite file, and a key it accepts."""
    environment = {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.sqlite3'}",
        "CACHE_URL": "locmemcache://",
        "PROXY_TEST_UPSTREAM_URL": upstream.base_url,
        "PROXY_REQUEST_BODY_TIMEOUT": str(BODY_TIMEOUT),
    }
    for command in (["migrate", "--no-input"], ["issue_key", "--name", "slow"]):
        result = run_in_project(["manage.py", *command], **environment)
        assert result.returncode == 0, result.stderr
    raw_key = result.stdout.strip().splitlines()[-1]
    server = ProxyServer(environment, threads=2).start()
    try:
        server.wait_ready()
        yield server, raw_key
    finally:
        server.stop()


def send_head(port: int, raw_key: str) -> socket.socket:
    """Open a connection and send the headers of a /generate-text/ request."""
    client = socket.create_connection((HOST, port), timeout=RESPONSE_TIMEOUT)
    head = (
        "POST /generate-text/ HTTP/1.1\r\n"
        f"Host: {HOST}\r\n"
        f"x-api-key: {raw_key}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n"
        "Connection: close\r\n\r\n"
    )
    client.sendall(head.encode())
    return client


def read_response(client: socket.socket) -> tuple[int, dict]:
    """Read the whole response and return its status and JSON body."""
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def send_stalled_body(port: int, raw_key: str) -> tuple[int, dict, float]:
    """Send the headers and 5 bytes of the body, then wait for the response.

    Returns the status, the JSON body and the seconds the response took.
    """
    client = send_head(port, raw_key)
    started = time.monotonic()
    with client:
        client.sendall(BODY[:5])
        status, body = read_response(client)
    return status, body, time.monotonic() - started


def test_stalled_body_gets_408(server_and_key):
    server, raw_key = server_and_key

    status, body, elapsed = send_stalled_body(server.port, raw_key)

    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert elapsed < BODY_TIMEOUT + 5


def test_slow_body_within_timeout_succeeds(server_and_key):
    server, raw_key = server_and_key
    client = send_head(server.port, raw_key)

    with client:
        for start in range(0, len(BODY), 8):
            client.sendall(BODY[start : start + 8])
            time.sleep(BODY_TIMEOUT / 4)
        status, body = read_response(client)

    assert status == 200
    assert body["text"] == "echo: hello there"


def test_body_read_before_key_lookup(server_and_key):
    # With the body read first, a stalled body holds no database connection
    # for the key lookup. A wrong key would otherwise get its 403 at once.
    server, _ = server_and_key

    status, body, elapsed = send_stalled_body(server.port, "sk-not-a-real-key")

    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert elapsed >= BODY_TIMEOUT


def test_reset_during_body_is_not_server_error(server_and_key):
    server, raw_key = server_and_key
    client = send_head(server.port, raw_key)

    with client:
        client.sendall(BODY[:5])
        # SO_LINGER with a zero timeout makes close() send a reset.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + RESPONSE_TIMEOUT
    while "path=/generate-text/" not in server.output():
        assert time.monotonic() < deadline, "The request was never logged."
        time.sleep(0.1)

    assert "status=400" in server.output()
    assert "Internal Server Error" not in server.output()


def test_get_with_unsent_body_is_served(server_and_key):
    # No GET view reads a body, so a declared one that never comes does not
    # hold the request until the body timeout.
    server, raw_key = server_and_key
    client = socket.create_connection((HOST, server.port), timeout=RESPONSE_TIMEOUT)
    head = (
        "GET /v1/models HTTP/1.1\r\n"
        f"Host: {HOST}\r\n"
        f"Authorization: Bearer {raw_key}\r\n"
        "Content-Length: 10\r\n"
        "Connection: close\r\n\r\n"
    )
    started = time.monotonic()

    with client:
        client.sendall(head.encode())
        status, body = read_response(client)

    assert status == 200
    assert body["object"] == "list"
    assert time.monotonic() - started < BODY_TIMEOUT


def test_body_shorter_than_declared_is_rejected(server_and_key):
    server, raw_key = server_and_key
    client = send_head(server.port, raw_key)
    # Valid JSON, but shorter than the Content-Length of the full body.
    short = json.dumps({"prompt": "hi"}).encode()
    assert len(short) < len(BODY)

    with client:
        client.sendall(short)
        client.shutdown(socket.SHUT_WR)
        status, body = read_response(client)

    assert status == 400
    assert body["error"]["code"] == "invalid_request"
    assert f"after {len(short)} of the {len(BODY)} bytes" in body["error"]["message"]
