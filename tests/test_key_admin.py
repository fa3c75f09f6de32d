import re

import pytest
from django.contrib.auth.models import User

from keys.models import APIKey
from keys.services import find_usable_key
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "pw-for-tests")
    client.force_login(user)
    return client


def test_admin_creation_shows_plaintext_once(admin_client):
    tier = make_tier("silver")
    response = admin_client.post(
        "/admin/keys/apikey/add/",
        {"name": "from admin", "tier": tier.pk, "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )
    assert response.status_code == 200
    page = response.content.decode()
    match = re.search(r"sk-[A-Za-z0-9]{8}-[A-Za-z0-9]{40}", page)
    assert match is not None
    api_key = find_usable_key(match.group(0))
    assert api_key.name == "from admin"
    assert api_key.tier == tier
    assert APIKey.objects.count() == 1

    detail = admin_client.get(
        f"/admin/keys/apikey/{api_key.pk}/change/"
    ).content.decode()
    assert match.group(0) not in detail
    assert api_key.hashed_key not in detail


def test_admin_list_shows_prefix_never_hash(admin_client):
    api_key, raw_key = make_key(name="listed")
    page = admin_client.get("/admin/keys/apikey/").content.decode()
    assert api_key.prefix in page
    assert "listed" in page
    assert api_key.hashed_key not in page
    assert raw_key not in page


def test_admin_search_and_state_filter(admin_client):
    make_key(name="findme")
    gone, _ = make_key(name="revoked-one")
    admin_client.post(
        "/admin/keys/apikey/",
        {"action": "revoke_selected", "_selected_action": [gone.pk]},
    )
    found = admin_client.get("/admin/keys/apikey/?q=findme").content.decode()
    assert "findme" in found
    assert "revoked-one" not in found
    revoked = admin_client.get("/admin/keys/apikey/?state=revoked").content.decode()
    assert "revoked-one" in revoked
    assert "findme" not in revoked


def test_admin_revoke_action(admin_client):
    api_key, raw_key = make_key()
    response = admin_client.post(
        "/admin/keys/apikey/",
        {"action": "revoke_selected", "_selected_action": [api_key.pk]},
        follow=True,
    )
    assert "Revoked 1 API key(s)." in response.content.decode()
    assert find_usable_key(raw_key) is None


def test_revoked_key_is_read_only_in_admin(admin_client):
    api_key, _ = make_key(name="frozen")
    admin_client.post(
        "/admin/keys/apikey/",
        {"action": "revoke_selected", "_selected_action": [api_key.pk]},
    )
    page = admin_client.get(f"/admin/keys/apikey/{api_key.pk}/change/").content.decode()
    assert 'name="name"' not in page
