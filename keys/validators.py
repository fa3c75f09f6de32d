"""Validators for tier and key settings."""

import re

from django.core.exceptions import ValidationError

# django-ratelimit's notation: a count, a slash, an optional multiplier and a
# unit (s, m, h, d), e.g. "60/m", "1000/d", "5/10s".
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Longer periods overflow the cache's expiry times.
MAX_RATE_PERIOD = 366 * 86400
MAX_RATE_COUNT = 1_000_000_000
_RATE = re.compile(r"^(?P<count>\d+)/(?P<multiplier>\d*)(?P<unit>[smhd])$")


def split_list(value: str) -> list[str]:
    """Split a comma- or newline-separated setting into its non-empty items."""
    items = value.replace("\n", ",").split(",")
    return [item.strip() for item in items if item.strip()]


def validate_rate(rate: str) -> None:
    match = _RATE.match(rate)
    if match is None:
        raise ValidationError(
            f"{rate!r} is not a valid rate. Use a count, a slash and a period "
            "such as 60/m, 1000/d or 5/10s (units: s, m, h, d).",
            code="invalid_rate",
        )
    if int(match["count"]) < 1 or match["multiplier"] == "0":
        raise ValidationError(
            f"{rate!r} is not a valid rate: the count and the period must be "
            "at least 1.",
            code="invalid_rate",
        )
    period = int(match["multiplier"] or 1) * _UNIT_SECONDS[match["unit"]]
    if period > MAX_RATE_PERIOD or int(match["count"]) > MAX_RATE_COUNT:
        raise ValidationError(
            f"{rate!r} is not a valid rate: the period may be at most 366 days "
            f"and the count at most {MAX_RATE_COUNT}.",
            code="invalid_rate",
        )


def validate_rate_list(value: str) -> None:
    for rate in split_list(value):
        validate_rate(rate)
