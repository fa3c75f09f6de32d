"""PostgreSQL connection options: statement timeout and TCP keepalives."""

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from generation.abandoned import ReleaseSummary, release_records
from generation.models import QuotaCounter, UsageRecord
from generation.quotas import period_start
from keys.models import APIKey
from proxy_site.database import TCP_OPTIONS, postgres_options
from tests.factories import make_key, make_tier
from tests.fake_upstream import Behaviour
from tests.servers import run_in_project, shared_environment

Status = UsageRecord.Status

# Seconds of statement timeout in the tests that wait on a locked row.
SHORT_STATEMENT_TIMEOUT = 1
# Seconds a client process may take in total. Without a statement timeout, a
# request waiting on a locked row would take until the lock is released.
CLIENT_RUN_TIMEOUT = 30
# Seconds the fake upstream waits before it replies, long enough for the test
# to lock the quota counter while the request waits for the reply, and below
# the test settings' PROXY_UPSTREAM_TIMEOUT.
UPSTREAM_DELAY = 1.0


def _options(options=None, *, statement_timeout=30.0, pgoptions=""):
    return postgres_options(
        options or {},
        connect_timeout=10,
        statement_timeout=statement_timeout,
        pgoptions=pgoptions,
    )


def test_defaults_add_timeouts_and_keepalives():
    options = _options()

    assert options["options"] == "-c statement_timeout=30000"
    assert options["connect_timeout"] == 10
    for name, value in TCP_OPTIONS.items():
        assert options[name] == value, name


def test_url_options_win_over_defaults():
    options = _options(
        {
            "options": "-c statement_timeout=0",
            "keepalives_idle": 5,
            "tcp_user_timeout": 0,
            "connect_timeout": 3,
        }
    )

    assert options["options"] == "-c statement_timeout=0"
    assert options["keepalives_idle"] == 5
    assert options["tcp_user_timeout"] == 0
    assert options["connect_timeout"] == 3


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(
            "-c search_path=proxy",
            "-c search_path=proxy -c statement_timeout=30000",
            id="other-setting-kept",
        ),
        pytest.param(
            "--statement-timeout=5s", "--statement-timeout=5s", id="long-form-wins"
        ),
    ],
)
def test_url_server_options_are_extended(given, expected):
    assert _options({"options": given})["options"] == expected


def test_pgoptions_kept_with_statement_timeout():
    options = _options(pgoptions="-c search_path=proxy")

    assert options["options"] == "-c search_path=proxy -c statement_timeout=30000"


def test_zero_statement_timeout_adds_none():
    assert "options" not in _options(statement_timeout=0)


def test_fraction_of_millisecond_still_limits():
    assert _options(statement_timeout=0.0001)["options"] == "-c statement_timeout=1"


@pytest.mark.parametrize(
    ("options", "statement_timeout", "message"),
    [
        pytest.param(
            {}, -1.0, "DATABASE_STATEMENT_TIMEOUT must be 0", id="negative-timeout"
        ),
        pytest.param(
            {},
            float("nan"),
            "DATABASE_STATEMENT_TIMEOUT must be 0",
            id="not-a-number-timeout",
        ),
        pytest.param(
            {"keepalives_idle": "soon"},
            30.0,
            "option keepalives_idle is 'soon'",
            id="word-keepalive",
        ),
        pytest.param(
            {"tcp_user_timeout": -5},
            30.0,
            "option tcp_user_timeout is -5",
            id="negative-user-timeout",
        ),
        pytest.param(
            {"connect_timeout": "1.5"},
            30.0,
            "option connect_timeout is '1.5'",
            id="fractional-connect-timeout",
        ),
    ],
)
def test_invalid_option_raises(options, statement_timeout, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        _options(options, statement_timeout=statement_timeout)


# Prints the parameters and server setting of the connection that a query
# runs on, and the TCP options of its socket where the platform has them.
_CONNECTION_REPORT = """
import json, socket, django
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SHOW statement_timeout")
    [statement_timeout] = cursor.fetchone()
    pgconn = connection.connection.pgconn
    report = {
        "parameters": connection.connection.info.get_parameters(),
        "statement_timeout": statement_timeout,
        "pooled": connection.pool is not None,
    }
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock = socket.fromfd(pgconn.socket, socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            report["socket"] = {
                name: sock.getsockopt(level, getattr(socket, name))
                for level, name in [
                    (socket.SOL_SOCKET, "SO_KEEPALIVE"),
                    (socket.IPPROTO_TCP, "TCP_KEEPIDLE"),
                    (socket.IPPROTO_TCP, "TCP_KEEPINTVL"),
                    (socket.IPPROTO_TCP, "TCP_KEEPCNT"),
                    (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT"),
                ]
            }
print(json.dumps(report))
"""


def _connection_report(upstream_url: str, *, url_query: str = "", **env: str) -> dict:
    environment = {
        **shared_environment(upstream_url),
        "DATABASE_POOL_MIN_SIZE": "1",
        "DATABASE_POOL_MAX_SIZE": "4",
    }
    environment["DATABASE_URL"] += url_query
    result = run_in_project(["-c", _CONNECTION_REPORT], **{**environment, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("pool", ["off", "on"])
def test_connection_gets_timeouts_and_keepalives(postgresql, db, upstream, pool):
    report = _connection_report(upstream.base_url, DATABASE_POOL=pool)

    assert report["pooled"] is (pool == "on")
    assert report["statement_timeout"] == "30s"
    parameters = report["parameters"]
    assert parameters["options"] == "-c statement_timeout=30000"
    for name, value in TCP_OPTIONS.items():
        assert parameters[name] == str(value), name
    if "socket" in report:
        assert report["socket"]["SO_KEEPALIVE"] == 1
        assert report["socket"]["TCP_KEEPIDLE"] == TCP_OPTIONS["keepalives_idle"]
        assert report["socket"]["TCP_KEEPINTVL"] == TCP_OPTIONS["keepalives_interval"]
        assert report["socket"]["TCP_KEEPCNT"] == TCP_OPTIONS["keepalives_count"]
        assert report["socket"]["TCP_USER_TIMEOUT"] == TCP_OPTIONS["tcp_user_timeout"]


def test_connection_options_from_url_win(postgresql, db, upstream):
    report = _connection_report(
        upstream.base_url,
        DATABASE_POOL="off",
        DATABASE_STATEMENT_TIMEOUT="5",
        url_query="?keepalives_idle=7&options=-c%20statement_timeout%3D2500",
    )

    assert report["statement_timeout"] == "2500ms"
    assert report["parameters"]["keepalives_idle"] == "7"
    # The URL's values replace only the defaults they name.
    assert report["parameters"]["keepalives_interval"] == "10"


def test_statement_timeout_setting_reaches_server(postgresql, db, upstream):
    report = _connection_report(
        upstream.base_url, DATABASE_POOL="off", DATABASE_STATEMENT_TIMEOUT="0.25"
    )

    assert report["statement_timeout"] == "250ms"


# Sends one POST /generate-text/ with the key in argv[1], and prints its
# status, body and the seconds it took.
_GENERATE_CLIENT = """
import json, sys, time, django
django.setup()
from django.test import Client
client = Client(raise_request_exception=False)
started = time.monotonic()
response = client.post(
    "/generate-text/", {"prompt": "hi"}, content_type="application/json",
    headers={"x-api-key": sys.argv[1]},
)
print(json.dumps({
    "status": response.status_code,
    "body": response.content.decode(),
    "seconds": time.monotonic() - started,
}))
"""


def _generate_in_client_process(upstream_url: str, raw_key: str) -> dict:
    try:
        result = run_in_project(
            ["-c", _GENERATE_CLIENT, raw_key],
            timeout=CLIENT_RUN_TIMEOUT,
            DATABASE_STATEMENT_TIMEOUT=str(SHORT_STATEMENT_TIMEOUT),
            **shared_environment(upstream_url),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"The request waited more than {CLIENT_RUN_TIMEOUT} s on a locked row."
        )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _assert_database_unavailable(response: dict, *, lock_waits: int = 1) -> None:
    assert response["status"] == 503, response
    assert json.loads(response["body"])["error"]["code"] == "database_unavailable"
    # The request waited for the lock until the timeout, and not much longer.
    assert response["seconds"] >= lock_waits * SHORT_STATEMENT_TIMEOUT
    assert response["seconds"] < lock_waits * SHORT_STATEMENT_TIMEOUT + 5


@pytest.mark.django_db(transaction=True)
def test_locked_quota_counter_gets_503(postgresql, upstream):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))
    counter = QuotaCounter.objects.create(
        api_key=api_key,
        period=QuotaCounter.Period.DAY,
        period_start=period_start(QuotaCounter.Period.DAY, timezone.now()),
    )

    # The test's connection holds the counter's row lock, as an operator's
    # open transaction would, until the client process has finished.
    with transaction.atomic():
        QuotaCounter.objects.select_for_update().get(pk=counter.pk)
        response = _generate_in_client_process(upstream.base_url, raw_key)

    _assert_database_unavailable(response)
    [record] = UsageRecord.objects.filter(api_key=api_key)
    assert record.status == Status.REFUSED
    assert record.reason == "database_unavailable"
    assert record.http_status == 503
    assert record.reserved_tokens == 0
    assert record.settled_at is not None
    counter.refresh_from_db()
    assert counter.reserved == 0
    assert counter.used == 0
    assert upstream.requests == []


@pytest.mark.django_db(transaction=True)
def test_locked_api_key_gets_503(postgresql, upstream):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))

    # A key never used before gets its "last used" time written, which waits
    # for the row's lock.
    with transaction.atomic():
        APIKey.objects.select_for_update().get(pk=api_key.pk)
        response = _generate_in_client_process(upstream.base_url, raw_key)

    _assert_database_unavailable(response)
    assert not UsageRecord.objects.filter(api_key=api_key).exists()
    assert not QuotaCounter.objects.filter(api_key=api_key).exists()
    assert upstream.requests == []


@pytest.mark.django_db(transaction=True)
def test_counter_locked_at_settlement_gets_503(postgresql, upstream):
    api_key, raw_key = make_key(tier=make_tier(tokens_per_day=10**6))
    upstream.queue(Behaviour(delay=UPSTREAM_DELAY))

    with ThreadPoolExecutor(max_workers=1) as executor:
        future = executor.submit(
            _generate_in_client_process, upstream.base_url, raw_key
        )
        # The counter exists once the request has reserved its tokens, and the
        # request is then waiting for the upstream.
        deadline = time.monotonic() + CLIENT_RUN_TIMEOUT
        while not QuotaCounter.objects.filter(api_key=api_key).exists():
            assert time.monotonic() < deadline, "The request reserved no tokens."
            time.sleep(0.05)
        with transaction.atomic():
            list(QuotaCounter.objects.select_for_update().filter(api_key=api_key))
            response = future.result()

    # Settling with the record, settling alone, and releasing each wait for
    # the lock once.
    _assert_database_unavailable(response, lock_waits=3)
    [record] = UsageRecord.objects.filter(api_key=api_key)
    [counter] = QuotaCounter.objects.filter(api_key=api_key)
    # The reservation could not be settled, so it stays in the counter, and
    # the pending record shows how much it holds and what the reply used.
    assert record.status == Status.PENDING
    assert record.reason == "database_unavailable"
    assert record.http_status == 503
    assert record.settled_at is None
    assert counter.reserved == record.reserved_tokens > 0
    assert counter.used == 0
    assert record.total_tokens > 0
    assert len(upstream.requests) == 1

    # Once the record is old enough, release_abandoned releases the
    # reservation and charges the tokens the record shows.
    with transaction.atomic():
        release_records([record.pk], ReleaseSummary())
    record.refresh_from_db()
    counter.refresh_from_db()
    assert record.status == Status.FAILED
    assert record.reason == "abandoned"
    assert counter.reserved == 0
    assert counter.used == record.total_tokens
