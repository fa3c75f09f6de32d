"""A key's life seen by clients: rotation, revocation and expiry over HTTP.

Keys are changed through the services, through bulk `QuerySet.update()` and
through raw SQL, and the next request must see the change, because the proxy
reads the key's row on every request and caches nothing.
"""

import datetime
import http.client
import json
from collections.abc import Callable, Iterator

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from generation.models import QuotaCounter, UsageRecord
from keys.models import APIKey, PromptRule
from keys.services import expire_unused_keys, revoke_key, rotate_key
from tests.factories import make_key, make_tier
from tests.servers import HOST, ProxyServer, shared_environment

START = datetime.datetime(2026, 5, 4, 9, 0, tzinfo=datetime.UTC)
# Path, body and the status of a denied key on each authenticated API.
ENDPOINTS = [
    pytest.param("/generate-text/", {"prompt": "hi"}, 403, id="generate-text"),
    pytest.param(
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        401,
        id="chat-completions",
    ),
]


def post(client, path: str, body: dict, raw_key: str):
    return client.post(
        path,
        json.dumps(body),
        content_type="application/json",
        headers={"x-api-key": raw_key},
    )


def sql_time(value: datetime.datetime):
    """`value` as the database driver takes it in a raw query."""
    return connection.ops.adapt_datetimefield_value(value)


def revoke_with_queryset_update(api_key: APIKey) -> None:
    APIKey.objects.filter(pk=api_key.pk).update(revoked_at=timezone.now())


def expire_every_key_with_queryset_update(api_key: APIKey) -> None:
    APIKey.objects.update(expires_at=timezone.now())


def revoke_with_raw_sql(api_key: APIKey) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE keys_apikey SET revoked_at = %s WHERE id = %s",
            [sql_time(timezone.now()), api_key.pk],
        )


def expire_with_raw_sql(api_key: APIKey) -> None:
    past = timezone.now() - datetime.timedelta(seconds=1)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE keys_apikey SET expires_at = %s WHERE id = %s",
            [sql_time(past), api_key.pk],
        )


def replace_hash_with_raw_sql(api_key: APIKey) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE keys_apikey SET hashed_key = %s WHERE id = %s",
            ["0" * 64, api_key.pk],
        )


def revoke_with_service(api_key: APIKey) -> None:
    revoke_key(api_key=api_key)


def rotate_with_service(api_key: APIKey) -> None:
    rotate_key(api_key=api_key)


DENIALS = [
    pytest.param(revoke_with_service, id="revoke-service"),
    pytest.param(rotate_with_service, id="rotate-service"),
    pytest.param(revoke_with_queryset_update, id="revoke-update"),
    pytest.param(expire_every_key_with_queryset_update, id="expire-update-all"),
    pytest.param(revoke_with_raw_sql, id="revoke-raw-sql"),
    pytest.param(expire_with_raw_sql, id="expire-raw-sql"),
    pytest.param(replace_hash_with_raw_sql, id="rehash-raw-sql"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "body", "denied_status"), ENDPOINTS)
@pytest.mark.parametrize("change", DENIALS)
def test_changed_key_is_denied_on_next_request(
    api_client,
    upstream,
    path: str,
    body: dict,
    denied_status: int,
    change: Callable[[APIKey], None],
):
    api_key, raw_key = make_key()
    assert post(api_client, path, body, raw_key).status_code == 200

    change(api_key)

    response = post(api_client, path, body, raw_key)
    assert response.status_code == denied_status
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert len(upstream.requests) == 1


@pytest.mark.django_db
def test_expired_stale_key_is_denied(api_client, upstream):
    with time_machine.travel(START, tick=False) as clock:
        api_key, raw_key = make_key()
        clock.shift(datetime.timedelta(days=31))
        expire_unused_keys(unused_for=datetime.timedelta(days=30))
        response = post(api_client, "/generate-text/", {"prompt": "hi"}, raw_key)
    assert response.status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "body", "denied_status"), ENDPOINTS)
def test_rotated_key_works_through_grace_then_stops(
    api_client, upstream, path: str, body: dict, denied_status: int
):
    api_key, old_key = make_key(tier=make_tier("metered", tokens_per_day=100_000))
    with time_machine.travel(START, tick=False) as clock:
        assert post(api_client, path, body, old_key).status_code == 200
        new_key = rotate_key(api_key=api_key, grace=datetime.timedelta(minutes=30))

        clock.shift(datetime.timedelta(minutes=29))
        assert post(api_client, path, body, old_key).status_code == 200
        assert post(api_client, path, body, new_key).status_code == 200

        clock.shift(datetime.timedelta(minutes=1))
        assert post(api_client, path, body, old_key).status_code == denied_status
        assert post(api_client, path, body, new_key).status_code == 200


@pytest.mark.django_db
def test_rotation_keeps_usage_and_quota_on_same_key(api_client, upstream):
    tier = make_tier("metered", tokens_per_day=100_000)
    api_key, old_key = make_key(tier=tier)
    body = {"prompt": "count these tokens"}
    first = post(api_client, "/generate-text/", body, old_key).json()

    new_key = rotate_key(api_key=api_key)
    second = post(api_client, "/generate-text/", body, new_key).json()

    records = UsageRecord.objects.filter(api_key=api_key)
    assert records.count() == 2
    assert set(records.values_list("status", flat=True)) == {"succeeded"}
    [day] = QuotaCounter.objects.filter(api_key=api_key, period="day")
    spent = first["usage"]["total_tokens"] + second["usage"]["total_tokens"]
    assert day.used == spent


@pytest.mark.django_db
def test_rotation_keeps_rate_limit_count(api_client, upstream):
    api_key, old_key = make_key(tier=make_tier("two", rate_limits="2/m"))
    with time_machine.travel(START, tick=False):
        assert (
            post(api_client, "/generate-text/", {"prompt": "a"}, old_key).status_code
            == 200
        )
        new_key = rotate_key(api_key=api_key)
        assert (
            post(api_client, "/generate-text/", {"prompt": "b"}, new_key).status_code
            == 200
        )
        response = post(api_client, "/generate-text/", {"prompt": "c"}, new_key)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.fixture
def two_servers(postgresql, transactional_db, upstream) -> Iterator[list[int]]:
    """Ports of two proxy processes on the test database and the fake upstream.

    The SQLite test database is in memory, where other processes cannot see
    it, so the servers need PostgreSQL.
    """
    environment = shared_environment(upstream.base_url)
    servers = [ProxyServer(environment, threads=2) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield [server.port for server in servers]
    finally:
        for server in servers:
            server.stop()


def status_from(port: int, raw_key: str) -> int:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request(
            "POST",
            "/generate-text/",
            body=json.dumps({"prompt": "hi"}),
            headers={"Content-Type": "application/json", "x-api-key": raw_key},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_raw_sql_revocation_reaches_every_process(two_servers, upstream):
    api_key, raw_key = make_key()
    assert [status_from(port, raw_key) for port in two_servers] == [200, 200]

    revoke_with_raw_sql(api_key)

    assert [status_from(port, raw_key) for port in two_servers] == [403, 403]


def test_rotation_reaches_every_process(two_servers, upstream):
    api_key, old_key = make_key()
    assert [status_from(port, old_key) for port in two_servers] == [200, 200]

    new_key = rotate_key(api_key=api_key)

    assert [status_from(port, old_key) for port in two_servers] == [403, 403]
    assert [status_from(port, new_key) for port in two_servers] == [200, 200]


def test_rule_change_reaches_every_process(two_servers, upstream):
    tier = make_tier("ruled")
    _, raw_key = make_key(tier=tier)
    assert [status_from(port, raw_key) for port in two_servers] == [200, 200]

    rule = PromptRule.objects.create(name="no-hi", pattern="hi", message="No.")
    tier.rules.add(rule)

    assert [status_from(port, raw_key) for port in two_servers] == [400, 400]

    rule.enabled = False
    rule.save()

    assert [status_from(port, raw_key) for port in two_servers] == [200, 200]
