"""GET /metrics: access control, and the counters, histogram and gauge it exposes.

The metrics live in prometheus-client's process-wide registry, which every
test in the run adds to, so the tests compare values before and after.
"""

import contextlib
import datetime
import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import time_machine
from django.http import HttpResponseBase
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from generation.models import QuotaCounter
from generation.quotas import period_start
from keys.models import PromptRule
from tests.factories import make_key, make_tier
from tests.fake_upstream import Behaviour
from tests.servers import HOST, ProxyServer, run_in_project

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-0123456789abcdef"
# The frozen time of the rate limit tests: no window ends while they run.
START = datetime.datetime(2026, 3, 10, 12, 0, 30, tzinfo=datetime.UTC)
# Seconds to wait for the live server to notice a client that left.
DISCONNECT_TIMEOUT = 10.0

Samples = dict[tuple[str, frozenset], float]


def parse_samples(text: str) -> Samples:
    """Return every sample of an exposition, parsed by prometheus-client."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    return parse_samples(response.content.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def generate(
    client, raw_key: str, *, content_length: str | None = None, **body
) -> HttpResponseBase:
    body.setdefault("prompt", "name three rivers")
    extra = {} if content_length is None else {"CONTENT_LENGTH": content_length}
    return client.post(
        "/generate-text/",
        json.dumps(body),
        content_type="application/json",
        headers={"x-api-key": raw_key},
        **extra,
    )


@pytest.fixture
def open_metrics(settings) -> None:
    settings.PROXY_METRICS = "open"


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


class TestAccess:
    def test_off_returns_404(self, api_client, settings):
        settings.PROXY_METRICS = "off"
        response = api_client.get("/metrics")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_url"

    def test_open_serves_prometheus_text(self, api_client, open_metrics):
        response = api_client.get("/metrics")
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain")
        assert b"# TYPE proxy_requests_total counter" in response.content

    @pytest.mark.parametrize(
        ("headers", "challenge"),
        [
            pytest.param({}, 'Bearer realm="metrics"', id="no-header"),
            pytest.param(
                {"Authorization": "Bearer wrong-token-0123456789"},
                'Bearer realm="metrics", error="invalid_token"',
                id="wrong-token",
            ),
            pytest.param(
                {"Authorization": f"Basic {TOKEN}"},
                'Bearer realm="metrics"',
                id="other-scheme",
            ),
            pytest.param({"x-api-key": TOKEN}, 'Bearer realm="metrics"', id="api-key"),
        ],
    )
    def test_token_mode_rejects_request_without_token(
        self, api_client, settings, headers, challenge
    ):
        settings.PROXY_METRICS = "token"
        settings.PROXY_METRICS_TOKEN = TOKEN
        response = api_client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == challenge
        assert response.json()["error"]["code"] == "invalid_token"
        assert b"proxy_requests_total" not in response.content

    def test_token_mode_serves_right_token(self, api_client, settings):
        settings.PROXY_METRICS = "token"
        settings.PROXY_METRICS_TOKEN = TOKEN
        response = api_client.get(
            "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 200
        assert b"proxy_requests_total" in response.content

    def test_post_is_not_allowed(self, api_client, open_metrics):
        response = api_client.post("/metrics")
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"


class TestRequestMetrics:
    def test_generation_moves_counters_and_histogram(
        self, api_client, upstream, open_metrics
    ):
        tier = make_tier("metrics-gen")
        _, raw_key = make_key(tier=tier)
        before = scrape(api_client)
        response = generate(api_client, raw_key)
        after = scrape(api_client)

        usage = response.json()["usage"]
        requests = {"route": "generate-text", "status": "200", "tier": tier.name}
        assert value(after, "proxy_requests_total", **requests) == (
            value(before, "proxy_requests_total", **requests) + 1
        )
        for kind in ("prompt", "completion"):
            labels = {"tier": tier.name, "type": kind}
            assert value(after, "proxy_tokens_total", **labels) == (
                value(before, "proxy_tokens_total", **labels) + usage[f"{kind}_tokens"]
            )
        latency = {"endpoint": "generate-text"}
        count = "proxy_upstream_latency_seconds_count"
        assert value(after, count, **latency) == value(before, count, **latency) + 1
        total = "proxy_upstream_latency_seconds_sum"
        assert value(after, total, **latency) > value(before, total, **latency)
        assert value(after, "proxy_upstream_in_flight") == value(
            before, "proxy_upstream_in_flight"
        )

    def test_unknown_path_is_one_route_label(self, api_client, open_metrics):
        labels = {"route": "unmatched", "status": "404", "tier": "none"}
        before = scrape(api_client)
        api_client.get("/v1/no-such-path-7f3a")
        api_client.get("/no-such-path-9c1b")
        after = scrape(api_client)
        assert value(after, "proxy_requests_total", **labels) == (
            value(before, "proxy_requests_total", **labels) + 2
        )
        exposition = api_client.get("/metrics").content.decode()
        assert "no-such-path" not in exposition

    def test_key_prefix_is_never_a_label(self, api_client, upstream, open_metrics):
        api_key, raw_key = make_key(tier=make_tier("metrics-prefix"))
        generate(api_client, raw_key)
        exposition = api_client.get("/metrics").content.decode()
        assert api_key.prefix not in exposition

    def test_upstream_failure_is_counted_as_failure(
        self, api_client, upstream, open_metrics
    ):
        tier = make_tier("metrics-fail")
        _, raw_key = make_key(tier=tier)
        upstream.queue(Behaviour(status=500))
        labels = {"reason": "upstream_error", "tier": tier.name}
        before = scrape(api_client)
        response = generate(api_client, raw_key)
        after = scrape(api_client)
        assert response.status_code == 502
        assert value(after, "proxy_failures_total", **labels) == (
            value(before, "proxy_failures_total", **labels) + 1
        )
        assert value(after, "proxy_refusals_total", **labels) == value(
            before, "proxy_refusals_total", **labels
        )
        assert value(after, "proxy_upstream_in_flight") == value(
            before, "proxy_upstream_in_flight"
        )


def _rate_limited(client) -> tuple[str, int]:
    tier = make_tier("refuse-rate", rate_limits="1/m")
    _, raw_key = make_key(tier=tier)
    generate(client, raw_key)
    return tier.name, generate(client, raw_key).status_code


def _over_quota(client) -> tuple[str, int]:
    tier = make_tier("refuse-quota", tokens_per_day=100)
    api_key, raw_key = make_key(tier=tier)
    QuotaCounter.objects.create(
        api_key=api_key,
        period=QuotaCounter.Period.DAY,
        period_start=period_start("day", timezone.now()),
        used=100,
    )
    return tier.name, generate(client, raw_key, max_tokens=50).status_code


def _rejected_prompt(client) -> tuple[str, int]:
    tier = make_tier("refuse-rule")
    rule = PromptRule.objects.create(name="no rivers", pattern="rivers", message="No.")
    tier.rules.add(rule)
    _, raw_key = make_key(tier=tier)
    return tier.name, generate(client, raw_key).status_code


def _model_not_allowed(client) -> tuple[str, int]:
    tier = make_tier("refuse-model", allowed_models="gpt-4o")
    _, raw_key = make_key(tier=tier)
    return tier.name, generate(client, raw_key, model="gpt-4o-mini").status_code


def _invalid_key(client) -> tuple[str, int]:
    return "none", generate(client, "sk-AAAAAAAA-" + "B" * 40).status_code


def _too_large(client) -> tuple[str, int]:
    tier = make_tier("refuse-size")
    _, raw_key = make_key(tier=tier)
    # Over Django's DATA_UPLOAD_MAX_MEMORY_SIZE, which is PROXY_MAX_REQUEST_BYTES.
    return tier.name, generate(client, raw_key, content_length="99999999").status_code


def _failed_attempts(client) -> tuple[str, int]:
    generate(client, "sk-AAAAAAAA-" + "B" * 40)
    return "none", generate(client, "sk-AAAAAAAA-" + "C" * 40).status_code


@pytest.mark.parametrize(
    ("refuse", "reason", "status"),
    [
        pytest.param(_rate_limited, "rate_limit_exceeded", 429, id="rate-limit"),
        pytest.param(_over_quota, "insufficient_quota", 429, id="quota"),
        pytest.param(_rejected_prompt, "prompt_rejected", 400, id="prompt-rule"),
        pytest.param(_model_not_allowed, "model_not_allowed", 403, id="model"),
        pytest.param(_invalid_key, "invalid_api_key", 403, id="invalid-key"),
        pytest.param(_too_large, "request_too_large", 413, id="too-large"),
        pytest.param(
            _failed_attempts, "too_many_failed_attempts", 429, id="failed-attempts"
        ),
    ],
)
def test_refusal_is_counted_by_reason(
    api_client, upstream, settings, open_metrics, clock, refuse, reason, status
):
    settings.PROXY_FAILED_AUTH_RATE = "1/m"
    before = scrape(api_client)
    tier, answered = refuse(api_client)
    after = scrape(api_client)
    assert answered == status
    labels = {"reason": reason, "tier": tier}
    assert value(after, "proxy_refusals_total", **labels) == (
        value(before, "proxy_refusals_total", **labels) + 1
    )
    requests = {"route": "generate-text", "status": str(status), "tier": tier}
    assert value(after, "proxy_requests_total", **requests) > value(
        before, "proxy_requests_total", **requests
    )


class TestUpstreamInFlight:
    def test_gauge_drops_after_completed_stream(
        self, api_client, upstream, open_metrics
    ):
        _, raw_key = make_key(tier=make_tier("in-flight-stream"))
        before = value(scrape(api_client), "proxy_upstream_in_flight")
        response = generate(api_client, raw_key, stream=True)
        events = iter(response.streaming_content)
        first = next(events)
        during = value(scrape(api_client), "proxy_upstream_in_flight")
        rest = b"".join(events)
        after = value(scrape(api_client), "proxy_upstream_in_flight")
        assert first.startswith(b"data: ")
        assert rest.endswith(b"data: [DONE]\n\n")
        assert during == before + 1
        assert after == before

    def test_gauge_drops_after_upstream_drops_stream(
        self, api_client, upstream, open_metrics
    ):
        _, raw_key = make_key(tier=make_tier("in-flight-drop"))
        upstream.queue(Behaviour(drop_after_chunks=1))
        before = value(scrape(api_client), "proxy_upstream_in_flight")
        response = generate(api_client, raw_key, stream=True)
        body = b"".join(response.streaming_content)
        after = value(scrape(api_client), "proxy_upstream_in_flight")
        assert b'"code": "upstream_error"' in body
        assert after == before

    @pytest.mark.django_db(transaction=True)
    def test_gauge_drops_after_client_disconnect(
        self, live_server, api_client, upstream, open_metrics
    ):
        tier = make_tier("in-flight-disconnect")
        _, raw_key = make_key(tier=tier)
        in_flight = "proxy_upstream_in_flight"
        failures = {"reason": "client_disconnected", "tier": tier.name}
        before = scrape(api_client)
        upstream.set_default(chunk_delay=0.3)
        try:
            with open_stream(live_server.url, raw_key):
                during = scrape(api_client)
            after = wait_for_in_flight(api_client, value(before, in_flight))
        finally:
            upstream.set_default(chunk_delay=0.0)
        assert value(during, in_flight) == value(before, in_flight) + 1
        assert value(after, in_flight) == value(before, in_flight)
        assert value(after, "proxy_failures_total", **failures) == (
            value(before, "proxy_failures_total", **failures) + 1
        )


@contextlib.contextmanager
def open_stream(url: str, raw_key: str) -> Iterator[socket.socket]:
    """Start a streamed chat completion over a raw socket and leave it unread.

    Closing the socket part-way is what a client that goes away does; the
    server finds out on its next write.
    """
    address = urllib.parse.urlsplit(url)
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "one two three four five"}],
        }
    ).encode()
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            + f"Authorization: Bearer {raw_key}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        first = conn.recv(4096)
        assert first.split(b"\r\n")[0].endswith(b"200 OK")
        yield conn


def wait_for_in_flight(client, expected: float) -> Samples:
    """Scrape until the in-flight gauge is `expected`, or the timeout passes."""
    deadline = time.monotonic() + DISCONNECT_TIMEOUT
    samples = scrape(client)
    while value(samples, "proxy_upstream_in_flight") != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
        samples = scrape(client)
    return samples


class TestMultiprocess:
    def test_processes_sharing_directory_are_summed(self, tmp_path):
        environment = {
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
            "PROXY_METRICS": "open",
        }
        servers = [ProxyServer(environment, threads=2) for _ in range(2)]
        try:
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready()
            labels = {"route": "healthz", "status": "200", "tier": "none"}
            before = value(_scrape_server(servers[0]), "proxy_requests_total", **labels)
            for server, count in zip(servers, (3, 2), strict=True):
                for _ in range(count):
                    _get(server, "/healthz")
            after = _scrape_server(servers[0])
        finally:
            for server in servers:
                server.stop()
        assert value(after, "proxy_requests_total", **labels) == before + 5
        assert value(after, "proxy_upstream_in_flight") == 0
        assert list(tmp_path.glob("counter_*.db"))


def _get(server: ProxyServer, path: str) -> bytes:
    connection = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        return body
    finally:
        connection.close()


def _scrape_server(server: ProxyServer) -> Samples:
    return parse_samples(_get(server, "/metrics").decode())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"PROXY_METRICS": "maybe"}, "PROXY_METRICS is 'maybe'", id="unknown-mode"
        ),
        pytest.param(
            {"PROXY_METRICS": "token", "PROXY_METRICS_TOKEN": ""},
            "PROXY_METRICS_TOKEN has fewer than 16 characters",
            id="token-missing",
        ),
        pytest.param(
            {"PROXY_METRICS_TOKEN": "short"},
            "PROXY_METRICS_TOKEN has fewer than 16 characters",
            id="token-short",
        ),
        pytest.param(
            {"PROMETHEUS_MULTIPROC_DIR": "/nonexistent/metrics-dir"},
            "PROMETHEUS_MULTIPROC_DIR is '/nonexistent/metrics-dir'",
            id="multiprocess-dir-missing",
        ),
    ],
)
def test_bad_metrics_setting_stops_start(env, message):
    result = run_in_project(["manage.py", "check"], **env)
    assert result.returncode != 0
    assert message in result.stderr
