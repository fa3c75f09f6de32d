"""Issue, look up and revoke API keys.

A key reads `sk-<prefix>-<secret>`: the prefix is 8 letters or digits, stored in
clear and used to find the row; the secret is 40 letters or digits (about 238
random bits), so a plain SHA-256 of the whole key is safe to store without salt
or stretching.
"""

import datetime
import hashlib
import hmac
import re
import secrets
import string

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from .models import APIKey, Tier

KEY_START = "sk-"
PREFIX_LENGTH = 8
SECRET_LENGTH = 40
_ALPHABET = string.ascii_letters + string.digits
_KEY_PATTERN = re.compile(
    rf"^sk-(?P<prefix>[A-Za-z0-9]{{{PREFIX_LENGTH}}})-[A-Za-z0-9]{{{SECRET_LENGTH}}}$"
)
# A prefix collision is one in 62**8 per existing key; a few tries are plenty.
_ISSUE_ATTEMPTS = 5


def _random_string(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def parse_prefix(raw_key: str) -> str | None:
    """Return the prefix of a well-formed key, or None for anything else."""
    match = _KEY_PATTERN.match(raw_key)
    return match["prefix"] if match else None


def issue_key(
    *, name: str, tier: Tier, expires_at: datetime.datetime | None = None
) -> tuple[APIKey, str]:
    """Create a key and return it with its plaintext, which is not stored."""
    for _ in range(_ISSUE_ATTEMPTS):
        prefix = _random_string(PREFIX_LENGTH)
        raw_key = f"{KEY_START}{prefix}-{_random_string(SECRET_LENGTH)}"
        try:
            with transaction.atomic():
                api_key = APIKey.objects.create(
                    name=name,
                    tier=tier,
                    prefix=prefix,
                    hashed_key=hash_key(raw_key),
                    expires_at=expires_at,
                )
        except IntegrityError:
            continue
        return api_key, raw_key
    raise RuntimeError("Could not find an unused key prefix; try again.")


def revoke_key(*, api_key: APIKey) -> bool:
    """Revoke a key. Return False when it was already revoked."""
    updated = APIKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    api_key.refresh_from_db(fields=["revoked_at"])
    return updated == 1


def find_usable_key(raw_key: str) -> APIKey | None:
    """Return the active key matching `raw_key`, or None for any kind of failure.

    The callers deny every failure the same way, so this does not say whether
    the key was malformed, unknown, revoked or expired.
    """
    prefix = parse_prefix(raw_key)
    if prefix is None:
        return None
    api_key = APIKey.objects.select_related("tier").filter(prefix=prefix).first()
    if api_key is None:
        return None
    if not hmac.compare_digest(api_key.hashed_key, hash_key(raw_key)):
        return None
    now = timezone.now()
    if api_key.is_revoked or api_key.is_expired(now):
        return None
    _touch_last_used(api_key, now)
    return api_key


def _touch_last_used(api_key: APIKey, now: datetime.datetime) -> None:
    resolution = datetime.timedelta(seconds=settings.PROXY_LAST_USED_RESOLUTION)
    if api_key.last_used_at is None or now - api_key.last_used_at >= resolution:
        APIKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
