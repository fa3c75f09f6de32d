import datetime

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from keys.models import APIKey, Tier
from keys.services import find_usable_key, hash_key, parse_prefix, revoke_key
from tests.factories import make_key

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
