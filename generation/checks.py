"""System checks for the upstream configuration."""

from django.conf import settings
from django.core import checks


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
