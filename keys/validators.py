"""Validators for tier and key settings."""

import re
import unicodedata

from django.core.exceptions import ValidationError

# django-ratelimit's notation: a count, a slash, an optional multiplier and a
# unit (s, m, h, d), e.g. "60/m", "1000/d", "5/10s".
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Longer periods overflow the cache's expiry times.
MAX_RATE_PERIOD = 366 * 86400
MAX_RATE_COUNT = 1_000_000_000
_RATE = re.compile(r"(?P<count>\d+)/(?P<multiplier>\d*)(?P<unit>[smhd])")
# The model names that requests may carry in `model`.
MAX_MODEL_NAME_LENGTH = 128
_MODEL_NAME = re.compile(r"[^\s\x00-\x1f\x7f]+")


def split_list(value: str) -> list[str]:
    """Split a comma- or newline-separated setting into its non-empty items."""
    items = value.replace("\n", ",").split(",")
    return [item.strip() for item in items if item.strip()]


def validate_no_control_characters(value: str) -> None:
    """Reject control characters and line or paragraph separators.

    A name containing them would split or garble the rows of table output
    such as list_keys.
    """
    for char in value:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise ValidationError(
                f"{value!r} contains the control character {char!r}. Use "
                "printable characters only.",
                code="control_character",
            )


def validate_model_list(value: str) -> None:
    """Reject a model list that is not empty but names no model, such as ' , ,'.

    Each model in it must be a valid model name (see validate_model_name).
    """
    models = split_list(value)
    if value.strip() and not models:
        raise ValidationError(
            f"{value!r} names no model. Give model names separated by commas, "
            "or leave the field empty to allow any model.",
            code="empty_model_list",
        )
    for model in models:
        validate_model_name(model)


def validate_model_name(value: str) -> None:
    """Reject a model name that no request can name.

    Requests are held to the same rule (generation.serializers.ModelNameField).
    An allowed model that breaks it can never be requested, and a default
    model that breaks it is sent to the upstream as it is.
    """
    if len(value) > MAX_MODEL_NAME_LENGTH or not _MODEL_NAME.fullmatch(value):
        raise ValidationError(
            f"{value!r} is not a valid model name: a model name has 1 to "
            f"{MAX_MODEL_NAME_LENGTH} characters and no whitespace or control "
            "characters.",
            code="invalid_model_name",
        )


def split_rate(rate: str) -> tuple[int, int]:
    """Split a rate such as "60/m" or "5/10s" into its count and period in seconds.

    Raises ValueError when the rate is not in django-ratelimit's notation or
    its count or period is 0.
    """
    match = _RATE.fullmatch(rate)
    if match is None:
        raise ValueError(
            f"{rate!r} is not a valid rate. Use a count, a slash and a period "
            "such as 60/m, 1000/d or 5/10s (units: s, m, h, d)."
        )
    count = int(match["count"])
    period = int(match["multiplier"] or 1) * _UNIT_SECONDS[match["unit"]]
    if count < 1 or period < 1:
        raise ValueError(
            f"{rate!r} is not a valid rate: its count and period must be at least 1."
        )
    return count, period


def validate_rate(rate: str) -> None:
    try:
        count, period = split_rate(rate)
    except ValueError as exc:
        raise ValidationError(str(exc), code="invalid_rate") from exc
    if period > MAX_RATE_PERIOD or count > MAX_RATE_COUNT:
        raise ValidationError(
            f"{rate!r} is not a valid rate: the period may be at most 366 days "
            f"and the count at most {MAX_RATE_COUNT}.",
            code="invalid_rate",
        )


def validate_rate_list(value: str) -> None:
    for rate in split_list(value):
        validate_rate(rate)
