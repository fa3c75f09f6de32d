"""A fast fake OpenAI-compatible upstream for benchmarks, on asyncio.

One process keeps thousands of requests open, where the test suite's threaded
fake upstream needs a thread per request. The model name in the request
chooses the behaviour, so one server serves every benchmark:

- ``bench-instant`` (or any other name): a chat completion at once.
- ``bench-delay-<ms>``: the same completion after <ms> milliseconds.
- ``bench-stream-<count>x<ms>``: with ``"stream": true``, <count> content
  chunks <ms> milliseconds apart, then the finish chunk, the usage chunk when
  ``stream_options.include_usage`` is set, and ``data: [DONE]``.

``GET /stats`` returns the delayed calls in flight now and the most in flight
at once since the last ``GET /stats``, which starts a new count.

Run it alone with ``python bench/upstream.py --port 9200``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

_STREAM_MODEL = re.compile(r"^bench-stream-(\d+)x(\d+)$")
_DELAY_MODEL = re.compile(r"^bench-delay-(\d+)$")
# Largest request head or body, in bytes, the server reads before giving up.
MAX_REQUEST_BYTES = 1_048_576
USAGE = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


class _InFlight:
    """Delayed calls waiting now, and the most that waited at once."""

    now = 0
    peak = 0


def _completion(model: str) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "bench reply"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    return json.dumps(body).encode()


def _chunk(model: str, delta: dict, finish_reason: str | None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _usage_chunk(model: str) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": USAGE,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class UpstreamProtocol(asyncio.Protocol):
    """Serve HTTP/1.1 keep-alive requests on one connection, one at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 2 * MAX_REQUEST_BYTES:
            self.transport.close()
            return
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        body_end = head_end + 4 + length
        if len(self.buffer) < body_end:
            return
        body = self.buffer[head_end + 4 : body_end]
        self.buffer = self.buffer[body_end:]
        method, path, _ = request_line.split(" ", 2)
        self.busy = True
        asyncio.get_running_loop().create_task(self._respond(method, path, body))

    async def _respond(self, method: str, path: str, body: bytes) -> None:
        try:
            if method == "POST" and path.endswith("/chat/completions"):
                await self._chat(json.loads(body or b"{}"))
            elif method == "GET" and path == "/stats":
                stats = {"in_flight": _InFlight.now, "peak_in_flight": _InFlight.peak}
                _InFlight.peak = _InFlight.now
                self._send(200, json.dumps(stats).encode())
            elif method == "GET" and path in ("/health", "/v1/models"):
                self._send(200, b'{"object": "list", "data": []}')
            else:
                self._send(404, b'{"error": {"message": "not found"}}')
        except (ConnectionError, AttributeError):
            return  # The client went away; AttributeError: transport is None.
        self.busy = False
        if self.transport is not None and self.buffer:
            self._next_request()

    async def _chat(self, request: dict) -> None:
        model = str(request.get("model", "bench-instant"))
        stream = _STREAM_MODEL.match(model)
        if request.get("stream") and stream:
            count, spacing_ms = int(stream[1]), int(stream[2])
            include_usage = bool(
                (request.get("stream_options") or {}).get("include_usage")
            )
            await self._stream(model, count, spacing_ms / 1000, include_usage)
            return
        delay = _DELAY_MODEL.match(model)
        if delay:
            _InFlight.now += 1
            _InFlight.peak = max(_InFlight.peak, _InFlight.now)
            try:
                await asyncio.sleep(int(delay[1]) / 1000)
            finally:
                _InFlight.now -= 1
        self._send(200, _completion(model))

    async def _stream(
        self, model: str, count: int, spacing: float, include_usage: bool
    ) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for index in range(count):
            if index:
                await asyncio.sleep(spacing)
            delta = {"content": f"t{index} "}
            if index == 0:
                delta["role"] = "assistant"
            self.transport.write(_http_chunk(_chunk(model, delta, None)))
        tail = _chunk(model, {}, "stop")
        if include_usage:
            tail += _usage_chunk(model)
        tail += b"data: [DONE]\n\n"
        self.transport.write(_http_chunk(tail) + b"0\r\n\r\n")

    def _send(self, status: int, body: bytes) -> None:
        reason = {200: "OK", 404: "Not Found"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body)
        )


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    server = await asyncio.get_running_loop().create_server(
        UpstreamProtocol, host, port, backlog=4096, reuse_address=True
    )
    async with server:
        if ready is not None:
            ready.set()
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=9200, help="Port to listen on.")
    arguments = parser.parse_args()
    try:
        asyncio.run(serve(arguments.host, arguments.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
