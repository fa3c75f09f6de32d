"""Readiness probe: whether this process can use its database and its cache."""

import logging
import uuid

from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema

from proxy_site.error_views import method_not_allowed
from proxy_site.errors import error_body

logger = logging.getLogger(__name__)

# Seconds the probe's cache key lives, in case the delete after the check fails.
CACHE_PROBE_TIMEOUT = 10


def check_database() -> bool:
    """Return whether a trivial query on the default database succeeds."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    # Drivers and the connection pool raise their own errors besides Django's
    # DatabaseError, and any of them means "not ready".
    except Exception as exc:  # noqa: BLE001
        logger.error("Readiness check: the database failed: %r", exc)
        return False
    return True


def check_cache() -> bool:
    """Return whether a short-lived key can be written, read back and deleted."""
    key = f"proxy:readyz:{uuid.uuid4().hex}"
    try:
        cache.set(key, "ok", timeout=CACHE_PROBE_TIMEOUT)
        value = cache.get(key)
        cache.delete(key)
    # Each cache backend raises its own errors (redis.ConnectionError, OSError).
    except Exception as exc:  # noqa: BLE001
        logger.error("Readiness check: the cache failed: %r", exc)
        return False
    if value != "ok":
        logger.error("Readiness check: the cache did not return the value it stored.")
        return False
    return True


@extend_schema(exclude=True)
@csrf_exempt
@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """Return 200 when the database and the cache work, else 503 naming the failure.

    Needs no key. The body names only which check failed; the error itself,
    with any host name, goes to the log.
    """
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, ["GET", "HEAD"])
    checks = {
        "database": "ok" if check_database() else "failed",
        "cache": "ok" if check_cache() else "failed",
    }
    ready = all(result == "ok" for result in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    if not ready:
        # The error envelope gives the 503 a code, which the access log and
        # the refusal metrics report.
        failed = " and ".join(name for name, result in checks.items() if result != "ok")
        body.update(
            error_body(
                f"The proxy is not ready: the {failed} check failed.",
                code="not_ready",
                error_type="server_error",
            )
        )
    return JsonResponse(body, status=200 if ready else 503)
