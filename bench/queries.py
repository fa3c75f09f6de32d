"""List the SQL queries and Redis commands of one proxied chat completion.

Runs one request in this process through Django's test client, against the
upstream at OPENAI_BASE_URL, with the key given as the first argument. Each
SQL statement is timed from send to result; Redis commands are read
from MONITOR on the benchmark's Redis database. Prints JSON.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proxy_site.settings")

import django  # noqa: E402

django.setup()

import redis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.test import Client  # noqa: E402

# Requests run before the measured one, so that caches and connections are warm.
WARM_UP_REQUESTS = 3
_NUMBERS = re.compile(r"\b\d+(\.\d+)?\b")
_STRINGS = re.compile(r"'[^']*'")


def _shape(sql: str) -> str:
    """Return the statement with its literal values replaced by `?`."""
    return _NUMBERS.sub("?", _STRINGS.sub("?", sql))[:160]


class _SQLRecorder:
    def __init__(self) -> None:
        self.statements: list[dict] = []

    def __call__(self, execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            # A query may contain several statements (see execute_together).
            parts = [_shape(part) for part in sql.split("; ")]
            self.statements.append(
                {
                    "sql": "; ".join(parts),
                    "count": len(parts),
                    "ms": round(elapsed_ms, 3),
                }
            )


class _TransactionCounter:
    """Count outermost transaction.atomic blocks, each a BEGIN and a COMMIT."""

    def __init__(self) -> None:
        self.count = 0
        self._enter = transaction.Atomic.__enter__

    def __enter__(self) -> _TransactionCounter:
        counter = self
        original = self._enter

        def counting_enter(atomic):
            if not transaction.get_connection(atomic.using).in_atomic_block:
                counter.count += 1
            return original(atomic)

        transaction.Atomic.__enter__ = counting_enter
        return self

    def __exit__(self, *exc_info) -> None:
        transaction.Atomic.__enter__ = self._enter


def _monitor_redis(commands: list[str], stop: threading.Event) -> None:
    location = settings.CACHES["default"]["LOCATION"]
    database = int(location.rsplit("/", 1)[-1] or 0)
    client = redis.Redis.from_url(location)
    with client.monitor() as monitor:
        listening = monitor.listen()
        while not stop.is_set():
            try:
                event = next(listening)
            except (redis.RedisError, StopIteration):
                return
            if event.get("db") == database and "MONITOR" not in event["command"]:
                name = event["command"].split(" ")[0].upper()
                # MONITOR also lists the commands a Lua script runs; they are
                # part of the script's round trip, so they are marked.
                if event.get("client_type") == "lua":
                    name = f"({name} in the script)"
                commands.append(name)


def measure(raw_key: str, model: str) -> dict:
    """Send one chat completion and return its SQL statements and Redis commands."""
    client = Client(HTTP_HOST="127.0.0.1")
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Say hello"}]}
    )
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}

    def send() -> int:
        response = client.post(
            "/v1/chat/completions", body, content_type="application/json", **headers
        )
        return response.status_code

    for _ in range(WARM_UP_REQUESTS):
        send()
    recorder = _SQLRecorder()
    commands: list[str] = []
    stop = threading.Event()
    monitor = threading.Thread(target=_monitor_redis, args=(commands, stop))
    monitor.start()
    time.sleep(0.3)
    transactions = _TransactionCounter()
    started = time.perf_counter()
    with connection.execute_wrapper(recorder), transactions:
        status = send()
    elapsed_ms = (time.perf_counter() - started) * 1000
    time.sleep(0.3)
    stop.set()
    # MONITOR blocks until the next command arrives; send one to end it.
    redis.Redis.from_url(settings.CACHES["default"]["LOCATION"]).ping()
    monitor.join(timeout=5)
    return {
        "status": status,
        "request_ms": round(elapsed_ms, 2),
        "sql": recorder.statements,
        "transactions": transactions.count,
        "redis": commands,
    }


if __name__ == "__main__":
    print(
        json.dumps(
            measure(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "bench-instant"),
            indent=1,
        )
    )
