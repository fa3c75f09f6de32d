"""Prometheus metrics of the proxy, and the GET /metrics view that exposes them.

Labels take only values from small, fixed sets: URL pattern names, status
codes, tier names, error codes and endpoint names. Key prefixes, raw paths and
model names never become labels, because clients choose them.

Each process counts on its own. When PROMETHEUS_MULTIPROC_DIR is set,
prometheus-client's multiprocess mode keeps the values in files there, and
/metrics returns the sum over every process that shares the directory.
"""

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.django import PrometheusDjangoView

from .error_views import not_found
from .errors import error_body

# Label value for requests without a key, and so without a tier.
NO_TIER = "none"
# Route label of a request that no named URL pattern matched.
UNMATCHED_ROUTE = "unmatched"
# Seconds, from a quick model reply to PROXY_UPSTREAM_TIMEOUT's default (60)
# and beyond.
UPSTREAM_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)

REQUESTS = Counter(
    "proxy_requests",
    "Requests answered, by URL pattern name, HTTP status and the key's tier. "
    "A stream is counted when it ends.",
    ["route", "status", "tier"],
)
REFUSALS = Counter(
    "proxy_refusals",
    "Requests that the proxy answered with an error before calling the "
    "upstream, by error code.",
    ["reason", "tier"],
)
FAILURES = Counter(
    "proxy_failures",
    "Requests that failed from the upstream call on, by error code; "
    "client_disconnected for a client that left a stream.",
    ["reason", "tier"],
)
TOKENS = Counter(
    "proxy_tokens",
    "Tokens charged to keys, by tier and type (prompt or completion).",
    ["tier", "type"],
)
UPSTREAM_LATENCY = Histogram(
    "proxy_upstream_latency_seconds",
    "Seconds from the start of an upstream call until its reply, or for a "
    "stream until the reply's headers, successful or not, by endpoint.",
    ["endpoint"],
    buckets=UPSTREAM_LATENCY_BUCKETS,
)
UPSTREAM_IN_FLIGHT = Gauge(
    "proxy_upstream_in_flight",
    "Upstream calls in progress, streams included until they end.",
    # In multiprocess mode: the sum over live processes only.
    multiprocess_mode="livesum",
)


def route_label(request: HttpRequest) -> str:
    """Return the name of the URL pattern that served the request.

    Every admin page counts as `admin`, and a request that matched no named
    pattern (an unknown URL, a static file) as `unmatched`.
    """
    match = getattr(request, "resolver_match", None)
    if match is None:
        return UNMATCHED_ROUTE
    if "admin" in match.namespaces:
        return "admin"
    return match.url_name or UNMATCHED_ROUTE


def observe_request(
    *,
    route: str,
    status: int,
    tier: str | None,
    outcome: str | None,
    reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    """Count one finished request.

    `outcome` is `refused` (an error before the upstream call), `failed` (an
    error from the upstream call on) or None. `reason` is the error code.
    """
    tier_label = tier or NO_TIER
    REQUESTS.labels(route=route, status=str(status), tier=tier_label).inc()
    if outcome == "refused":
        REFUSALS.labels(reason=reason or "unknown", tier=tier_label).inc()
    elif outcome == "failed":
        FAILURES.labels(reason=reason or "unknown", tier=tier_label).inc()
    if prompt_tokens:
        TOKENS.labels(tier=tier_label, type="prompt").inc(prompt_tokens)
    if completion_tokens:
        TOKENS.labels(tier=tier_label, type="completion").inc(completion_tokens)


def _bearer_token(request: HttpRequest) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def _token_error(message: str, *, invalid: bool) -> JsonResponse:
    body = error_body(message, code="invalid_token", error_type="invalid_request_error")
    response = JsonResponse(body, status=401)
    challenge = 'Bearer realm="metrics"'
    if invalid:
        challenge += ', error="invalid_token"'
    response["WWW-Authenticate"] = challenge
    return response


class MetricsView(PrometheusDjangoView):
    """GET /metrics, guarded by PROXY_METRICS.

    `off` returns 404 as for any unknown URL, and `open` serves everyone.
    `token` requires `Authorization: Bearer <PROXY_METRICS_TOKEN>` and returns
    401 without it.
    """

    def dispatch(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        mode = settings.PROXY_METRICS
        if mode == "off":
            return not_found(request)
        if mode == "token":
            token = _bearer_token(request)
            if token is None:
                return _token_error(
                    "GET /metrics requires the metrics token in an "
                    "`Authorization: Bearer` header.",
                    invalid=False,
                )
            expected = settings.PROXY_METRICS_TOKEN
            if not hmac.compare_digest(token.encode(), expected.encode()):
                return _token_error("The metrics token is invalid.", invalid=True)
        return super().dispatch(request, *args, **kwargs)

    def http_method_not_allowed(
        self, request: HttpRequest, *args, **kwargs
    ) -> HttpResponse:
        body = error_body(
            f"Method {request.method} is not allowed; use GET.",
            code="method_not_allowed",
            error_type="invalid_request_error",
        )
        response = JsonResponse(body, status=405)
        response["Allow"] = "GET, HEAD, OPTIONS"
        return response


metrics_view = csrf_exempt(MetricsView.as_view())
