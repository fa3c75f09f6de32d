"""The process-wide openai client, and the map from its errors to API errors."""

import datetime
import email.utils
import json
import logging
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
import openai
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from proxy_site.errors import (
    ProxyError,
    UnencodableRequestBody,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamRateLimited,
    UpstreamRejectedRequest,
    UpstreamTimeout,
)

logger = logging.getLogger(__name__)

_client: openai.OpenAI | None = None
_client_lock = threading.Lock()
_CLIENT_SETTINGS = {
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "PROXY_UPSTREAM_TIMEOUT",
    "PROXY_UPSTREAM_MAX_RETRIES",
}
# Anything shaped like an API key, such as the masked key that OpenAI quotes
# back in a 401 message, is cut from upstream text before it is logged.
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9*_\-]{4,}")
# The client's default keeps 100 idle connections and closes the rest, but a
# worker runs up to one call per thread, hundreds at once: keep them all, so
# that calls after a busy moment need no new connection.
UPSTREAM_CONNECTION_LIMITS = httpx2.Limits(
    max_connections=1000, max_keepalive_connections=1000
)
# Used when a rate-limited upstream sends no Retry-After of its own.
DEFAULT_UPSTREAM_RETRY_AFTER = 1.0
# The maximum upstream Retry-After passed on, in seconds. A longer one (or a
# garbled huge number) would have clients wait far past any real reset, so
# they are told to try again in an hour, when the upstream can say more.
MAX_UPSTREAM_RETRY_AFTER = 3600.0


def get_client() -> openai.OpenAI:
    """Return the process's openai client, creating it on first use."""
    global _client
    if _client is not None:
        return _client
    with _client_lock:
        if _client is None:
            if not settings.OPENAI_API_KEY:
                logger.error(
                    "OPENAI_API_KEY is not set; the upstream cannot be called."
                )
                raise UpstreamMisconfigured()
            _client = openai.OpenAI(
                api_key=settings.OPENAI_API_KEY,
                base_url=settings.OPENAI_BASE_URL,
                timeout=settings.PROXY_UPSTREAM_TIMEOUT,
                max_retries=settings.PROXY_UPSTREAM_MAX_RETRIES,
                http_client=openai.DefaultHttpxClient(
                    limits=UPSTREAM_CONNECTION_LIMITS
                ),
            )
        return _client


def post_json(path: str, body: dict, *, stream: bool = False) -> httpx2.Response:
    """POST a JSON body to the upstream API with the openai client; return the reply.

    The client supplies the base URL, the upstream key, timeouts, retries
    and its error classes, which upstream_errors() maps. The per-resource
    methods (client.chat.completions.create and the like) would also walk
    every parameter through their type transform. The proxy's bodies are
    validated already and contain only JSON values, so that walk is skipped.
    The body is encoded here, so that a value JSON cannot represent raises
    UnencodableRequestBody (400), not an error about the upstream's reply.
    With `stream`, the body is left unread for the caller to iterate and close.
    """
    content = encode_json_body(body)
    return get_client().post(
        path, cast_to=httpx2.Response, content=content, stream=stream
    )


def encode_json_body(body: dict) -> bytes:
    """Encode a request body as UTF-8 JSON, as the openai client would.

    Raises UnencodableRequestBody for an infinite or NaN number, or a string
    with a lone surrogate. Request validation rejects both before this
    point, so this check is a second line of defence.
    """
    try:
        text = json.dumps(
            body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
        return text.encode()
    except ValueError as exc:  # UnicodeEncodeError is a ValueError too.
        logger.warning(
            "The request body could not be encoded as JSON: %s", type(exc).__name__
        )
        raise UnencodableRequestBody() from exc


def reset_client() -> None:
    """Drop the client so the next call builds one from the current settings."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = None


@receiver(setting_changed)
def _reset_client_on_setting_change(setting: str, **kwargs) -> None:
    if setting in _CLIENT_SETTINGS:
        reset_client()


def redact(text: str) -> str:
    if settings.OPENAI_API_KEY:
        text = text.replace(settings.OPENAI_API_KEY, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)


def _retry_after(exc: openai.APIStatusError) -> float:
    """Return the upstream's wait in seconds, or the default for a missing,
    unreadable, non-finite or non-positive header."""
    headers = exc.response.headers
    try:
        if "retry-after-ms" in headers:
            seconds = float(headers["retry-after-ms"]) / 1000
        elif "retry-after" in headers:
            seconds = _seconds_from_retry_after(headers["retry-after"])
        else:
            return DEFAULT_UPSTREAM_RETRY_AFTER
    except ValueError:
        return DEFAULT_UPSTREAM_RETRY_AFTER
    if not math.isfinite(seconds) or seconds <= 0:
        return DEFAULT_UPSTREAM_RETRY_AFTER
    return min(seconds, MAX_UPSTREAM_RETRY_AFTER)


def _seconds_from_retry_after(value: str) -> float:
    """Return the seconds that a Retry-After value (a number or an HTTP date) gives.

    Raises ValueError when it is neither.
    """
    try:
        return float(value)
    except ValueError:
        moment = email.utils.parsedate_to_datetime(value)
    if moment.tzinfo is None:
        # RFC 9110 dates are in GMT; a date without a zone is read as UTC.
        moment = moment.replace(tzinfo=datetime.UTC)
    return (moment - datetime.datetime.now(datetime.UTC)).total_seconds()


def _is_quota_exhausted(exc: openai.RateLimitError) -> bool:
    """Return whether a 429 means the upstream account has no quota or credit.

    OpenAI sends such a 429 with the error code and type `insufficient_quota`.
    Unlike a rate limit, it does not end by waiting.
    """
    return "insufficient_quota" in (exc.code, exc.type)


def translate_error(exc: openai.OpenAIError) -> ProxyError:
    """Map an openai exception to the API error the client receives.

    The upstream's own message, host and key stay in the proxy's log (the
    message) or nowhere (host and key); the client gets a fixed sentence.
    """
    if isinstance(exc, openai.APITimeoutError):
        logger.warning("Upstream timed out.")
        return UpstreamTimeout()
    if isinstance(exc, openai.APIConnectionError):
        logger.warning("Upstream connection failed: %s", type(exc.__cause__).__name__)
        return UpstreamError()
    if not isinstance(exc, openai.APIStatusError):
        logger.error("Upstream response could not be read: %s", type(exc).__name__)
        return UpstreamError()
    status = exc.status_code
    upstream_id = exc.request_id or "-"
    if isinstance(exc, openai.RateLimitError) and _is_quota_exhausted(exc):
        logger.error(
            "Upstream rejected the request because the proxy's upstream account "
            "has no quota or credit left (upstream id %s): %s. Add credit or raise "
            "the account's limits. Retrying will not help.",
            upstream_id,
            redact(exc.message),
        )
        return UpstreamMisconfigured()
    if isinstance(exc, openai.RateLimitError):
        logger.warning("Upstream rate-limited the proxy (upstream id %s).", upstream_id)
        return UpstreamRateLimited(retry_after=_retry_after(exc))
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        logger.error(
            "Upstream rejected the proxy's credentials with %s (upstream id %s): %s",
            status,
            upstream_id,
            redact(exc.message),
        )
        return UpstreamMisconfigured()
    if 400 <= status < 500:
        logger.info(
            "Upstream rejected the request with %s (upstream id %s): %s",
            status,
            upstream_id,
            redact(exc.message),
        )
        return UpstreamRejectedRequest()
    logger.warning("Upstream failed with %s (upstream id %s).", status, upstream_id)
    return UpstreamError()


@contextmanager
def upstream_errors() -> Iterator[None]:
    """Turn any failure of an upstream call inside the block into a ProxyError."""
    try:
        yield
    except openai.OpenAIError as exc:
        raise translate_error(exc) from exc
    except (ValueError, RecursionError) as exc:
        # The openai client raises JSONDecodeError or pydantic's ValidationError,
        # both ValueErrors, for a 200 reply whose body is not a valid completion,
        # and RecursionError for one nested too deeply to parse.
        logger.error("Upstream reply could not be parsed: %s", type(exc).__name__)
        raise UpstreamError() from exc
