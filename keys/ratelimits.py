"""Request rate limits on the Django cache, with django-ratelimit's counters.

Limits are fixed windows counted in the cache named by RATELIMIT_USE_CACHE.
With Redis every process and host shares the counts; with the local-memory
cache each process counts alone (a system check warns about that).
"""

import functools
import ipaddress
import logging
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django_ratelimit.core import get_usage

from keys.validators import split_rate
from proxy_site.errors import (
    LimitsUnavailable,
    RateLimitExceeded,
    TooManyFailedAttempts,
)

logger = logging.getLogger(__name__)

KEY_GROUP = "proxy.api-key"
FAILED_AUTH_GROUP = "proxy.failed-auth"

# django-ratelimit puts the whole rate in its cache key, so a changed count
# would start a new counter at zero. Each counter is requested with this
# count, which no window's total reaches, and the real limit is compared
# here. A changed count thus keeps the requests already counted in the
# window, and only a changed period starts a new counter.
_COUNTER_COUNT = 1_000_000_000


@dataclass(frozen=True)
class WindowUsage:
    """The count of one rate window after the current request."""

    rate: str
    limit: int
    count: int
    # Seconds until the window resets.
    reset: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    @property
    def exceeded(self) -> bool:
        return self.count > self.limit


def count_request(
    request: HttpRequest, *, group: str, value: str, rates: list[str], increment: bool
) -> list[WindowUsage]:
    """Count a request in each window and return every window's usage.

    When the cache fails, the PROXY_LIMITS_FAIL_OPEN setting decides: open
    returns no usage (no limit applies), closed raises LimitsUnavailable.
    An invalid rate raises ValueError whatever that setting is.
    """
    usages = []
    # Rates of the same period ("10/m" and "100/60s") share one counter, so
    # each period is counted once and every rate of it reads that count.
    counted: dict[int, dict | None] = {}
    for rate in rates:
        limit, period = split_rate(rate)
        if period not in counted:
            try:
                counted[period] = get_usage(
                    request,
                    group=group,
                    key=lambda _group, _request: value,
                    rate=f"{_COUNTER_COUNT}/{period}s",
                    increment=increment,
                )
            # django-ratelimit raises this for a bad group, key or rate, which
            # is a programming error and not a cache failure.
            except ImproperlyConfigured:
                raise
            # Each cache backend raises its own errors (redis.ConnectionError,
            # pymemcache errors, OSError), so any other failure means "cache
            # down".
            except Exception as exc:  # noqa: BLE001
                return _cache_failed(group, exc)
        usage = counted[period]
        if usage is None:
            continue  # RATELIMIT_ENABLE is off.
        # django-ratelimit reports a failed cache read as limit 0, time left -1.
        if usage["limit"] == 0 and usage["time_left"] == -1:
            return _cache_failed(group, None)
        usages.append(
            WindowUsage(
                rate=rate,
                limit=limit,
                count=usage["count"],
                # The window's last second is `time_left` seconds away, and
                # it still counts: a new window starts one second later.
                reset=usage["time_left"] + 1,
            )
        )
    return usages


def _cache_failed(group: str, exc: Exception | None) -> list[WindowUsage]:
    reason = type(exc).__name__ if exc else "no count returned"
    if settings.PROXY_LIMITS_FAIL_OPEN:
        logger.error(
            "Rate limit cache failed (%s) for %s; failing open.", reason, group
        )
        return []
    logger.error("Rate limit cache failed (%s) for %s; failing closed.", reason, group)
    raise LimitsUnavailable()


def tightest(usages: list[WindowUsage]) -> WindowUsage | None:
    """Return the window with the fewest requests left (the longest wait on ties)."""
    if not usages:
        return None
    return min(usages, key=lambda usage: (usage.remaining, -usage.reset))


def rate_limit_headers(usages: list[WindowUsage]) -> dict[str, str]:
    window = tightest(usages)
    if window is None:
        return {}
    return {
        "X-RateLimit-Limit": str(window.limit),
        "X-RateLimit-Remaining": str(window.remaining),
        "X-RateLimit-Reset": str(window.reset),
    }


def client_ip(request: HttpRequest) -> str:
    """Return the client's address: the socket peer, unless it is a trusted proxy.

    When the peer is in PROXY_TRUSTED_PROXIES, X-Forwarded-For is read from
    the right, skipping trusted proxies, so the client cannot choose the
    address by sending its own header.
    """
    peer = request.META.get("REMOTE_ADDR", "")
    trusted = _trusted_networks(tuple(settings.PROXY_TRUSTED_PROXIES))
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop if _is_address(hop) else peer
    return peer


@functools.lru_cache(maxsize=4)
def _trusted_networks(
    cidrs: tuple[str, ...],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _count_failed_attempts(
    request: HttpRequest, *, increment: bool
) -> list[WindowUsage]:
    rate = settings.PROXY_FAILED_AUTH_RATE
    if not rate:
        return []
    return count_request(
        request,
        group=FAILED_AUTH_GROUP,
        value=client_ip(request),
        rates=[rate],
        increment=increment,
    )


def check_failed_attempts(request: HttpRequest) -> None:
    """Raise TooManyFailedAttempts when this address sent too many wrong keys."""
    for usage in _count_failed_attempts(request, increment=False):
        if usage.count >= usage.limit:
            raise TooManyFailedAttempts(retry_after=usage.reset)


def record_failed_attempt(request: HttpRequest) -> None:
    """Count a wrong key; raise TooManyFailedAttempts if that used up the limit.

    NOTE: the check before the key is looked at only reads the count, so
    requests that arrive together can all pass it: an address gets at most
    the limit plus the number of its requests in flight at once evaluated.
    """
    for usage in _count_failed_attempts(request, increment=True):
        if usage.exceeded:
            raise TooManyFailedAttempts(retry_after=usage.reset)


def enforce_key_rates(request: HttpRequest, api_key) -> list[WindowUsage]:
    """Count a request against its key's rates; raise RateLimitExceeded if over.

    Returns every window's usage, for the rate limit headers.
    """
    usages = count_request(
        request,
        group=KEY_GROUP,
        value=str(api_key.pk),
        rates=api_key.effective_rate_limits,
        increment=True,
    )
    exceeded = [usage for usage in usages if usage.exceeded]
    if exceeded:
        # Refused requests count too, so a window with nothing left refuses the
        # next request even if this one fit it: wait for every such window.
        used_up = [usage for usage in usages if usage.remaining == 0]
        raise RateLimitExceeded(
            f"This API key is over its rate limit of {exceeded[0].rate}. "
            "Retry after the time in the Retry-After header.",
            retry_after=max(usage.reset for usage in used_up),
            headers=rate_limit_headers(usages),
        )
    return usages
