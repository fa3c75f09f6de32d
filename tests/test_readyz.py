"""GET /readyz: the database and the cache, checked for real."""

import http.client
import json
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test import Client

from tests.servers import HOST, ProxyServer

# Nothing listens on port 1 of the loopback address, so connecting fails at once.
CLOSED_REDIS_URL = "redis://127.0.0.1:1/0"
CLOSED_POSTGRES_URL = "postgres://readyz-user:readyz-password@127.0.0.1:1/readyz_db"
# Parts of the unreachable addresses that must not appear in a response body.
SECRETS = ("127.0.0.1", "readyz-user", "readyz-password", "readyz_db")


@pytest.mark.django_db
def test_readyz_ready(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "cache": "ok"},
    }


@pytest.mark.django_db
def test_readyz_needs_no_key(client):
    response = client.get("/readyz", HTTP_X_API_KEY="sk-not-a-real-key")

    assert response.status_code == 200


@pytest.mark.django_db
def test_readyz_not_cached(client):
    response = client.get("/readyz")

    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/readyz", "/healthz"])
def test_probe_rejects_post_with_405(path):
    # A POST carries no CSRF token, which must not turn the 405 into a 403.
    client = Client(enforce_csrf_checks=True)
    response = client.post(path)

    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.django_db
def test_readyz_leaves_no_cache_key(client, settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    }
    from django.core.cache import cache

    client.get("/readyz")

    assert not any("readyz" in key for key in cache._cache)


@pytest.mark.django_db
def test_readyz_cache_down(client, settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CLOSED_REDIS_URL,
        }
    }

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "cache": "failed"},
        "error": {
            "message": "The proxy is not ready: the cache check failed.",
            "type": "server_error",
            "param": None,
            "code": "not_ready",
        },
    }


@pytest.mark.django_db
def test_readyz_cache_down_hides_address(client, settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CLOSED_REDIS_URL,
        }
    }

    body = client.get("/readyz").content.decode()

    assert not [secret for secret in SECRETS if secret in body]


@pytest.fixture(scope="module")
def server_without_database() -> Iterator[ProxyServer]:
    """A gunicorn process whose DATABASE_URL points at a closed port.

    The database cannot be made unreachable inside the test process without
    breaking the test database, so a separate server process gets the bad URL.
    """
    server = ProxyServer({"DATABASE_URL": CLOSED_POSTGRES_URL}, threads=2).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _get(server: ProxyServer, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_readyz_database_down(server_without_database):
    status, body = _get(server_without_database, "/readyz")

    assert status == 503
    assert json.loads(body) == {
        "status": "unavailable",
        "checks": {"database": "failed", "cache": "ok"},
        "error": {
            "message": "The proxy is not ready: the database check failed.",
            "type": "server_error",
            "param": None,
            "code": "not_ready",
        },
    }


def test_readyz_database_down_hides_address(server_without_database):
    _, body = _get(server_without_database, "/readyz")

    assert not [secret for secret in SECRETS if secret in body]


def test_healthz_ignores_database(server_without_database):
    status, _ = _get(server_without_database, "/healthz")

    assert status == 200


@pytest.mark.django_db
def test_database_check_leaves_connection_usable(client):
    client.get("/readyz")

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
