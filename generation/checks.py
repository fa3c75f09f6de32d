"""System checks for the upstream, the rate limit cache and the tiers."""

from django.conf import settings
from django.core import checks
from django.db import DatabaseError

PER_PROCESS_CACHES = {
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
    "django.core.cache.backends.filebased.FileBasedCache",
}


@checks.register(checks.Tags.compatibility)
def check_upstream_key(app_configs, **kwargs) -> list[checks.CheckMessage]:
    if settings.OPENAI_API_KEY:
        return []
    return [
        checks.Warning(
            "OPENAI_API_KEY is not set, so every generation request will fail "
            "with 502 upstream_misconfigured.",
            hint="Set OPENAI_API_KEY in the environment or in .env.",
            id="generation.W001",
        )
    ]


@checks.register(checks.Tags.caches)
def check_limit_cache(app_configs, **kwargs) -> list[checks.CheckMessage]:
    messages = []
    backend = settings.CACHES[settings.RATELIMIT_USE_CACHE]["BACKEND"]
    if backend in PER_PROCESS_CACHES and not settings.DEBUG:
        messages.append(
            checks.Warning(
                f"Rate limits are counted in {backend}, which each process "
                "keeps for itself, so every process and host allows the full "
                "rate on its own.",
                hint="Set CACHE_URL to a shared cache such as redis://host:6379/0.",
                id="generation.W002",
            )
        )
    if settings.PROXY_LIMITS_FAIL_OPEN:
        messages.append(
            checks.Warning(
                "PROXY_LIMITS_FAIL_OPEN is on: while the cache is down, rate "
                "limits are not enforced at all.",
                hint="Leave PROXY_LIMITS_FAIL_OPEN off unless availability "
                "matters more than the limits.",
                id="generation.W003",
            )
        )
    return messages


@checks.register(checks.Tags.models)
def check_unlimited_tiers(app_configs, **kwargs) -> list[checks.CheckMessage]:
    from keys.models import Tier

    try:
        unlimited = list(
            Tier.objects.filter(
                rate_limits="", tokens_per_day=None, tokens_per_month=None
            ).values_list("name", flat=True)
        )
    except DatabaseError:
        return []  # Tables not created yet; `migrate` comes first.
    return [
        checks.Warning(
            f"Tier {name!r} has no rate limit and no token cap, so its keys "
            "can spend without bound.",
            hint="Set rate limits or a token cap on the tier in the admin.",
            obj=name,
            id="generation.W004",
        )
        for name in unlimited
    ]
