"""A time limit on each wait for the request body, under gunicorn."""

import socket
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

# The client socket that gunicorn puts in every request's WSGI environ.
GUNICORN_SOCKET = "gunicorn.socket"


class RequestBodyTimeoutMiddleware:
    """Bound each wait for the next part of a request body.

    gunicorn's gthread worker reads the body in the request's thread with no
    time limit. A client that sends its headers and then stalls keeps that
    thread busy for as long as the connection stays open, so enough such
    clients stop the worker from serving anyone else. With this middleware,
    a read that waits longer than PROXY_REQUEST_BODY_TIMEOUT raises
    TimeoutError, which Django raises again as UnreadablePostError, and the
    API responds with 408.

    NOTE: The limit applies to each read, not to the whole body. A client
    that sends a few bytes within every period can still occupy a thread
    until its body is complete or over PROXY_MAX_REQUEST_BYTES. Under other servers,
    which put no socket in the environ, the middleware does nothing.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        client = request.META.get(GUNICORN_SOCKET)
        if not isinstance(client, socket.socket) or not _has_body(request):
            return self.get_response(request)

        previous = client.gettimeout()
        client.settimeout(settings.PROXY_REQUEST_BODY_TIMEOUT)
        try:
            return self.get_response(request)
        finally:
            # A streamed response is written after this returns, so its
            # writes wait on a slow reader as they did without the limit.
            client.settimeout(previous)


def _has_body(request: HttpRequest) -> bool:
    length = request.META.get("CONTENT_LENGTH") or ""
    return length.isdigit() and int(length) > 0
