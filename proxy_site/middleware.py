"""Request ids, the access log line of each request, and its request metrics."""

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase

from . import metrics

logger = logging.getLogger("proxy.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own id is kept only when it is short and cannot break a log line.
# It must match whole (fullmatch): `$` would also accept a trailing newline.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Error codes are snake_case words, and nothing else found in an error body
# becomes a metric label. Used with fullmatch, like _SANE_REQUEST_ID.
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Longest path written to a log line, in characters.
_MAX_LOGGED_PATH = 256
# Error bodies larger than this, in bytes, are not parsed for their code.
_MAX_ERROR_BODY = 8192

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
key_prefix_var: ContextVar[str] = ContextVar("key_prefix", default="-")


@dataclass
class RequestLog:
    """Facts about one request, beyond its response, for the access line and metrics.

    The middleware creates one per request. A UsageTracker attaches its usage
    record, which contains the tier, model, tokens, status and error code.
    """

    started: float
    # A generation.models.UsageRecord, typed loosely so that proxy_site does
    # not import the generation app.
    usage_record: Any = None


request_log_var: ContextVar[RequestLog | None] = ContextVar("request_log", default=None)


def current_request_id() -> str:
    return request_id_var.get()


def current_request_log() -> RequestLog | None:
    """Return the current request's RequestLog, or None outside a request."""
    return request_log_var.get()


class RequestIDLogFilter(logging.Filter):
    """Add the current request id and key prefix to every log record.

    They become the record's `request_id` and `key_prefix`, `-` outside a
    request or before authentication.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.key_prefix = key_prefix_var.get()
        return True


class HandledErrorLogFilter(logging.Filter):
    """Drop Django's "Bad Gateway" lines for errors the proxy already logged.

    Django logs every 5xx response on `django.request`. A 5xx that the proxy
    built from an upstream failure was already logged where it was caught,
    with the request id. Only responses from an uncaught exception (with a
    traceback) are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is not None or getattr(record, "status_code", 500) == 500


class _ClosingStream:
    """Streaming content that runs a callback once, when Django closes the response.

    Django calls every closer of a response in order, so the callback runs
    after the closers that were registered before it, such as the stream
    relay's, which settles the request's usage.
    """

    def __init__(self, content: Iterator[bytes], on_close: Callable[[], None]):
        self._content = content
        self._on_close = on_close
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._content)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_close()


class RequestIDMiddleware:
    """Give each request an id, send it back, log the request and count it.

    Each request gets one `request` line on the `proxy.access` logger when it
    finishes. An event stream finishes when it ends, so its line has the final
    tokens and error code, and it also gets a `stream started` line when the
    response begins.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        if _SANE_REQUEST_ID.fullmatch(incoming):
            request_id = incoming
        else:
            request_id = uuid.uuid4().hex
        request.request_id = request_id
        request_log = RequestLog(started=time.perf_counter())
        id_token = request_id_var.set(request_id)
        prefix_token = key_prefix_var.set("-")
        log_token = request_log_var.set(request_log)
        streaming = False
        try:
            response = self.get_response(request)
            response[REQUEST_ID_HEADER] = request_id
            streaming = _is_event_stream(response)
            if streaming:
                self._finish_at_close(request, response, request_log)
            else:
                _finish(request, response, request_log)
            return response
        finally:
            if not streaming:
                request_log_var.reset(log_token)
                key_prefix_var.reset(prefix_token)
                request_id_var.reset(id_token)

    def _finish_at_close(
        self, request: HttpRequest, response: HttpResponseBase, request_log: RequestLog
    ) -> None:
        # The context variables stay set until the stream closes, so that the
        # lines written while it streams carry the request id and key prefix.
        # The server iterates and closes the response in the same context.
        _log_access("stream started", request, response, request_log)

        def finish() -> None:
            try:
                _finish(request, response, request_log)
            finally:
                request_log_var.set(None)
                key_prefix_var.set("-")
                request_id_var.set("-")

        response.streaming_content = _ClosingStream(response.streaming_content, finish)


def _is_event_stream(response: HttpResponseBase) -> bool:
    """Return whether the response is server-sent events from a sync iterator.

    Other streamed responses, such as static files, and async streams, which
    only ASGI serves and no proxy view returns, are logged when they start.
    """
    return (
        response.streaming
        and not getattr(response, "is_async", False)
        and response.get("Content-Type", "").startswith("text/event-stream")
    )


def _finish(
    request: HttpRequest, response: HttpResponseBase, request_log: RequestLog
) -> None:
    """Write the request's access line and count it in the metrics."""
    fields = _log_access("request", request, response, request_log)
    if fields is None:
        return
    metrics.observe_request(
        route=fields["route"],
        status=response.status_code,
        tier=fields["tier"],
        outcome=_outcome(response, request_log),
        reason=fields["reason"],
        prompt_tokens=fields["prompt_tokens"] or 0,
        completion_tokens=fields["completion_tokens"] or 0,
    )


def _log_access(
    message: str,
    request: HttpRequest,
    response: HttpResponseBase,
    request_log: RequestLog,
) -> dict | None:
    """Write one access line and return its fields, or None if they failed.

    A failure is logged and does not change the response, which is ready.
    """
    # The fields read the usage record, whose tier may need a database query,
    # so the database's errors can occur here.
    try:
        fields = _access_fields(request, response, request_log)
    except Exception:
        logger.exception("Collecting the access line's fields failed.")
        return None
    logger.info(message, extra={"fields": fields})
    return fields


def _access_fields(
    request: HttpRequest, response: HttpResponseBase, request_log: RequestLog
) -> dict:
    """Return the access line's fields, with None for an unknown or unused value.

    Never a key, a key's hash, a request header or prompt text: only the
    key's public prefix and what the usage record counts.
    """
    record = request_log.usage_record
    elapsed_ms = (time.perf_counter() - request_log.started) * 1000
    prefix = key_prefix_var.get()
    fields = {
        "method": request.method,
        "path": request.path[:_MAX_LOGGED_PATH],
        "route": metrics.route_label(request),
        "status": response.status_code,
        "latency_ms": round(elapsed_ms, 1),
        "key": None if prefix == "-" else prefix,
        "tier": None,
        "model": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "reason": _error_code(response),
    }
    if record is not None:
        settled = record.settled_at is not None
        fields["tier"] = record.tier.name
        fields["model"] = record.model or None
        fields["prompt_tokens"] = record.prompt_tokens if settled else None
        fields["completion_tokens"] = record.completion_tokens if settled else None
        fields["reason"] = record.reason or fields["reason"]
    return fields


def _outcome(response: HttpResponseBase, request_log: RequestLog) -> str | None:
    """Return `refused`, `failed` or None (succeeded), as the usage record has it.

    A request without a usage record (a bad key, an unknown URL) never reached
    the upstream, so an error response to it is a refusal.
    """
    record = request_log.usage_record
    if record is not None and record.status in ("refused", "failed"):
        return record.status
    if response.status_code >= 400:
        return "refused"
    return None


def _error_code(response: HttpResponseBase) -> str | None:
    """Return the `code` of an error response's JSON body, if it has one."""
    if response.status_code < 400 or response.streaming:
        return None
    data = getattr(response, "data", None)
    if data is None and response.get("Content-Type", "").startswith("application/json"):
        content = response.content
        if len(content) <= _MAX_ERROR_BODY:
            try:
                data = json.loads(content)
            except ValueError:
                data = None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and _ERROR_CODE.fullmatch(code):
        return code
    return "unknown"
