"""Lookups and output formats shared by the key and tier commands."""

import csv
import datetime
import io
import json

from django.core.management.base import CommandError, CommandParser, OutputWrapper

from keys.models import APIKey, Tier
from keys.services import PREFIX_LENGTH, parse_prefix

# Fields of a newly issued or rotated key, in the order of CSV columns.
ISSUED_FIELDS = ["prefix", "key", "name", "tier", "expires_at"]


def add_key_argument(parser: CommandParser) -> None:
    parser.add_argument(
        "prefix",
        help="The key's 8-character prefix, as list_keys shows it, or the whole key.",
    )


def get_key(value: str) -> APIKey:
    """Return the key with the prefix `value`, which may also be the whole key."""
    prefix = parse_prefix(value) or value.removeprefix("sk-")
    if len(prefix) > PREFIX_LENGTH:
        # This is likely a mistyped whole key, so repeating it would print its
        # secret.
        raise CommandError(
            f"The argument is neither a key prefix ({PREFIX_LENGTH} characters) "
            "nor a whole key, and is not repeated here because it may contain "
            "a secret. List the keys with: manage.py list_keys"
        )
    try:
        return APIKey.objects.select_related("tier").get(prefix=prefix)
    except APIKey.DoesNotExist as exc:
        raise CommandError(
            f"No API key has the prefix {prefix!r}. List the keys with: "
            "manage.py list_keys"
        ) from exc


def get_tier(name: str) -> Tier:
    try:
        return Tier.objects.get(name=name)
    except Tier.DoesNotExist as exc:
        known = ", ".join(Tier.objects.values_list("name", flat=True)) or "none"
        raise CommandError(f"Tier {name!r} not found. Known tiers: {known}.") from exc


def iso_time(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


def issued_record(api_key: APIKey, raw_key: str) -> dict:
    """Return the ISSUED_FIELDS of a key whose plaintext is `raw_key`."""
    return {
        "prefix": api_key.prefix,
        "key": raw_key,
        "name": api_key.name,
        "tier": api_key.tier.name,
        "expires_at": iso_time(api_key.expires_at),
    }


def key_record(api_key: APIKey) -> dict:
    """Return a key's public fields for JSON output, without its secret or hash."""
    return {
        "prefix": api_key.prefix,
        "name": api_key.name,
        "tier": api_key.tier.name,
        "state": api_key.state,
        "created_at": iso_time(api_key.created_at),
        "last_used_at": iso_time(api_key.last_used_at),
        "expires_at": iso_time(api_key.expires_at),
        "revoked_at": iso_time(api_key.revoked_at),
        "rotated_at": iso_time(api_key.rotated_at),
        "previous_key_expires_at": iso_time(api_key.previous_key_expires_at),
    }


def write_json(stdout: OutputWrapper, data: dict | list) -> None:
    stdout.write(json.dumps(data, indent=2))


def write_csv(stdout: OutputWrapper, fields: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    stdout.write(buffer.getvalue(), ending="")
