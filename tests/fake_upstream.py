"""Fake OpenAI-compatible upstream: a real HTTP server on a loopback port.

The proxy's tests point the official ``openai`` client, or the proxy itself, at
``FakeUpstream.base_url``. Developers can run it by hand as a local stand-in upstream
with ``python -m tests.fake_upstream --port 9100``.

Replies are deterministic so that tests can check them:

- A chat completion replies ``"echo: " + <text of the last user message>``.
- ``prompt_tokens`` is the number of whitespace-separated words in all message
  contents (at least 1), and ``completion_tokens`` is the number of words in the reply.
- An embedding has 8 floats (or ``dimensions`` floats) taken from a SHA-256 digest of
  its input, each a multiple of 1/128 so that the float and base64 formats agree. Its
  ``prompt_tokens`` is the number of words in all inputs (at least 1), counting each
  token id of a token array as one word.

Tests script failures with ``FakeUpstream.queue(Behaviour(...))``. Each queued
behaviour applies to one request, first in first out, whatever its endpoint.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import http.server
import json
import logging
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# Every scripted error message contains this marker, so tests can assert that the
# proxy never forwards upstream error details to its clients.
INTERNAL_DETAIL = "upstream-internal-detail"

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 3072  # the output size of text-embedding-3-large
MODEL_CREATED = 1_700_000_000  # fixed Unix time reported as every model's "created"


@dataclass(frozen=True)
class Behaviour:
    """One scripted reply. Fields left at their defaults keep the normal reply.

    When ``status`` or ``body`` is set, the reply is that status (200 if unset) with
    that body in place of the endpoint's reply. ``body`` may be any JSON value except
    null, or bytes that are sent as they are with a JSON content type (for garbage
    replies). Without ``body``, the reply is an OpenAI error envelope whose message
    contains INTERNAL_DETAIL.
    """

    status: int | None = None
    body: object = None
    # Extra response headers, such as {"retry-after": "7"}, sent with any reply.
    # A name that matches a default header (case-insensitively) replaces it.
    headers: Mapping[str, str] = field(default_factory=dict)
    # Seconds to wait before replying. stop() cuts the wait short and closes the
    # connection without a response.
    delay: float = 0.0
    # Close the connection without sending any response.
    close_connection: bool = False
    # Chat reply text in place of the echo.
    reply_text: str | None = None
    # Usage object sent as given in place of the computed one.
    usage: Mapping[str, int] | None = None
    # Leave usage out of a chat completion and out of a stream's usage chunk.
    omit_usage: bool = False
    # Streams only: close the connection after this many "data:" events, without
    # ending the chunked body. Content chunks come first, so a count below the number
    # of words in the reply cuts the reply short.
    drop_after_chunks: int | None = None
    # Streams only: after this many "data:" events, wait stall_seconds, then go on.
    stall_after_chunks: int | None = None
    stall_seconds: float = 0.0
    # Streams only: the events to send in place of the reply's chunks, each after
    # "data: " (a str as it is, anything else as JSON), then "data: [DONE]".
    # Drops and stalls count these events.
    events: Sequence[object] | None = None
    # Streams only: this many bytes of comment lines after "data: [DONE]", in
    # chunks of 1 KiB, before the body ends.
    trailing_bytes: int = 0

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be 100-599, got {self.status}")
        for name in (
            "delay",
            "stall_seconds",
            "drop_after_chunks",
            "stall_after_chunks",
            "trailing_bytes",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.close_connection and (self.status is not None or self.body is not None):
            raise ValueError("close_connection cannot be combined with status or body")
        if self.omit_usage and self.usage is not None:
            raise ValueError("omit_usage cannot be combined with usage")
        has_reply = self.status is not None or self.body is not None
        if self.events is not None and has_reply:
            raise ValueError("events cannot be combined with status or body")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake upstream received it."""

    method: str
    path: str  # including any query string
    headers: Message  # case-insensitive: headers["authorization"]
    body: bytes
    json: Any  # the parsed body, or None when it is not valid JSON


@dataclass(frozen=True)
class _Settings:
    chunk_delay: float
    models: tuple[str, ...]


# Error "type" and "code" that a scripted error envelope carries for a status.
_ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def _error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """Build an OpenAI-style error envelope."""
    return {
        "error": {"message": message, "type": error_type, "param": param, "code": code}
    }


def _scripted_error_body(status: int) -> dict[str, Any]:
    """Build the default body of a scripted error reply, containing INTERNAL_DETAIL."""
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    error_type, code = _ERROR_KINDS.get(status, (default_type, None))
    message = f"Scripted upstream failure with status {status} ({INTERNAL_DETAIL})."
    return _error_body(message, error_type, code)


def _count_words(text: str) -> int:
    return len(text.split())


def _message_text(message: object) -> str:
    """Return the text of a chat message, joining the text parts of a list content.

    The parts are joined with spaces. Non-text parts, such as images, are skipped.
    """
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part.get("text", "") for part in content if isinstance(part, dict)]
        return " ".join(part for part in parts if isinstance(part, str))
    return ""


def _chat_request_error(payload: object) -> str | None:
    """Return why a chat completion request is invalid, or None when it is valid."""
    if not isinstance(payload, dict):
        return "The request body must be a JSON object."
    if not isinstance(payload.get("model"), str):
        return "Missing required parameter: 'model'."
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return "Missing required parameter: 'messages'."
    return None


def _chat_reply_text(messages: list[object]) -> str:
    user_texts = [
        _message_text(message)
        for message in messages
        if isinstance(message, dict) and message.get("role") == "user"
    ]
    last = user_texts[-1] if user_texts else "(no user message)"
    return f"echo: {last}"


def _chat_usage(messages: list[object], reply_text: str) -> dict[str, int]:
    prompt_tokens = max(1, sum(_count_words(_message_text(m)) for m in messages))
    completion_tokens = _count_words(reply_text)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_completion(
    payload: dict[str, Any], behaviour: Behaviour, number: int
) -> dict[str, Any]:
    """Build the chat.completion object for a valid request.

    ``number`` is the request's position in the recordings, so ids are unique until
    reset().
    """
    text = behaviour.reply_text
    if text is None:
        text = _chat_reply_text(payload["messages"])
    completion: dict[str, Any] = {
        "id": f"chatcmpl-fake-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": payload["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    if not behaviour.omit_usage:
        usage = behaviour.usage
        if usage is None:
            usage = _chat_usage(payload["messages"], text)
        completion["usage"] = dict(usage)
    return completion


def _stream_events(
    completion: dict[str, Any], include_usage: bool, choices: int = 1
) -> list[bytes]:
    """Split a chat completion into server-sent events, ending with ``[DONE]``.

    Each word of the reply is one chat.completion.chunk, and the first chunk also
    carries the role. A chunk with finish_reason follows, then a usage-only chunk with
    empty choices if ``include_usage`` is true and the completion has usage. With
    ``choices`` above 1 the reply is streamed once per choice index, one after the
    other.
    """
    choice = completion["choices"][0]
    words = choice["message"]["content"].split(" ")
    pieces = [words[0], *(" " + word for word in words[1:])]
    base = {key: completion[key] for key in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"
    if include_usage:
        base["usage"] = None

    def chunk(
        index: int, delta: dict[str, str], finish_reason: str | None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None}
        return {**base, "choices": [{**choice, "finish_reason": finish_reason}]}

    chunks = []
    for index in range(choices):
        chunks.append(chunk(index, {"role": "assistant", "content": pieces[0]}, None))
        chunks += [chunk(index, {"content": piece}, None) for piece in pieces[1:]]
        chunks.append(chunk(index, {}, choice["finish_reason"]))
    if include_usage and "usage" in completion:
        chunks.append({**base, "choices": [], "usage": completion["usage"]})

    events = [b"data: " + json.dumps(item).encode() + b"\n\n" for item in chunks]
    return [*events, b"data: [DONE]\n\n"]


def _scripted_events(items: Sequence[object]) -> list[bytes]:
    """Encode scripted stream events as server-sent events, ending with ``[DONE]``."""
    events = []
    for item in items:
        data = item if isinstance(item, str) else json.dumps(item)
        events.append(b"data: " + data.encode() + b"\n\n")
    return [*events, b"data: [DONE]\n\n"]


def embedding_vector(key: str, dimensions: int) -> list[float]:
    """Derive a vector from ``key``. Its values are multiples of 1/128 in [-1, 1)."""
    digest = b""
    while len(digest) < dimensions:
        block = len(digest) // 32
        digest += hashlib.sha256(f"{block}:{key}".encode()).digest()
    return [(byte - 128) / 128 for byte in digest[:dimensions]]


def _embedding_inputs(value: object) -> list[tuple[str, int]] | None:
    """Return (key, token count) per input, or None when ``value`` is invalid.

    An input is a string or an array of token ids, and a request may send one input
    or a non-empty array of them.
    """
    if isinstance(value, str):
        return [(value, _count_words(value))]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(item, str) for item in value):
        return [(item, _count_words(item)) for item in value]
    if all(isinstance(item, int) for item in value):
        return [(json.dumps(value), len(value))]
    if all(isinstance(item, list) and item for item in value):
        return [(json.dumps(item), len(item)) for item in value]
    return None


def _embeddings_reply(payload: object) -> tuple[int, dict[str, Any]]:
    """Build the status and body that reply to an embeddings request."""
    payload = payload if isinstance(payload, dict) else {}
    inputs = _embedding_inputs(payload.get("input"))
    if inputs is None:
        message = "'input' must be a string, an array of strings or of token arrays."
        return 400, _error_body(message, "invalid_request_error", param="input")
    dimensions = payload.get("dimensions", EMBEDDING_DIMENSIONS)
    if type(dimensions) is not int or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
        message = (
            f"'dimensions' must be an integer from 1 to {MAX_EMBEDDING_DIMENSIONS}."
        )
        return 400, _error_body(message, "invalid_request_error", param="dimensions")

    use_base64 = payload.get("encoding_format") == "base64"
    data = [
        _embedding_object(index, key, dimensions, use_base64)
        for index, (key, _) in enumerate(inputs)
    ]
    tokens = max(1, sum(count for _, count in inputs))
    return 200, {
        "object": "list",
        "data": data,
        "model": payload.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _embedding_object(
    index: int, key: str, dimensions: int, use_base64: bool
) -> dict[str, Any]:
    vector = embedding_vector(key, dimensions)
    embedding: list[float] | str = vector
    if use_base64:  # little-endian float32, as the openai client decodes it
        packed = struct.pack(f"<{dimensions}f", *vector)
        embedding = base64.b64encode(packed).decode()
    return {"object": "embedding", "index": index, "embedding": embedding}


def _model_object(model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": "fake-upstream",
    }


def _merge_headers(
    defaults: dict[str, str], extra: Mapping[str, str]
) -> dict[str, str]:
    """Return ``defaults`` updated with ``extra``, matching names case-insensitively."""
    replaced = {name.lower() for name in extra}
    merged = {k: v for k, v in defaults.items() if k.lower() not in replaced}
    merged.update(extra)
    return merged


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every reply needs a body length
    server_version = "fake-openai-upstream"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Skip the per-request access log, so that test output stays clean."""

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "Invalid Content-Length or chunk size")
            self.close_connection = True
            return
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=self.headers,
            body=body,
            json=_parse_json(body),
        )
        upstream = self.server.upstream
        behaviour, settings, number = upstream._receive(request)
        try:
            self._reply(request, behaviour, settings, number)
        except ConnectionError as exc:  # the client went away, often on its timeout
            logger.debug("client %s disconnected: %r", self.client_address, exc)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked_body(self) -> bytes:
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # skip trailer fields
        return b"".join(parts)

    def _reply(
        self,
        request: RecordedRequest,
        behaviour: Behaviour,
        settings: _Settings,
        number: int,
    ) -> None:
        if behaviour.delay and not self.server.upstream._wait(behaviour.delay):
            self.close_connection = True
            return
        if behaviour.close_connection:
            self.close_connection = True
            return
        if behaviour.status is not None or behaviour.body is not None:
            status = behaviour.status or 200
            body = behaviour.body
            if body is None:
                body = _scripted_error_body(status)
            self._send_json(status, body, behaviour)
            return
        self._route(request, behaviour, settings, number)

    def _route(
        self,
        request: RecordedRequest,
        behaviour: Behaviour,
        settings: _Settings,
        number: int,
    ) -> None:
        method, path = request.method, urlsplit(request.path).path.rstrip("/")
        if (method, path) == ("POST", "/v1/chat/completions"):
            self._chat(request.json, behaviour, settings, number)
        elif (method, path) == ("POST", "/v1/embeddings"):
            self._send_json(*_embeddings_reply(request.json), behaviour)
        elif (method, path) == ("GET", "/v1/models"):
            body = {
                "object": "list",
                "data": [_model_object(m) for m in settings.models],
            }
            self._send_json(200, body, behaviour)
        elif method == "GET" and path.startswith("/v1/models/"):
            self._retrieve_model(path.removeprefix("/v1/models/"), behaviour, settings)
        else:
            message = f"Invalid URL ({method} {request.path})"
            self._send_json(
                404, _error_body(message, "invalid_request_error"), behaviour
            )

    def _chat(
        self, payload: Any, behaviour: Behaviour, settings: _Settings, number: int
    ) -> None:
        problem = _chat_request_error(payload)
        if problem is not None:
            body = _error_body(problem, "invalid_request_error")
            self._send_json(400, body, behaviour)
            return

        completion = _chat_completion(payload, behaviour, number)
        if payload.get("stream") is True:
            options = payload.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage")
            if behaviour.events is None:
                choices = payload.get("n")
                events = _stream_events(
                    completion,
                    include_usage is True,
                    choices if isinstance(choices, int) and choices > 1 else 1,
                )
            else:
                events = _scripted_events(behaviour.events)
            self._send_stream(events, behaviour, settings.chunk_delay)
        else:
            self._send_json(200, completion, behaviour)

    def _retrieve_model(
        self, model_id: str, behaviour: Behaviour, settings: _Settings
    ) -> None:
        if model_id in settings.models:
            self._send_json(200, _model_object(model_id), behaviour)
            return
        message = f"The model '{model_id}' does not exist."
        body = _error_body(message, "invalid_request_error", code="model_not_found")
        self._send_json(404, body, behaviour)

    def _send_json(self, status: int, body: object, behaviour: Behaviour) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self._send_head(
            status,
            {"Content-Type": "application/json", "Content-Length": str(len(data))},
            behaviour.headers,
        )
        self.wfile.write(data)

    def _send_stream(
        self, events: list[bytes], behaviour: Behaviour, chunk_delay: float
    ) -> None:
        """Send ``events`` as a chunked body, scripted drops and stalls included."""
        headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "Transfer-Encoding": "chunked",
        }
        self._send_head(200, headers, behaviour.headers)

        upstream = self.server.upstream
        trailer = b": padding\n" * (behaviour.trailing_bytes // 10)
        trailing = [
            trailer[start : start + 1024] for start in range(0, len(trailer), 1024)
        ]
        # The empty chunk ends the chunked body, so a drop after every event still
        # leaves the body incomplete for the client.
        for index, event in enumerate([*events, *trailing, b""]):
            if index == behaviour.drop_after_chunks:
                self.close_connection = True
                return
            pause = chunk_delay if 0 < index < len(events) else 0.0
            if index == behaviour.stall_after_chunks:
                pause += behaviour.stall_seconds
            if pause and not upstream._wait(pause):
                self.close_connection = True
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()

    def _send_head(
        self, status: int, defaults: dict[str, str], extra: Mapping[str, str]
    ) -> None:
        self.send_response(status)
        for name, value in _merge_headers(defaults, extra).items():
            self.send_header(name, value)
        self.end_headers()


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:  # includes UnicodeDecodeError
        return None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Room for many clients connecting at once, as in the concurrency tests.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.connections_accepted = 0
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn, a DNS lookup
        # that the fake upstream does not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
            self.connections_accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down open client connections, idle keep-alive ones included."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            logger.debug(
                "fake upstream connection from %s failed: %r", client_address, error
            )
        else:
            logger.exception(
                "fake upstream failed to handle a request from %s", client_address
            )


class FakeUpstream:
    """Fake OpenAI-compatible API server for tests and local development.

    Use it as a context manager, or call start() and stop(). Every request is recorded,
    and queued behaviours script the replies to the next requests.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        chunk_delay: float = 0.0,
        models: Sequence[str] = DEFAULT_MODELS,
    ) -> None:
        """Configure the server. Port 0 picks a free port when start() binds."""
        self._address = (host, port)
        self._settings = _Settings(chunk_delay=chunk_delay, models=tuple(models))
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._behaviours: deque[Behaviour] = deque()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeUpstream:
        """Bind the port and serve requests in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeUpstream is already running. Call stop() first.")
        self._stopping.clear()
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut pending delays short and close every connection."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """Port the server listens on. Raises RuntimeError before start()."""
        if self._server is None:
            raise RuntimeError("FakeUpstream is not running. Call start() first.")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """URL to pass as the openai client's ``base_url``, ending in ``/v1``."""
        return f"http://{self._address[0]}:{self.port}/v1"

    @property
    def connections_accepted(self) -> int:
        """Number of TCP connections accepted since start()."""
        if self._server is None:
            raise RuntimeError("FakeUpstream is not running. Call start() first.")
        return self._server.connections_accepted

    @property
    def requests(self) -> list[RecordedRequest]:
        """Copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def queue(self, behaviour: Behaviour, times: int = 1) -> None:
        """Queue ``behaviour`` for ``times`` requests, after the ones queued before."""
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        with self._lock:
            self._behaviours.extend([behaviour] * times)

    def set_default(
        self, *, chunk_delay: float | None = None, models: Sequence[str] | None = None
    ) -> None:
        """Change persistent settings. reset() keeps them.

        ``chunk_delay`` is the time in seconds between two stream events, and ``models``
        the ids that GET /v1/models lists.
        """
        changes: dict[str, Any] = {}
        if chunk_delay is not None:
            changes["chunk_delay"] = chunk_delay
        if models is not None:
            changes["models"] = tuple(models)
        with self._lock:
            self._settings = dataclasses.replace(self._settings, **changes)

    def reset(self) -> None:
        """Clear recorded requests and queued behaviours."""
        with self._lock:
            self._requests.clear()
            self._behaviours.clear()

    def _receive(self, request: RecordedRequest) -> tuple[Behaviour, _Settings, int]:
        """Record ``request`` and return its behaviour, the settings and its number."""
        with self._lock:
            self._requests.append(request)
            behaviour = self._behaviours.popleft() if self._behaviours else Behaviour()
            return behaviour, self._settings, len(self._requests)

    def _wait(self, seconds: float) -> bool:
        """Sleep for ``seconds``. Return False if stop() cut the sleep short."""
        return not self._stopping.wait(seconds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fake_upstream",
        description="Run a fake OpenAI-compatible API server for local development.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="IPv4 address to listen on (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, default=9100, help="port to listen on (default: 9100)"
    )
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        help="seconds between two events of a streamed reply (default: 0)",
    )
    args = parser.parse_args(argv)

    upstream = FakeUpstream(args.host, args.port, chunk_delay=args.chunk_delay)
    with upstream:
        print(
            f"Fake OpenAI upstream listening on {upstream.base_url}. It is a local "
            "stand-in with canned replies, not OpenAI. Press Ctrl-C to stop.",
            flush=True,
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
