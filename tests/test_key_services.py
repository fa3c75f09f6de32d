import datetime
import threading

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.db import connections
from django.utils import timezone

from keys.models import APIKey, Tier
from keys.services import (
    MAX_EXPIRY_DAYS,
    MAX_GRACE,
    KeyStateError,
    _lookups,
    expire_unused_keys,
    extend_expiry,
    find_usable_key,
    hash_key,
    issue_key,
    parse_prefix,
    revoke_key,
    rotate_key,
)
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db


def test_default_tier_exists_after_migrations():
    assert Tier.objects.filter(name="default").exists()


def test_issued_key_is_stored_only_as_hash():
    api_key, raw_key = make_key()
    stored = APIKey.objects.get(pk=api_key.pk)
    assert raw_key.startswith("sk-")
    assert stored.hashed_key == hash_key(raw_key)
    assert raw_key not in {str(value) for value in stored.__dict__.values()}
    assert parse_prefix(raw_key) == stored.prefix


def test_issued_keys_differ():
    _, first = make_key()
    _, second = make_key()
    assert first != second


def test_usable_key_is_found_and_touched():
    api_key, raw_key = make_key()
    found = find_usable_key(raw_key)
    assert found == api_key
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(
            lambda raw: raw[:-1] + ("A" if raw[-1] != "A" else "B"), id="wrong-secret"
        ),
        pytest.param(lambda raw: raw[:-1], id="too-short"),
        pytest.param(lambda raw: raw.replace("sk-", "pk-"), id="wrong-start"),
        pytest.param(
            lambda raw: "sk-zzzzzzzz-" + raw.split("-")[2], id="unknown-prefix"
        ),
        pytest.param(lambda raw: "", id="empty"),
    ],
)
def test_wrong_key_is_not_found(mangle):
    _, raw_key = make_key()
    assert find_usable_key(mangle(raw_key)) is None


def test_revoked_key_is_not_found():
    api_key, raw_key = make_key()
    assert revoke_key(api_key=api_key) is True
    assert find_usable_key(raw_key) is None


def test_revoking_twice_reports_no_change():
    api_key, _ = make_key()
    revoke_key(api_key=api_key)
    assert revoke_key(api_key=api_key) is False


def test_revocation_cannot_be_undone():
    api_key, _ = make_key()
    revoke_key(api_key=api_key)
    api_key.revoked_at = None
    with pytest.raises(ValidationError):
        api_key.save()


def test_expired_key_is_not_found():
    api_key, raw_key = make_key()
    api_key.expires_at = timezone.now() - datetime.timedelta(seconds=1)
    api_key.save()
    assert find_usable_key(raw_key) is None


START = datetime.datetime(2026, 5, 4, 9, 0, tzinfo=datetime.UTC)


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


def test_lookup_is_one_query_when_recently_used(django_assert_num_queries):
    _, raw_key = make_key()
    find_usable_key(raw_key)
    with django_assert_num_queries(1):
        assert find_usable_key(raw_key) is not None


def _field_values(instance) -> dict:
    return {
        field.attname: getattr(instance, field.attname)
        for field in instance._meta.concrete_fields
    }


def test_lookup_matches_orm_loading(django_assert_num_queries):
    api_key, raw_key = make_key(name="compared")
    api_key.expires_at = timezone.now() + datetime.timedelta(days=3)
    api_key.save()
    find_usable_key(raw_key)
    with django_assert_num_queries(1):
        found = find_usable_key(raw_key)
        tier = found.tier
    stored = APIKey.objects.select_related("tier").get(pk=api_key.pk)
    assert _field_values(found) == _field_values(stored)
    assert _field_values(tier) == _field_values(stored.tier)
    assert found.expires_at.tzinfo is not None
    assert found._state.adding is False
    assert found._state.db == stored._state.db


def test_lookup_matches_orm_values():
    api_key, raw_key = make_key(expires_in_days=3)
    found = find_usable_key(raw_key)
    expected = APIKey.objects.select_related("tier").get(pk=api_key.pk)
    for model, instance, loaded in [
        (APIKey, found, expected),
        (Tier, found.tier, expected.tier),
    ]:
        for field in model._meta.concrete_fields:
            name = field.attname
            assert getattr(instance, name) == getattr(loaded, name), name
            assert type(getattr(instance, name)) is type(getattr(loaded, name)), name


def test_lookup_sees_key_and_tier_changes():
    api_key, raw_key = make_key()
    assert find_usable_key(raw_key).tier.tokens_per_day != 123
    Tier.objects.filter(pk=api_key.tier_id).update(tokens_per_day=123)
    APIKey.objects.filter(pk=api_key.pk).update(rate_limits="9/m")
    found = find_usable_key(raw_key)
    assert found.tier.tokens_per_day == 123
    assert found.rate_limits == "9/m"


@pytest.mark.django_db(transaction=True)
def test_lookup_works_in_several_threads():
    keys = [make_key() for _ in range(4)]
    found = {}

    def look_up(index: int, raw_key: str) -> None:
        try:
            found[index] = find_usable_key(raw_key).pk
        finally:
            connections.close_all()

    find_usable_key(keys[0][1])
    # One thread after another: SQLite's in-memory test database locks a
    # table for a concurrent write (each first lookup records the key's use).
    for index, (_, raw_key) in enumerate(keys):
        thread = threading.Thread(target=look_up, args=(index, raw_key))
        thread.start()
        thread.join()
    assert found == {index: api_key.pk for index, (api_key, _) in enumerate(keys)}
    assert len(_lookups) == 1


def test_lookup_adds_one_update_to_touch_last_use(django_assert_num_queries):
    _, raw_key = make_key()
    with django_assert_num_queries(2):
        assert find_usable_key(raw_key) is not None


def test_rotation_keeps_row_prefix_and_settings():
    api_key, old_key = make_key(name="rotating")
    api_key.rate_limits = "7/m"
    api_key.save()
    new_key = rotate_key(api_key=api_key)
    found = find_usable_key(new_key)
    assert found.pk == api_key.pk
    assert parse_prefix(new_key) == api_key.prefix
    assert found.name == "rotating"
    assert found.rate_limits == "7/m"
    assert new_key != old_key


def test_rotation_without_grace_stops_old_key_at_once():
    api_key, old_key = make_key()
    rotate_key(api_key=api_key)
    assert find_usable_key(old_key) is None
    stored = APIKey.objects.get(pk=api_key.pk)
    assert stored.previous_hashed_key == ""
    assert stored.previous_key_expires_at is None


def test_old_key_works_during_grace_only(clock):
    api_key, old_key = make_key()
    new_key = rotate_key(api_key=api_key, grace=datetime.timedelta(minutes=10))
    clock.shift(datetime.timedelta(minutes=9, seconds=59))
    assert find_usable_key(old_key) is not None
    assert find_usable_key(new_key) is not None
    clock.shift(datetime.timedelta(seconds=1))
    assert find_usable_key(old_key) is None
    assert find_usable_key(new_key) is not None


def test_second_rotation_ends_first_grace():
    api_key, first = make_key()
    second = rotate_key(api_key=api_key, grace=datetime.timedelta(hours=1))
    third = rotate_key(api_key=api_key, grace=datetime.timedelta(hours=1))
    assert find_usable_key(first) is None
    assert find_usable_key(second) is not None
    assert find_usable_key(third) is not None


def test_rotation_without_grace_ends_earlier_grace():
    api_key, first = make_key()
    rotate_key(api_key=api_key, grace=datetime.timedelta(hours=1))
    rotate_key(api_key=api_key)
    assert find_usable_key(first) is None


def test_revocation_ends_grace():
    api_key, old_key = make_key()
    rotate_key(api_key=api_key, grace=datetime.timedelta(hours=1))
    revoke_key(api_key=api_key)
    assert find_usable_key(old_key) is None


def test_expiry_applies_to_key_in_grace(clock):
    api_key, old_key = make_key(expires_in_days=1)
    new_key = rotate_key(api_key=api_key, grace=datetime.timedelta(days=3))
    clock.shift(datetime.timedelta(days=2))
    assert find_usable_key(old_key) is None
    assert find_usable_key(new_key) is None


@pytest.mark.parametrize(
    "make_inactive",
    [
        pytest.param(lambda key: revoke_key(api_key=key), id="revoked"),
        pytest.param(
            lambda key: APIKey.objects.filter(pk=key.pk).update(
                expires_at=timezone.now()
            ),
            id="expired",
        ),
    ],
)
def test_inactive_key_cannot_be_rotated(make_inactive):
    api_key, raw_key = make_key()
    make_inactive(api_key)
    with pytest.raises(KeyStateError, match="only an active key can be rotated"):
        rotate_key(api_key=api_key)
    assert APIKey.objects.get(pk=api_key.pk).hashed_key == hash_key(raw_key)


@pytest.mark.parametrize(
    "grace",
    [
        pytest.param(datetime.timedelta(seconds=-1), id="negative"),
        pytest.param(MAX_GRACE + datetime.timedelta(seconds=1), id="too-long"),
    ],
)
def test_rotation_rejects_grace_out_of_range(grace):
    api_key, raw_key = make_key()
    with pytest.raises(ValueError, match="grace period"):
        rotate_key(api_key=api_key, grace=grace)
    assert find_usable_key(raw_key) is not None


def test_extension_adds_to_future_expiry(clock):
    api_key, _ = make_key(expires_in_days=5)
    new_expiry = extend_expiry(api_key=api_key, by=datetime.timedelta(days=30))
    assert new_expiry == START + datetime.timedelta(days=35)
    assert APIKey.objects.get(pk=api_key.pk).expires_at == new_expiry


def test_extension_revives_expired_key_from_now(clock):
    api_key, raw_key = make_key(expires_in_days=1)
    clock.shift(datetime.timedelta(days=10))
    assert find_usable_key(raw_key) is None
    new_expiry = extend_expiry(api_key=api_key, by=datetime.timedelta(days=30))
    assert new_expiry == START + datetime.timedelta(days=40)
    assert find_usable_key(raw_key) is not None


def test_extension_leaves_key_without_expiry_unchanged():
    api_key, _ = make_key()
    assert extend_expiry(api_key=api_key, by=datetime.timedelta(days=30)) is None
    assert APIKey.objects.get(pk=api_key.pk).expires_at is None


def test_extension_dry_run_saves_nothing(clock):
    api_key, _ = make_key(expires_in_days=5)
    new_expiry = extend_expiry(
        api_key=api_key, by=datetime.timedelta(days=1), dry_run=True
    )
    assert new_expiry == START + datetime.timedelta(days=6)
    assert APIKey.objects.get(pk=api_key.pk).expires_at == START + datetime.timedelta(
        days=5
    )


def test_revoked_key_cannot_be_extended():
    api_key, _ = make_key(expires_in_days=5)
    revoke_key(api_key=api_key)
    with pytest.raises(KeyStateError, match="revocation is final"):
        extend_expiry(api_key=api_key, by=datetime.timedelta(days=1))


@pytest.mark.parametrize(
    "by",
    [
        pytest.param(datetime.timedelta(hours=23), id="under-a-day"),
        pytest.param(datetime.timedelta(days=MAX_EXPIRY_DAYS + 1), id="too-long"),
    ],
)
def test_extension_rejects_length_out_of_range(by):
    api_key, _ = make_key(expires_in_days=5)
    with pytest.raises(ValueError, match="between 1 and"):
        extend_expiry(api_key=api_key, by=by)


def test_extension_past_year_9999_is_rejected():
    api_key, _ = make_key()
    far = datetime.datetime(9999, 12, 1, tzinfo=datetime.UTC)
    APIKey.objects.filter(pk=api_key.pk).update(expires_at=far)
    with pytest.raises(ValueError, match="year 9999"):
        extend_expiry(api_key=api_key, by=datetime.timedelta(days=365))


def test_unused_keys_expire_and_used_ones_stay(clock):
    stale, stale_raw = make_key(name="stale")
    never_used, _ = make_key(name="never used")
    recent, recent_raw = make_key(name="recent")
    find_usable_key(stale_raw)
    clock.shift(datetime.timedelta(days=20))
    find_usable_key(recent_raw)
    clock.shift(datetime.timedelta(days=15))
    new_key, _ = make_key(name="new")

    expired = expire_unused_keys(unused_for=datetime.timedelta(days=30))

    assert {key.name for key in expired} == {"stale", "never used"}
    assert find_usable_key(stale_raw) is None
    assert APIKey.objects.get(pk=never_used.pk).state == "expired"
    assert APIKey.objects.get(pk=recent.pk).state == "active"
    assert APIKey.objects.get(pk=new_key.pk).state == "active"


def test_expiring_unused_keys_skips_revoked_and_expired(clock):
    revoked, _ = make_key(name="revoked")
    revoke_key(api_key=revoked)
    expired, _ = make_key(name="expired", expires_in_days=1)
    clock.shift(datetime.timedelta(days=60))
    assert expire_unused_keys(unused_for=datetime.timedelta(days=30)) == []
    assert APIKey.objects.get(pk=expired.pk).expires_at == START + datetime.timedelta(
        days=1
    )


def test_expiring_unused_keys_dry_run_changes_nothing(clock):
    api_key, raw_key = make_key()
    clock.shift(datetime.timedelta(days=60))
    found = expire_unused_keys(unused_for=datetime.timedelta(days=30), dry_run=True)
    assert [key.pk for key in found] == [api_key.pk]
    assert find_usable_key(raw_key) is not None


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        pytest.param("active", {"active"}, id="active"),
        pytest.param("expired", {"expired"}, id="expired"),
        pytest.param("revoked", {"revoked", "revoked and expired"}, id="revoked"),
    ],
)
def test_keys_filtered_by_state(state, expected):
    make_key(name="active")
    expired, _ = make_key(name="expired")
    APIKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now())
    revoked, _ = make_key(name="revoked")
    revoke_key(api_key=revoked)
    both, _ = make_key(name="revoked and expired")
    revoke_key(api_key=both)
    APIKey.objects.filter(pk=both.pk).update(expires_at=timezone.now())
    names = set(APIKey.objects.in_state(state).values_list("name", flat=True))
    assert names == expected


@pytest.mark.parametrize(
    "field", ["max_choices", "max_tokens_cap", "default_max_tokens"]
)
def test_tier_rejects_zero_limit(field):
    tier = Tier(name="zero", **{field: 0})
    with pytest.raises(ValidationError) as caught:
        tier.full_clean()
    assert field in caught.value.message_dict


def test_issue_key_rejects_control_characters_in_name():
    with pytest.raises(ValidationError, match="contains the control character"):
        issue_key(name="a\tb", tier=make_tier())
    assert not APIKey.objects.exists()
