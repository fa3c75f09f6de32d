"""An asyncio load generator: keep-alive HTTP/1.1 clients on raw sockets.

Each client keeps one connection and sends its requests one after another,
so N clients keep N requests in flight. Every run stops at a request count or
a deadline, whichever comes first, and each request has its own timeout.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

# Seconds one request may take before it counts as an error.
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible chat completions endpoint on the loopback interface."""

    name: str
    host: str
    port: int
    path: str
    # Authorization header values; client i uses keys[i % len(keys)].
    keys: tuple[str, ...] = ("",)

    def request(self, client: int, body: bytes) -> bytes:
        key = self.keys[client % len(self.keys)]
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body


def chat_body(model: str, stream: bool = False) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark"}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class Response:
    status: int
    body: bytes
    # Arrival time (perf_counter) of each server-sent event with content.
    event_times: list[float] = field(default_factory=list)
    events: int = 0


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict, response: Response):
    if "content-length" in headers:
        response.body = await reader.readexactly(int(headers["content-length"]))
        return
    if "chunked" not in headers.get("transfer-encoding", ""):
        response.body = await reader.read()
        return
    pending = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        pending += data[:-2]
        now = time.perf_counter()
        # Count whole server-sent events, whatever the chunking.
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            if event.startswith(b"data:") and b'"content"' in event:
                response.event_times.append(now)
            if event.startswith(b"data:"):
                response.events += 1
        response.body += data[:-2] if len(response.body) < 65536 else b""


async def send(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> Response:
    writer.write(request)
    await writer.drain()
    status, headers = await _read_head(reader)
    response = Response(status=status, body=b"")
    await _read_body(reader, headers, response)
    return response


@dataclass
class RunResult:
    """Measurements of one load run: latencies of successes, statuses and errors."""

    clients: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    first_event: list[float] = field(default_factory=list)
    event_counts: list[int] = field(default_factory=list)
    event_gaps: list[float] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        ok = self.statuses.get(200, 0)
        return sum(self.statuses.values()) - ok + sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed if self.elapsed else 0.0

    def percentile(self, values: list[float], fraction: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def p50(self) -> float:
        return self.percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return self.percentile(self.latencies, 0.99)

    @property
    def mean_gap(self) -> float:
        return statistics.fmean(self.event_gaps) if self.event_gaps else float("nan")


async def _client(
    index: int,
    target: Target,
    body: bytes,
    result: RunResult,
    deadline: float,
    budget: list[int],
    start_delay: float,
) -> None:
    request = target.request(index, body)
    reader = writer = None
    await asyncio.sleep(start_delay)
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(target.host, target.port)
            started = time.perf_counter()
            response = await asyncio.wait_for(
                send(reader, writer, request), REQUEST_TIMEOUT
            )
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            result.errors[type(exc).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)
            continue
        finished = time.perf_counter()
        result.statuses[response.status] += 1
        if response.status != 200:
            continue
        result.latencies.append(finished - started)
        if response.event_times:
            result.first_event.append(response.event_times[0] - started)
            result.event_counts.append(len(response.event_times))
            times = response.event_times
            gaps = zip(times, times[1:], strict=False)
            result.event_gaps.extend(later - earlier for earlier, later in gaps)
    if writer is not None:
        writer.close()


async def run(
    target: Target,
    body: bytes,
    *,
    clients: int,
    seconds: float,
    max_requests: int = 1_000_000,
    ramp: float = 0.0,
) -> RunResult:
    """Run `clients` clients until `seconds` pass or `max_requests` are sent.

    Requests in flight at the deadline finish (each within REQUEST_TIMEOUT);
    the rate divides the successes by the time until the last one finished.
    With `ramp`, the clients start evenly spread over that many seconds
    instead of all at once.
    """
    result = RunResult(clients=clients, elapsed=0.0)
    started = time.perf_counter()
    deadline = started + seconds
    budget = [max_requests]
    tasks = [
        _client(index, target, body, result, deadline, budget, ramp * index / clients)
        for index in range(clients)
    ]
    await asyncio.gather(*tasks)
    result.elapsed = time.perf_counter() - started
    return result


def run_sync(target: Target, body: bytes, **options) -> RunResult:
    return asyncio.run(run(target, body, **options))
