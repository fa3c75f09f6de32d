"""Hard limits under concurrent requests, through real HTTP servers.

Many requests for one key are sent at the same moment, to the threaded live
server or to two gunicorn processes, and the tests count exactly how many the
rate limit and the token quota let through.
"""

import datetime
import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import time_machine
from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import F
from django.test import RequestFactory

from generation import quotas
from generation.checks import PER_PROCESS_CACHES
from generation.models import QuotaCounter, UsageRecord
from generation.policy import prepare_chat
from keys.models import APIKey, Tier
from keys.ratelimits import KEY_GROUP, count_request
from tests.factories import make_key, make_tier
from tests.fake_upstream import Behaviour
from tests.servers import HOST, ProxyServer, shared_environment

PATH = "/generate-text/"
PROMPT = "name three rivers"
MAX_TOKENS = 40
# The frozen time of the in-process tests: no rate window ends and no UTC day
# turns while their requests run.
START = datetime.datetime(2026, 3, 10, 12, 0, 30, tzinfo=datetime.UTC)
# Seconds each admitted request waits in the fake upstream, long enough for
# every concurrent request to reach the quota check while the first ones wait.
UPSTREAM_DELAY = 1.0
# Seconds a request may take in total before the test gives up on it.
REQUEST_TIMEOUT = 15.0
# PROXY_UPSTREAM_TIMEOUT, in seconds, in the tests of failed upstream calls.
SHORT_UPSTREAM_TIMEOUT = 0.5


@pytest.fixture
def shared_services() -> None:
    """Skip unless the database is PostgreSQL and the cache is shared.

    SQLite allows one writer at a time and the test database is in memory,
    and a local-memory cache counts for one process only, so concurrent
    requests there would test neither limit. With PROXY_REQUIRE_SERVICES=1
    the test fails instead, so a run meant for the services cannot skip.
    """
    engine = settings.DATABASES["default"]["ENGINE"]
    backend = settings.CACHES[settings.RATELIMIT_USE_CACHE]["BACKEND"]
    if engine == "django.db.backends.postgresql" and backend not in PER_PROCESS_CACHES:
        return
    reason = (
        f"Concurrency tests need PostgreSQL and a shared cache such as Redis, "
        f"but the settings use {engine} and {backend}. Set DATABASE_URL and CACHE_URL."
    )
    if os.environ.get("PROXY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} PROXY_REQUIRE_SERVICES=1 forbids skipping them.")
    pytest.skip(reason)


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    # time-machine replaces the clock of every thread, the live server's too.
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict

    @property
    def code(self) -> str | None:
        return self.body.get("error", {}).get("code")

    @property
    def total_tokens(self) -> int:
        return self.body["usage"]["total_tokens"]


def send_request(
    connection: http.client.HTTPConnection, raw_key: str, body: dict
) -> Reply:
    connection.request(
        "POST",
        PATH,
        body=json.dumps(body),
        headers={"Content-Type": "application/json", "x-api-key": raw_key},
    )
    response = connection.getresponse()
    return Reply(status=response.status, body=json.loads(response.read()))


def post_at_once(
    ports: list[int], raw_key: str, body: dict, *, count: int
) -> list[Reply]:
    """Send `count` requests from as many threads, released together by a barrier.

    Request i goes to ports[i % len(ports)]. Every thread connects before the
    barrier, so the requests overlap even when the server's listen backlog
    makes some connections wait for a SYN retry.
    """
    barrier = threading.Barrier(count)

    def send(index: int) -> Reply:
        port = ports[index % len(ports)]
        connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
        try:
            connection.connect()
            barrier.wait(timeout=REQUEST_TIMEOUT)
            return send_request(connection, raw_key, body)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(send, range(count)))


def statuses(replies: list[Reply]) -> list[int]:
    return sorted(reply.status for reply in replies)


def refusal_codes(replies: list[Reply]) -> set[str | None]:
    return {reply.code for reply in replies if reply.status != 200}


def live_port(live_server) -> int:
    # The live server binds "localhost" with an IPv4 socket, which is HOST.
    return live_server.thread.port


def worst_case_tokens(tier: Tier) -> int:
    """Return the tokens the proxy reserves for one request with PROMPT."""
    chat = prepare_chat(
        tier=tier,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
    )
    return chat.worst_case_tokens


def make_capped_key(*, requests_that_fit: int) -> tuple[APIKey, str, int]:
    """Issue a key whose daily cap fits that many worst cases, and not one more.

    Returns the key, its plaintext and one request's worst case.
    """
    tier = make_tier("capped")
    worst_case = worst_case_tokens(tier)
    tier.tokens_per_day = (requests_that_fit + 1) * worst_case - 1
    tier.save()
    api_key, raw_key = make_key(tier=tier)
    return api_key, raw_key, worst_case


def day_counter(api_key: APIKey) -> QuotaCounter:
    return QuotaCounter.objects.get(
        api_key=api_key, period=QuotaCounter.Period.DAY, period_start=START.date()
    )


@pytest.mark.usefixtures("shared_services")
def test_rate_limit_is_exact_under_threads(live_server, upstream, clock):
    _, raw_key = make_key(tier=make_tier("five", rate_limits="5/m"))

    replies = post_at_once(
        [live_port(live_server)], raw_key, {"prompt": PROMPT}, count=20
    )

    assert statuses(replies) == [200] * 5 + [429] * 15
    assert refusal_codes(replies) == {"rate_limit_exceeded"}
    assert len(upstream.requests) == 5


@pytest.mark.usefixtures("shared_services")
def test_token_cap_is_exact_under_threads(live_server, upstream, settings, clock):
    # Far above UPSTREAM_DELAY, so that only the quota rejects requests.
    settings.PROXY_UPSTREAM_TIMEOUT = REQUEST_TIMEOUT
    api_key, raw_key, _ = make_capped_key(requests_that_fit=3)
    upstream.queue(Behaviour(delay=UPSTREAM_DELAY), times=12)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS}

    replies = post_at_once([live_port(live_server)], raw_key, body, count=12)

    assert statuses(replies) == [200] * 3 + [429] * 9
    assert refusal_codes(replies) == {"insufficient_quota"}
    counter = day_counter(api_key)
    assert counter.reserved == 0
    reported = sum(reply.total_tokens for reply in replies if reply.status == 200)
    assert counter.used == reported
    records = UsageRecord.objects.filter(api_key=api_key)
    assert records.count() == 12
    assert not records.filter(status=UsageRecord.Status.PENDING).exists()
    assert records.filter(status=UsageRecord.Status.SUCCEEDED).count() == 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("behaviour", "status"),
    [
        pytest.param(Behaviour(delay=3 * SHORT_UPSTREAM_TIMEOUT), 504, id="timeout"),
        pytest.param(Behaviour(status=500), 502, id="server-error"),
    ],
)
def test_failed_call_releases_reservation(
    api_client, upstream, settings, clock, behaviour, status
):
    settings.PROXY_UPSTREAM_TIMEOUT = SHORT_UPSTREAM_TIMEOUT
    api_key, raw_key, _ = make_capped_key(requests_that_fit=1)
    upstream.queue(behaviour)
    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS})

    def send():
        return api_client.post(
            PATH, body, content_type="application/json", headers={"x-api-key": raw_key}
        )

    failed = send()

    assert failed.status_code == status
    counter = day_counter(api_key)
    assert counter.reserved == 0
    assert counter.used == 0
    assert send().status_code == 200


@pytest.fixture
def proxy_servers(transactional_db, upstream) -> Iterator[list[ProxyServer]]:
    """Two proxy processes on the test database, the cache and the fake upstream."""
    environment = shared_environment(upstream.base_url)
    servers = [ProxyServer(environment), ProxyServer(environment)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def wait_for_fresh_window(api_key: APIKey, rate: str, *, margin: int) -> None:
    """Sleep into the next rate window if the current one ends within `margin` seconds.

    The server processes read the real clock, which the test cannot freeze.
    """
    request = RequestFactory().get("/")
    [usage] = count_request(
        request, group=KEY_GROUP, value=str(api_key.pk), rates=[rate], increment=False
    )
    if usage.reset <= margin:
        time.sleep(usage.reset)


@pytest.mark.usefixtures("shared_services")
def test_rate_limit_is_shared_across_processes(proxy_servers, upstream):
    api_key, raw_key = make_key(tier=make_tier("five", rate_limits="5/m"))
    wait_for_fresh_window(api_key, "5/m", margin=5)
    ports = [server.port for server in proxy_servers]

    replies = post_at_once(ports, raw_key, {"prompt": PROMPT}, count=20)

    assert statuses(replies) == [200] * 5 + [429] * 15
    assert refusal_codes(replies) == {"rate_limit_exceeded"}
    assert len(upstream.requests) == 5
    assert UsageRecord.objects.filter(api_key=api_key).count() == 20


# A pool this small, with this short a wait for a connection, fails a request
# that waits for a connection held through the upstream call.
POOL_SIZE = 2
POOL_TIMEOUT = 0.5
SLOW_UPSTREAM_DELAY = 1.5


@pytest.fixture
def pooled_server(transactional_db, upstream) -> Iterator[ProxyServer]:
    """One proxy process with a tiny connection pool and enough threads."""
    environment = {
        **shared_environment(upstream.base_url),
        "DATABASE_POOL": "on",
        "DATABASE_CONN_MAX_AGE": "0",
        "DATABASE_POOL_MIN_SIZE": "1",
        "DATABASE_POOL_MAX_SIZE": str(POOL_SIZE),
        "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
    }
    server = ProxyServer(environment, threads=16).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.usefixtures("shared_services")
def test_upstream_calls_do_not_hold_pooled_connections(pooled_server, upstream):
    _, raw_key = make_key(tier=make_tier("wide", tokens_per_day=10**9))
    count = 5 * POOL_SIZE
    upstream.queue(Behaviour(delay=SLOW_UPSTREAM_DELAY), times=count)

    replies = post_at_once(
        [pooled_server.port], raw_key, {"prompt": PROMPT}, count=count
    )

    assert statuses(replies) == [200] * count, pooled_server.output()
    assert "PoolTimeout" not in pooled_server.output()


def _lock_holders_wait(expected: int, timeout: float = 5.0) -> None:
    """Wait until `expected` backends of this database wait for a row lock."""
    deadline = time.monotonic() + timeout
    with connections["default"].cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0] >= expected:
                return
            time.sleep(0.02)
    raise AssertionError("The settlement never waited for the locked row.")


@pytest.mark.usefixtures("shared_services")
def test_settlement_takes_day_before_month(transactional_db):
    # Statements that lock a key's two counters in opposite orders deadlock
    # under load, so every statement must take the day row first.
    tier = make_tier("two-caps", tokens_per_day=10**6, tokens_per_month=10**7)
    api_key, _ = make_key(tier=tier)
    reservation = quotas.reserve(api_key=api_key, amount=10)
    # A new version of the day row lies after the month row in the table, so
    # a scan in table order would reach the month first.
    QuotaCounter.objects.filter(api_key=api_key, period="day").update(used=F("used"))
    holder = connections.create_connection("default")
    holder.set_autocommit(False)

    def settle() -> None:
        with connection.cursor() as cursor:
            # Table order, as PostgreSQL chooses for a small table.
            cursor.execute("SET enable_indexscan = off")
            cursor.execute("SET enable_bitmapscan = off")
        try:
            quotas.settle(reservation, used_tokens=4)
        finally:
            connection.close()

    settler = threading.Thread(target=settle)
    try:
        with holder.cursor() as cursor:
            cursor.execute(
                "SELECT id FROM generation_quotacounter "
                "WHERE api_key_id = %s AND period = 'day' FOR UPDATE",
                [api_key.pk],
            )
        settler.start()
        _lock_holders_wait(1)
        # The waiting settlement must not hold the month row meanwhile.
        with transaction.atomic():
            month = (
                QuotaCounter.objects.select_for_update(nowait=True)
                .filter(api_key=api_key, period="month")
                .get()
            )
        assert month.reserved == 10
    finally:
        holder.rollback()
        holder.close()
        settler.join(timeout=10)
    counters = QuotaCounter.objects.filter(api_key=api_key)
    assert sorted((c.used, c.reserved) for c in counters) == [(4, 0), (4, 0)]
