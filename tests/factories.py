"""Small helpers that create tiers and keys for tests."""

import datetime

from django.utils import timezone

from keys.models import APIKey, Tier
from keys.services import issue_key


def make_tier(name: str = "test-tier", **fields) -> Tier:
    tier, _ = Tier.objects.update_or_create(name=name, defaults=fields)
    return tier


def make_key(
    *,
    tier: Tier | None = None,
    name: str = "test key",
    expires_in_days: int | None = None,
) -> tuple[APIKey, str]:
    expires_at = None
    if expires_in_days is not None:
        expires_at = timezone.now() + datetime.timedelta(days=expires_in_days)
    return issue_key(name=name, tier=tier or make_tier(), expires_at=expires_at)
