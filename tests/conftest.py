"""Fixtures shared by the whole suite."""

import os

import pytest
from django.conf import settings
from django.core.cache import cache
from rest_framework.test import APIClient

from generation.upstream import reset_client
from keys.rules import clear_tier_rules
from tests.fake_upstream import FakeUpstream


def pytest_report_header(config) -> str:
    engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    backend = settings.CACHES["default"]["BACKEND"].rsplit(".", 1)[-1]
    return f"database: {engine}, cache: {backend}"


def pytest_sessionstart(session) -> None:
    # CI sets PROXY_REQUIRE_SERVICES so that a run meant for PostgreSQL and
    # Redis cannot quietly fall back to SQLite and local memory.
    if os.environ.get("PROXY_REQUIRE_SERVICES") != "1":
        return
    engine = settings.DATABASES["default"]["ENGINE"]
    backend = settings.CACHES["default"]["BACKEND"]
    if "postgresql" not in engine or "redis" not in backend.lower():
        raise pytest.UsageError(
            f"PROXY_REQUIRE_SERVICES=1 needs PostgreSQL and Redis, but the "
            f"settings use {engine} and {backend}. Set DATABASE_URL and CACHE_URL."
        )


@pytest.fixture
def postgresql() -> None:
    """Skip unless the database is PostgreSQL.

    With PROXY_REQUIRE_SERVICES=1 the test fails instead of skipping.
    """
    engine = settings.DATABASES["default"]["ENGINE"]
    if engine == "django.db.backends.postgresql":
        return
    reason = f"Needs PostgreSQL, but the settings use {engine}."
    if os.environ.get("PROXY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} PROXY_REQUIRE_SERVICES=1 forbids skipping.")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def _upstream_server():
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def upstream(_upstream_server, settings):
    """The fake upstream, reset, with the proxy's client pointed at it."""
    _upstream_server.reset()
    settings.OPENAI_BASE_URL = _upstream_server.base_url
    yield _upstream_server
    _upstream_server.reset()


@pytest.fixture(autouse=True)
def _clean_state():
    cache.clear()
    reset_client()
    # Tests reuse tier ids and versions, which the per-process list keys on.
    clear_tier_rules()
    yield
    reset_client()


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()
