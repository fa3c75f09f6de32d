"""The shared Redis cache backend: one client per process, blocking when busy."""

import os
import threading

import pytest
from django.conf import settings

from proxy_site.cache import SharedRedisCache


@pytest.fixture
def redis_location() -> str:
    """The test run's Redis URL; skip (or fail, when services are required)."""
    cache = settings.CACHES["default"]
    if cache["BACKEND"] == "proxy_site.cache.SharedRedisCache":
        return cache["LOCATION"]
    reason = f"Needs CACHE_URL=redis://..., but the cache is {cache['BACKEND']}."
    if os.environ.get("PROXY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} PROXY_REQUIRE_SERVICES=1 forbids skipping.")
    pytest.skip(reason)


def run_in_threads(count: int, work) -> list:
    results: list = [None] * count
    errors: list = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[index] = work(index)
        except Exception as exc:  # noqa: BLE001  (reported by the test)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    return results


def test_threads_share_one_client(redis_location):
    # Django builds one backend object per thread, and all must use one client.
    def client_of(index: int) -> int:
        return id(SharedRedisCache(redis_location, {})._cache)

    assert len(set(run_in_threads(8, client_of))) == 1


def test_busy_pool_waits_instead_of_failing(redis_location):
    cache = SharedRedisCache(redis_location, {"OPTIONS": {"max_connections": 2}})
    key = "proxy:test:busy-pool"
    cache.set(key, 0)

    def increment(index: int) -> int:
        return sum(cache.incr(key) for _ in range(5))

    run_in_threads(20, increment)

    assert cache.get(key) == 100
    cache.delete(key)


def test_pool_settings_come_from_options():
    options = {"max_connections": 7, "pool_timeout": 2}
    cache = SharedRedisCache("redis://127.0.0.1:6379/15", {"OPTIONS": options})

    pool = cache._cache._get_connection_pool(write=True)

    assert type(pool).__name__ == "BlockingConnectionPool"
    assert pool.max_connections == 7
    assert pool.timeout == 2


def test_incr_keeps_expiry_and_misses_like_django(redis_location):
    cache = SharedRedisCache(redis_location, {})
    key = "proxy:test:incr"
    cache.set(key, 5, timeout=60)

    assert cache.incr(key) == 6
    assert cache.incr(key, 10) == 16
    ttl = cache._cache.get_client(key).ttl(cache.make_and_validate_key(key))
    assert 0 < ttl <= 60
    cache.delete(key)
    with pytest.raises(ValueError):
        cache.incr(key)
    assert cache.get(key) is None


def test_incr_loads_its_script_after_flush(redis_location):
    cache = SharedRedisCache(redis_location, {})
    key = "proxy:test:incr-flushed"
    cache.set(key, 1, timeout=60)
    cache.incr(key)
    cache._cache.get_client(key, write=True).script_flush()

    assert cache.incr(key) == 3
    cache.delete(key)
