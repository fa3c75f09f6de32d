"""Django's Redis cache with one client per process, shared by its threads."""

import threading

from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.utils.functional import cached_property

# Clients by (servers, options). redis-py's connection pools are thread-safe,
# and they reconnect after a fork.
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()

# Pool defaults, unless the cache's OPTIONS set a pool_class. A thread waits
# up to POOL_TIMEOUT seconds for one of POOL_SIZE connections. redis-py's
# default pool (redis 8) raises MaxConnectionsError once 100 are in use.
POOL_SIZE = 50
POOL_TIMEOUT = 5.0


# Adds to a counter only if it exists, so that a counter that expired is not
# recreated without its expiry. Returns nil for a missing key.
_INCR_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return false
"""


class SharedRedisCacheClient(RedisCacheClient):
    """Django's Redis client, with `incr` in one round trip.

    Django's client sends EXISTS and then INCRBY. The rate limits increment
    a counter on every request, so a script does both in one command. The
    script is also atomic: with two commands, a counter that expired between
    them came back without an expiry.
    """

    def incr(self, key, delta):
        client = self.get_client(key, write=True)
        script = self.__dict__.get("_incr_script")
        if script is None:
            # The script is sent by its SHA-1, and loaded on a server's first call.
            script = self._incr_script = client.register_script(_INCR_EXISTING)
        value = script(keys=[key], args=[delta], client=client)
        if value is None:
            raise ValueError(f"Key '{key}' not found.")
        return value


class SharedRedisCache(RedisCache):
    """Django's Redis cache, with one client and connection pool per process.

    Django builds a cache object for every thread, and each of Django's Redis
    clients keeps its own connection pool. A gthread worker of 256 threads
    would open up to 256 connections to Redis, and keep their buffers. This
    backend gives every thread of a process the same client, whose pool
    blocks for a free connection instead of failing when all are in use.
    """

    def __init__(self, server, params) -> None:
        super().__init__(server, params)
        self._class = SharedRedisCacheClient
        if "pool_class" not in self._options:
            # `timeout` in a CACHE_URL sets the keys' expiry, so the wait for a
            # connection has its own name there.
            options = dict(self._options)
            wait = options.pop("pool_timeout", POOL_TIMEOUT)
            self._options = {
                "pool_class": "redis.BlockingConnectionPool",
                "max_connections": POOL_SIZE,
                "timeout": wait,
                **options,
            }

    @cached_property
    def _cache(self):
        key = (tuple(self._servers), repr(sorted(self._options.items())))
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = self._class(self._servers, **self._options)
                _clients[key] = client
        return client
