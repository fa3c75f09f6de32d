import datetime
import html
import re

import pytest
import time_machine
from django.contrib.auth.models import User

from generation.models import UsageRecord
from keys.key_admin import APIKeyAdmin
from keys.models import APIKey
from keys.services import find_usable_key, revoke_key, rotate_key
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db

KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9]{8}-[A-Za-z0-9]{40}")
START = datetime.datetime(2026, 5, 4, 9, 0, tzinfo=datetime.UTC)
LIST_URL = "/admin/keys/apikey/"


def run_action(client, action: str, keys: list[APIKey], **fields) -> str:
    """Run an admin action on `keys`, confirmed, and return the page it redirects to."""
    data = {
        "action": action,
        "_selected_action": [key.pk for key in keys],
        "confirm": "yes",
    }
    response = client.post(LIST_URL, {**data, **fields}, follow=True)
    assert response.status_code == 200
    return html.unescape(response.content.decode())


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
        {"action": "revoke_selected", "_selected_action": [gone.pk], "confirm": "yes"},
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
        {
            "action": "revoke_selected",
            "_selected_action": [api_key.pk],
            "confirm": "yes",
        },
        follow=True,
    )
    assert "Revoked 1 API key(s)." in response.content.decode()
    assert find_usable_key(raw_key) is None


def _hidden_fields(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)


@pytest.mark.parametrize("action", ["revoke_selected", "rotate_selected"])
def test_action_waits_for_confirmation(admin_client, action):
    api_key, raw_key = make_key(name="kept")
    first = admin_client.post(
        LIST_URL, {"action": action, "_selected_action": [api_key.pk]}
    )
    page = first.content.decode()
    assert first.status_code == 200
    assert "kept" in page
    assert "No, take me back" in page
    assert find_usable_key(raw_key) is not None


def test_confirmation_form_carries_grace(admin_client):
    api_key, old_key = make_key()
    first = admin_client.post(
        LIST_URL,
        {
            "action": "rotate_selected",
            "_selected_action": [api_key.pk],
            "grace_minutes": "10",
        },
    )
    fields = _hidden_fields(first.content.decode())
    data: dict[str, list[str]] = {}
    for name, value in fields:
        data.setdefault(name, []).append(value)
    assert data["confirm"] == ["yes"]

    response = admin_client.post(LIST_URL, data, follow=True)

    page = html.unescape(response.content.decode())
    [new_key] = KEY_PATTERN.findall(page)
    assert find_usable_key(new_key).pk == api_key.pk
    # The grace period given on the first page applies.
    assert find_usable_key(old_key).pk == api_key.pk


def test_revoked_key_is_read_only_in_admin(admin_client):
    api_key, _ = make_key(name="frozen")
    admin_client.post(
        "/admin/keys/apikey/",
        {
            "action": "revoke_selected",
            "_selected_action": [api_key.pk],
            "confirm": "yes",
        },
    )
    page = admin_client.get(f"/admin/keys/apikey/{api_key.pk}/change/").content.decode()
    assert 'name="name"' not in page


def test_rotate_action_shows_new_key_once(admin_client):
    api_key, old_key = make_key(name="rotated")
    page = run_action(admin_client, "rotate_selected", [api_key])
    [new_key] = KEY_PATTERN.findall(page)
    assert "Copy it now" in page
    assert "The old key no longer works." in page
    assert find_usable_key(new_key).pk == api_key.pk
    assert find_usable_key(old_key) is None
    assert new_key not in admin_client.get(LIST_URL).content.decode()
    detail = admin_client.get(f"{LIST_URL}{api_key.pk}/change/").content.decode()
    assert new_key not in detail


def test_rotate_action_with_grace_keeps_old_key(admin_client):
    api_key, old_key = make_key()
    with time_machine.travel(START, tick=False) as clock:
        page = run_action(
            admin_client, "rotate_selected", [api_key], grace_minutes="10"
        )
        assert "The old key works until 2026-05-04 09:10:00 UTC." in page
        assert find_usable_key(old_key) is not None
        clock.shift(datetime.timedelta(minutes=10))
        assert find_usable_key(old_key) is None


@pytest.mark.parametrize(
    ("grace", "message"),
    [
        pytest.param("soon", "must be a whole number, not 'soon'", id="not-a-number"),
        pytest.param("-1", "must be between 0 and 10080, not -1", id="negative"),
    ],
)
def test_rotate_action_rejects_bad_grace(admin_client, grace, message):
    api_key, old_key = make_key()
    page = run_action(admin_client, "rotate_selected", [api_key], grace_minutes=grace)
    assert f"Grace minutes (rotate) {message}" in page
    assert KEY_PATTERN.search(page) is None
    assert find_usable_key(old_key) is not None


def test_rotate_action_skips_revoked_key(admin_client):
    revoked, _ = make_key(name="gone")
    revoke_key(api_key=revoked)
    active, _ = make_key(name="here")
    page = run_action(admin_client, "rotate_selected", [revoked, active])
    assert f"The API key {revoked.prefix} is revoked" in page
    [new_key] = KEY_PATTERN.findall(page)
    assert find_usable_key(new_key).pk == active.pk


def test_extend_action_defaults_to_30_days(admin_client):
    with time_machine.travel(START, tick=False):
        api_key, _ = make_key(expires_in_days=2)
        page = run_action(admin_client, "extend_selected", [api_key])
    assert "Extended the expiry of 1 API key(s) by 30 days" in page
    stored = APIKey.objects.get(pk=api_key.pk)
    assert stored.expires_at == START + datetime.timedelta(days=32)


def test_extend_action_takes_days_and_revives_expired_key(admin_client):
    with time_machine.travel(START, tick=False) as clock:
        api_key, raw_key = make_key(expires_in_days=1)
        clock.shift(datetime.timedelta(days=5))
        run_action(admin_client, "extend_selected", [api_key], days="7")
        assert find_usable_key(raw_key) is not None
    stored = APIKey.objects.get(pk=api_key.pk)
    assert stored.expires_at == START + datetime.timedelta(days=12)


def test_extend_action_reports_keys_it_skips(admin_client):
    endless, _ = make_key(name="endless")
    revoked, _ = make_key(name="revoked", expires_in_days=3)
    revoke_key(api_key=revoked)
    page = run_action(admin_client, "extend_selected", [endless, revoked])
    assert f"Unchanged because they do not expire: {endless.prefix}." in page
    assert f"The API key {revoked.prefix} is revoked; revocation is final." in page
    assert "Extended the expiry of 0 API key(s)" in page
    assert APIKey.objects.get(pk=endless.pk).expires_at is None


def test_extend_action_rejects_bad_days(admin_client):
    api_key, _ = make_key(expires_in_days=2)
    before = APIKey.objects.get(pk=api_key.pk).expires_at
    page = run_action(admin_client, "extend_selected", [api_key], days="0")
    assert "Days to extend must be between 1 and 36500, not 0." in page
    assert APIKey.objects.get(pk=api_key.pk).expires_at == before


def test_list_page_offers_lifecycle_actions(admin_client):
    make_key()
    page = admin_client.get(LIST_URL).content.decode()
    assert 'value="rotate_selected"' in page
    assert 'value="extend_selected"' in page
    assert 'name="days"' in page
    assert 'name="grace_minutes"' in page


@pytest.fixture
def keys_by_last_use() -> dict[str, APIKey]:
    """Keys created 200 days before START and last used at different times."""
    keys = {}
    with time_machine.travel(START - datetime.timedelta(days=200), tick=False):
        for name in ["used-3d", "used-20d", "used-100d", "never-used"]:
            keys[name], _ = make_key(name=name)
    with time_machine.travel(START, tick=False):
        keys["new-never-used"], _ = make_key(name="new-never-used")
    for name, days in [("used-3d", 3), ("used-20d", 20), ("used-100d", 100)]:
        used_at = START - datetime.timedelta(days=days)
        APIKey.objects.filter(pk=keys[name].pk).update(last_used_at=used_at)
    return keys


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("7d", {"used-3d"}, id="last-7-days"),
        pytest.param("30d", {"used-3d", "used-20d"}, id="last-30-days"),
        pytest.param("not-90d", {"used-100d", "never-used"}, id="not-in-90-days"),
        pytest.param("never", {"never-used", "new-never-used"}, id="never"),
    ],
)
def test_last_used_filter(admin_client, keys_by_last_use, value, expected):
    with time_machine.travel(START, tick=False):
        response = admin_client.get(LIST_URL, {"last_used": value})
    listed = {key.name for key in response.context["cl"].result_list}
    assert listed == expected


def post_change_form(client, api_key: APIKey, **fields):
    data = {
        "name": api_key.name,
        "tier": api_key.tier.pk,
        "expires_at_0": "",
        "expires_at_1": "",
        "rate_limits": "",
        "tokens_per_day": "",
        "tokens_per_month": "",
    }
    return client.post(f"{LIST_URL}{api_key.pk}/change/", {**data, **fields})


def test_change_form_edit_keeps_key_working(admin_client):
    api_key, raw_key = make_key(name="before")
    response = post_change_form(admin_client, api_key, name="after")
    assert response.status_code == 302
    assert find_usable_key(raw_key).name == "after"


def test_change_form_keeps_rotation_made_while_open(admin_client, monkeypatch):
    api_key, old_key = make_key(name="before")
    rotated = {}
    save_model = APIKeyAdmin.save_model

    def rotate_then_save(self, request, obj, form, change):
        # The form's object was read before this rotation, as when another
        # operator rotates the key while the form is open.
        rotated["key"] = rotate_key(api_key=APIKey.objects.get(pk=obj.pk))
        save_model(self, request, obj, form, change)

    monkeypatch.setattr(APIKeyAdmin, "save_model", rotate_then_save)
    response = post_change_form(admin_client, api_key, name="after")
    assert response.status_code == 302
    assert find_usable_key(rotated["key"]).name == "after"
    assert find_usable_key(old_key) is None


def test_admin_cannot_delete_key(admin_client):
    api_key, _ = make_key(name="kept")
    UsageRecord.objects.create(
        api_key=api_key, tier=api_key.tier, endpoint="/generate-text/"
    )
    change_url = f"{LIST_URL}{api_key.pk}/change/"
    delete_url = f"{LIST_URL}{api_key.pk}/delete/"

    change_page = admin_client.get(change_url).content.decode()
    assert delete_url not in change_page
    list_page = admin_client.get(LIST_URL).content.decode()
    assert "delete_selected" not in list_page
    assert admin_client.get(delete_url).status_code == 403
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    admin_client.post(
        LIST_URL,
        {"action": "delete_selected", "_selected_action": [api_key.pk], "post": "yes"},
    )

    assert APIKey.objects.filter(pk=api_key.pk).exists()
    assert UsageRecord.objects.filter(api_key=api_key).count() == 1


def test_admin_rejects_control_characters_in_name(admin_client):
    tier = make_tier("silver")
    response = admin_client.post(
        "/admin/keys/apikey/add/",
        {"name": "a\nb", "tier": tier.pk, "expires_at_0": "", "expires_at_1": ""},
    )
    assert response.status_code == 200
    assert "contains the control character" in html.unescape(response.content.decode())
    assert not APIKey.objects.exists()
