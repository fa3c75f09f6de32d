"""Issue, look up, rotate, expire and revoke API keys.

A key reads `sk-<prefix>-<secret>`. The prefix is 8 letters or digits, stored
in clear and used to find the row. The secret is 40 letters or digits (about
238 random bits), so a plain SHA-256 of the whole key is safe to store without
salt or stretching.
"""

import datetime
import hashlib
import hmac
import re
import secrets
import string

from django.conf import settings
from django.db import IntegrityError, connections, router, transaction
from django.db.models.query import get_related_populators
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
# A grace period lets clients switch to a rotated key. A week covers a slow
# rollout, and a longer grace would keep a leaked key working for too long.
MAX_GRACE = datetime.timedelta(days=7)
# A hundred years: longer expiries overflow date arithmetic.
MAX_EXPIRY_DAYS = 36_500


class KeyStateError(Exception):
    """The operation does not apply to the key in its current state."""


def _random_string(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _new_raw_key(prefix: str) -> str:
    return f"{KEY_START}{prefix}-{_random_string(SECRET_LENGTH)}"


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
        raw_key = _new_raw_key(prefix)
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


def rotate_key(
    *, api_key: APIKey, grace: datetime.timedelta = datetime.timedelta(0)
) -> str:
    """Give the key a new secret and return the new plaintext key.

    The row stays the same, and with it the prefix, tier, limits and usage
    history. The replaced key keeps working for `grace`, or stops at once when
    `grace` is zero. Rotating again during a grace period ends that period, so
    only the key replaced last can still work. Raises KeyStateError for a
    revoked or expired key.
    """
    if not datetime.timedelta(0) <= grace <= MAX_GRACE:
        raise ValueError(
            f"The grace period must be between 0 and {MAX_GRACE.days} days, "
            f"not {grace}."
        )
    with transaction.atomic():
        locked = _lock(api_key)
        if locked.state != "active":
            raise KeyStateError(
                f"The API key {locked.prefix} is {locked.state}; only an active "
                "key can be rotated."
            )
        now = timezone.now()
        raw_key = _new_raw_key(locked.prefix)
        changes = {
            "hashed_key": hash_key(raw_key),
            "previous_hashed_key": locked.hashed_key if grace else "",
            "previous_key_expires_at": now + grace if grace else None,
            "rotated_at": now,
        }
        APIKey.objects.filter(pk=locked.pk).update(**changes)
    for field, value in changes.items():
        setattr(api_key, field, value)
    return raw_key


def revoke_key(*, api_key: APIKey) -> bool:
    """Revoke a key. Return False when it was already revoked."""
    updated = APIKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    api_key.refresh_from_db(fields=["revoked_at"])
    return updated == 1


def extend_expiry(
    *, api_key: APIKey, by: datetime.timedelta, dry_run: bool = False
) -> datetime.datetime | None:
    """Move the key's expiry `by` later and return the new expiry.

    An expired key is extended from now, so it works again. A key without an
    expiry is left unchanged, and None is returned. With `dry_run`, the new
    expiry is returned but not saved. Raises KeyStateError for a revoked key,
    and ValueError when `by` is not between 1 and MAX_EXPIRY_DAYS days or the
    new expiry is past the year 9999.
    """
    if not datetime.timedelta(days=1) <= by <= datetime.timedelta(days=MAX_EXPIRY_DAYS):
        raise ValueError(
            f"The extension must be between 1 and {MAX_EXPIRY_DAYS} days, not {by}."
        )
    with transaction.atomic():
        locked = _lock(api_key)
        if locked.is_revoked:
            raise KeyStateError(
                f"The API key {locked.prefix} is revoked; revocation is final."
            )
        if locked.expires_at is None:
            return None
        try:
            expires_at = max(locked.expires_at, timezone.now()) + by
        except OverflowError as exc:
            raise ValueError(
                f"The API key {locked.prefix} would expire after the year 9999."
            ) from exc
        if dry_run:
            return expires_at
        APIKey.objects.filter(pk=locked.pk).update(expires_at=expires_at)
    api_key.expires_at = expires_at
    return expires_at


def expire_unused_keys(
    *, unused_for: datetime.timedelta, dry_run: bool = False
) -> list[APIKey]:
    """Expire the active keys not used for `unused_for` and return them.

    A key that was never used counts from its creation. The keys expire now,
    so their holders are denied from the next request on. With `dry_run`, the
    keys are returned but not changed.
    """
    now = timezone.now()
    with transaction.atomic():
        query = (
            APIKey.objects.usable()
            .unused_since(now - unused_for)
            .select_related("tier")
            .select_for_update(of=("self",))
            .order_by("created_at")
        )
        stale = list(query)
        if stale and not dry_run:
            APIKey.objects.filter(pk__in=[key.pk for key in stale]).update(
                expires_at=now
            )
            for api_key in stale:
                api_key.expires_at = now
    return stale


def find_usable_key(raw_key: str) -> APIKey | None:
    """Return the active key matching `raw_key`, or None for any kind of failure.

    The callers deny every failure the same way, so this does not say whether
    the key was malformed, unknown, revoked, expired or rotated out. Every call
    reads the row from the database, so a key revoked, expired or rotated by
    any means, a raw SQL UPDATE included, is denied from the next request on.
    """
    prefix = parse_prefix(raw_key)
    if prefix is None:
        return None
    api_key = _key_lookup().fetch(prefix)
    if api_key is None:
        return None
    now = timezone.now()
    if not _secret_matches(api_key, hash_key(raw_key), now):
        return None
    if api_key.is_revoked or api_key.is_expired(now):
        return None
    _touch_last_used(api_key, now)
    return api_key


class _KeyLookup:
    """The key-by-prefix query with its tier, compiled once and run many times.

    Compiling a query costs the ORM several times more CPU than running it,
    and this one runs on every request. So the SQL is compiled once. Each run
    passes the rows through the ORM's own converters and model loading, as
    ModelIterable in django.db.models.query does, and the tests compare the
    result with the ORM's. One lookup
    serves all threads: the query runs on the calling thread's connection,
    and the compiler's own connection is only read for the converters'
    settings (such as the time zone), never used to run a query.
    """

    _PLACEHOLDER = "prefix placeholder"

    def __init__(self, using: str) -> None:
        # The prefix is unique, so the query needs no ORDER BY.
        queryset = (
            APIKey.objects.using(using)
            .select_related("tier")
            .filter(prefix=self._PLACEHOLDER)
            .order_by()[:1]
        )
        self.using = using
        self.compiler = queryset.query.get_compiler(using=using)
        self.sql, params = self.compiler.as_sql()
        if tuple(params) != (self._PLACEHOLDER,):
            raise RuntimeError(f"Unexpected key lookup parameters: {params!r}")
        klass_info, select = self.compiler.klass_info, self.compiler.select
        fields = klass_info["select_fields"]
        self.key_columns = slice(fields[0], fields[-1] + 1)
        self.key_attnames = [
            column[0].target.attname for column in select[self.key_columns]
        ]
        self.populators = get_related_populators(klass_info, select, using)
        # The converters depend only on the selected columns, so they are
        # found once here, where results_iter() would find them on each run.
        columns = [column[0] for column in select[: self.compiler.col_count]]
        if self.compiler.has_composite_fields(columns):
            raise RuntimeError("The key lookup does not expect composite fields.")
        self.converters = self.compiler.get_converters(columns)

    def fetch(self, prefix: str) -> APIKey | None:
        with connections[self.using].cursor() as cursor:
            cursor.execute(self.sql, [prefix])
            rows = cursor.fetchmany(1)
        if self.converters:
            rows = self.compiler.apply_converters(rows, self.converters)
        for row in rows:
            api_key = APIKey.from_db(
                self.using, self.key_attnames, row[self.key_columns]
            )
            for populator in self.populators:
                populator.populate(row, api_key)
            return api_key
        return None


# Lookups by database alias. When two threads build one at the same time, the
# second replaces the first, which does no harm.
_lookups: dict[str, _KeyLookup] = {}


def _key_lookup() -> _KeyLookup:
    using = router.db_for_read(APIKey)
    lookup = _lookups.get(using)
    if lookup is None:
        lookup = _lookups[using] = _KeyLookup(using)
    return lookup


def _secret_matches(api_key: APIKey, key_hash: str, now: datetime.datetime) -> bool:
    # Both hashes are always compared, each in constant time, so the timing
    # does not reveal which one matched.
    current = hmac.compare_digest(api_key.hashed_key, key_hash)
    previous = hmac.compare_digest(api_key.previous_hashed_key, key_hash)
    return current or (previous and api_key.accepts_previous_key(now))


def _touch_last_used(api_key: APIKey, now: datetime.datetime) -> None:
    resolution = datetime.timedelta(seconds=settings.PROXY_LAST_USED_RESOLUTION)
    if api_key.last_used_at is None or now - api_key.last_used_at >= resolution:
        APIKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now


def _lock(api_key: APIKey) -> APIKey:
    """Return a fresh copy of the key's row, locked until the transaction ends."""
    return APIKey.objects.select_for_update().get(pk=api_key.pk)
