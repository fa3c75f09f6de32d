"""Django's error views, responding with the API's JSON error body.

Pages under /admin/ keep Django's HTML error pages, which the admin links to.
"""

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from django.views.csrf import csrf_failure as html_csrf_failure

from .errors import error_body

ADMIN_PREFIX = "/admin/"


def _json_error(status: int, message: str, code: str, error_type: str) -> JsonResponse:
    return JsonResponse(
        error_body(message, code=code, error_type=error_type), status=status
    )


def not_found(request: HttpRequest, exception=None) -> HttpResponse:
    if request.path.startswith(ADMIN_PREFIX):
        return defaults.page_not_found(request, exception)
    return _json_error(
        404,
        f"Unknown request URL: {request.method} {request.path}.",
        "unknown_url",
        "invalid_request_error",
    )


def method_not_allowed(request: HttpRequest, allowed: list[str]) -> JsonResponse:
    """Return 405 with an Allow header, for views outside DRF."""
    body = error_body(
        f"Method {request.method} is not allowed; use {' or '.join(allowed)}.",
        code="method_not_allowed",
        error_type="invalid_request_error",
    )
    response = JsonResponse(body, status=405)
    response["Allow"] = ", ".join(allowed)
    return response


def server_error(request: HttpRequest) -> HttpResponse:
    if request.path.startswith(ADMIN_PREFIX):
        return defaults.server_error(request)
    return _json_error(
        500,
        "The proxy failed to handle the request. The X-Request-ID header "
        "identifies it in the proxy's log.",
        "internal_error",
        "server_error",
    )


def bad_request(request: HttpRequest, exception=None) -> HttpResponse:
    if request.path.startswith(ADMIN_PREFIX):
        return defaults.bad_request(request, exception)
    return _json_error(
        400,
        "The request is malformed, for example its Host header is not allowed.",
        "bad_request",
        "invalid_request_error",
    )


def permission_denied(request: HttpRequest, exception=None) -> HttpResponse:
    if request.path.startswith(ADMIN_PREFIX):
        return defaults.permission_denied(request, exception)
    return _json_error(
        403, "The request is not allowed.", "forbidden", "invalid_request_error"
    )


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    if request.path.startswith(ADMIN_PREFIX):
        return html_csrf_failure(request, reason)
    return _json_error(
        403,
        "The request failed Django's CSRF check.",
        "forbidden",
        "invalid_request_error",
    )
