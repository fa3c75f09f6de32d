"""Exit non-zero unless PostgreSQL and Redis respond at the given URLs.

Usage: check_services.py POSTGRES_URL REDIS_URL
"""

import sys
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis


def check_postgres(url: str) -> str | None:
    # Connect to the server's maintenance database: the test database named in
    # the URL is created by the test run itself.
    server_url = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    try:
        with psycopg.connect(server_url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {server_url} is not reachable: {exc}"
    return None


def check_redis(url: str) -> str | None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        return f"Redis at {url} is not reachable: {exc}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    failures = [msg for msg in (check_postgres(argv[1]), check_redis(argv[2])) if msg]
    for message in failures:
        print(f"error: {message}", file=sys.stderr)
    if failures:
        return 1
    print("PostgreSQL and Redis are reachable.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
