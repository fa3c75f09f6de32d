"""Request ids: accepted or generated, returned as a header, added to log lines."""

import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar

from django.http import HttpRequest, HttpResponse

logger = logging.getLogger("proxy.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own id is kept only when it is short and cannot break a log line.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
key_prefix_var: ContextVar[str] = ContextVar("key_prefix", default="-")


def current_request_id() -> str:
    return request_id_var.get()


class RequestIDLogFilter(logging.Filter):
    """Add the current request id to every log record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class HandledErrorLogFilter(logging.Filter):
    """Drop Django's "Bad Gateway" lines for errors the proxy already logged.

    Django logs every 5xx response on `django.request`. A 5xx that the proxy
    built from an upstream failure was logged where it was caught, with the
    request id; only responses from an uncaught exception (with a traceback)
    are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is not None or getattr(record, "status_code", 500) == 500


class RequestIDMiddleware:
    """Give each request an id, send it back, and write one access log line."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        if _SANE_REQUEST_ID.match(incoming):
            request_id = incoming
        else:
            request_id = uuid.uuid4().hex
        request.request_id = request_id
        id_token = request_id_var.set(request_id)
        prefix_token = key_prefix_var.set("-")
        started = time.perf_counter()
        try:
            response = self.get_response(request)
            response[REQUEST_ID_HEADER] = request_id
            logger.info(
                "%s %s %s %.1fms key=%s",
                request.method,
                request.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
                key_prefix_var.get(),
            )
            return response
        finally:
            key_prefix_var.reset(prefix_token)
            request_id_var.reset(id_token)
