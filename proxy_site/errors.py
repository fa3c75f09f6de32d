"""API errors and the DRF exception handler that renders them.

Every error leaves the proxy in one envelope, the one OpenAI's SDKs parse:
`{"error": {"message", "type", "param", "code"}}`.
"""

import logging
import math

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, UnreadablePostError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

INVALID_KEY_MESSAGE = "The API key is missing or invalid."

logger = logging.getLogger(__name__)

# Errors that mean the database is down, unreachable or out of connections,
# or cancelled a query. psycopg's pool timeout is an OperationalError too.
DATABASE_OUTAGES = (OperationalError, InterfaceError)


class ProxyError(exceptions.APIException):
    """An error with a status, a full-sentence message and a stable code."""

    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    default_detail = "The proxy failed to handle the request."
    default_code = "internal_error"
    error_type = "server_error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        extra: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.param = param
        self.retry_after = retry_after
        # Added to the error body, next to message, type, param and code.
        self.extra = extra or {}
        # Added to the response, e.g. the rate limit headers.
        self.headers = headers or {}


class RequestTooLarge(ProxyError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is larger than the proxy accepts."
    default_code = "request_too_large"
    error_type = "invalid_request_error"


class RequestTimeout(ProxyError):
    status_code = status.HTTP_408_REQUEST_TIMEOUT
    default_detail = "The request body stopped arriving before it was complete."
    default_code = "request_timeout"
    error_type = "invalid_request_error"


class UnreadableRequestBody(ProxyError):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = (
        "The connection failed before the whole request body arrived. "
        "Send the request again."
    )
    default_code = "invalid_request"
    error_type = "invalid_request_error"


class UnencodableRequestBody(ProxyError):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = (
        "The request body contains a value that cannot be sent as JSON, such as "
        "an infinite number. Send finite numbers and valid text only."
    )
    default_code = "invalid_request"
    error_type = "invalid_request_error"


class TooManyFailedAttempts(ProxyError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_detail = (
        "Too many requests with invalid API keys came from this address. "
        "Retry after the time in the Retry-After header."
    )
    default_code = "too_many_failed_attempts"
    error_type = "rate_limit_error"


class RateLimitExceeded(ProxyError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_detail = (
        "This API key is over its request rate limit. "
        "Retry after the time in the Retry-After header."
    )
    default_code = "rate_limit_exceeded"
    error_type = "rate_limit_error"


class QuotaExceeded(ProxyError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_detail = "This API key has used up its token quota."
    default_code = "insufficient_quota"
    error_type = "insufficient_quota"


class RequestOverQuota(QuotaExceeded):
    """A request whose worst case is larger than a whole period's token quota.

    Waiting for the quota to reset cannot help, so it is a 400 without
    `Retry-After`, which clients do not retry.
    """

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_request"
    error_type = "invalid_request_error"


class LimitsUnavailable(ProxyError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The proxy cannot check rate limits right now, so it is not serving "
        "requests. Try again shortly."
    )
    default_code = "limits_unavailable"


class DatabaseUnavailable(ProxyError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The proxy's database is unreachable or did not answer in time, so "
        "the request was not served. Try again shortly."
    )
    default_code = "database_unavailable"


class ModelNotAllowed(ProxyError):
    status_code = status.HTTP_403_FORBIDDEN
    default_detail = "This API key's tier may not use the requested model."
    default_code = "model_not_allowed"
    error_type = "invalid_request_error"


class ModelNotFound(ProxyError):
    status_code = status.HTTP_404_NOT_FOUND
    default_detail = "The model does not exist, or this API key may not use it."
    default_code = "model_not_found"
    error_type = "invalid_request_error"


class PromptTooLong(ProxyError):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "The prompt is longer than this API key's tier allows."
    default_code = "prompt_too_long"
    error_type = "invalid_request_error"


class PromptRejected(ProxyError):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "The prompt was rejected by a rule of this API key's tier."
    default_code = "prompt_rejected"
    error_type = "invalid_request_error"


class LengthRequired(ProxyError):
    status_code = status.HTTP_411_LENGTH_REQUIRED
    default_detail = (
        "The request body must be sent with a Content-Length header; chunked "
        "uploads are not supported."
    )
    default_code = "length_required"
    error_type = "invalid_request_error"


class UpstreamTimeout(ProxyError):
    status_code = status.HTTP_504_GATEWAY_TIMEOUT
    default_detail = "The upstream service did not answer in time. Try again later."
    default_code = "upstream_timeout"


class StreamTimeLimitExceeded(ProxyError):
    status_code = status.HTTP_504_GATEWAY_TIMEOUT
    default_detail = (
        "The response stream lasted longer than the proxy allows, so it was "
        "ended. The tokens generated so far are charged. Request fewer tokens "
        "(max_tokens) to get a shorter response."
    )
    default_code = "stream_time_limit"


class UpstreamError(ProxyError):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = "The upstream service failed to answer. Try again later."
    default_code = "upstream_error"


class UpstreamRateLimited(ProxyError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The proxy's upstream account is over its rate limit. "
        "Retry after the time in the Retry-After header."
    )
    default_code = "upstream_rate_limited"


class UpstreamMisconfigured(ProxyError):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = (
        "The proxy is not configured correctly for its upstream service. "
        "Contact the proxy's operator."
    )
    default_code = "upstream_misconfigured"


class UpstreamRejectedRequest(ProxyError):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = (
        "The upstream service rejected the request, for example because the "
        "prompt is too long for the model or the model does not exist."
    )
    default_code = "upstream_rejected_request"
    error_type = "invalid_request_error"


# DRF's own exceptions, translated to the proxy's codes and sentences.
_DRF_CODES: dict[type[exceptions.APIException], tuple[str, str]] = {
    exceptions.ParseError: ("invalid_json", "invalid_request_error"),
    exceptions.UnsupportedMediaType: (
        "unsupported_media_type",
        "invalid_request_error",
    ),
    exceptions.MethodNotAllowed: ("method_not_allowed", "invalid_request_error"),
    exceptions.NotAcceptable: ("not_acceptable", "invalid_request_error"),
    exceptions.NotFound: ("not_found", "invalid_request_error"),
    exceptions.Throttled: ("rate_limit_exceeded", "rate_limit_error"),
}
_AUTH_FAILURES = (
    exceptions.NotAuthenticated,
    exceptions.AuthenticationFailed,
    exceptions.PermissionDenied,
)


def error_body(
    message: str, *, code: str, error_type: str, param: str | None = None, **extra
) -> dict:
    return {
        "error": {
            "message": message,
            "type": error_type,
            "param": param,
            "code": code,
            **extra,
        }
    }


def _first_validation_error(detail) -> tuple[str | None, str]:
    """Return the first (field, message) of a ValidationError's detail."""
    if isinstance(detail, dict):
        field, errors = next(iter(detail.items()))
        _, message = _first_validation_error(errors)
        if field == "non_field_errors":
            return None, message
        return field, message
    if isinstance(detail, list) and detail:
        return _first_validation_error(detail[0])
    return None, str(detail)


def retry_after_header(seconds: float) -> str:
    """Return a Retry-After value: whole seconds, at least 1.

    A non-finite wait has no whole number of seconds, so it becomes 1.
    """
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))


def envelope_for(exc: exceptions.APIException) -> tuple[dict, dict]:
    """Return the error body and extra headers for a DRF exception."""
    headers: dict[str, str] = {}
    if isinstance(exc, ProxyError):
        headers.update(exc.headers)
        if exc.retry_after is not None:
            headers["Retry-After"] = retry_after_header(exc.retry_after)
        body = error_body(
            str(exc.detail),
            code=exc.default_code,
            error_type=exc.error_type,
            param=exc.param,
            **exc.extra,
        )
        return body, headers
    if isinstance(exc, exceptions.ValidationError):
        field, message = _first_validation_error(exc.detail)
        if field is not None:
            message = f"{field}: {message}"
        body = error_body(
            message,
            code="invalid_request",
            error_type="invalid_request_error",
            param=field,
        )
        return body, headers
    if isinstance(exc, _AUTH_FAILURES):
        body = error_body(
            INVALID_KEY_MESSAGE,
            code="invalid_api_key",
            error_type="invalid_request_error",
        )
        return body, headers
    code, error_type = _DRF_CODES.get(type(exc), ("invalid_request", "server_error"))
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        headers["Retry-After"] = retry_after_header(exc.wait)
    return error_body(str(exc.detail), code=code, error_type=error_type), headers


def error_code(exc: exceptions.APIException) -> str:
    """Return the `code` that the client receives for an exception."""
    body, _ = envelope_for(exc)
    return body["error"]["code"]


def as_api_exception(exc: BaseException) -> exceptions.APIException | None:
    """Return the API error that the client receives for an exception.

    Returns None for an exception that leads to a 500 internal_error.
    """
    if isinstance(exc, Http404):
        return exceptions.NotFound()
    if isinstance(exc, RequestDataTooBig):
        # DRF reads the whole body through Django, which checks its length
        # against DATA_UPLOAD_MAX_MEMORY_SIZE (set to PROXY_MAX_REQUEST_BYTES).
        return RequestTooLarge(
            f"The request body is larger than {settings.PROXY_MAX_REQUEST_BYTES} "
            "bytes, the limit."
        )
    if isinstance(exc, UnreadablePostError) and _caused_by_timeout(exc):
        # The client stopped sending its body (see proxy_site.body_timeout).
        return RequestTimeout(
            "No part of the request body arrived for "
            f"{settings.PROXY_REQUEST_BODY_TIMEOUT:g} seconds. Send the whole "
            "body right after the headers."
        )
    if isinstance(exc, UnreadablePostError):
        # The client reset or closed the connection while sending the body.
        # It is most likely gone, but a 400 keeps the request out of the
        # server errors in the log and the metrics.
        return UnreadableRequestBody()
    if isinstance(exc, exceptions.APIException):
        return exc
    if isinstance(exc, DATABASE_OUTAGES):
        return DatabaseUnavailable()
    return None


def _caused_by_timeout(exc: BaseException) -> bool:
    """Return whether a TimeoutError is in the chain of `exc`'s causes.

    Django wraps a failed body read in UnreadablePostError twice, once in
    HttpRequest.read() and again in HttpRequest.body.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__
    return False


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """Render any DRF exception, and Django's 404, in the proxy's error envelope."""
    if isinstance(exc, DATABASE_OUTAGES):
        # The client gets only the error code, so the log keeps the driver's
        # message and the traceback.
        logger.error(
            "Database call failed with %s; responding 503 database_unavailable.",
            type(exc).__name__,
            exc_info=exc,
        )
    elif isinstance(exc, UnreadablePostError) and not _caused_by_timeout(exc):
        logger.info("Reading the request body failed: %s", exc)
    exc = as_api_exception(exc)
    if exc is None:
        return None
    body, headers = envelope_for(exc)
    status_code = exc.status_code
    if isinstance(exc, _AUTH_FAILURES) and status_code == status.HTTP_401_UNAUTHORIZED:
        # DRF responds with 401 only when the authenticator names a WWW-Authenticate
        # scheme; it sets that header itself.
        headers["WWW-Authenticate"] = getattr(exc, "auth_header", None) or "Bearer"
    response = Response(body, status=status_code, headers=headers)
    set_rollback()
    return response
