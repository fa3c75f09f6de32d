import json

import pytest
from django.contrib.auth.models import User

from keys.models import PromptRule, Tier
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "pw-for-tests")
    client.force_login(user)
    return client


def try_prompt(admin_client, tier, **data):
    url = f"/admin/keys/tier/{tier.pk}/try-prompt/"
    return admin_client.post(url, {"prompt": "", "system": "", "model": "", **data})


def test_tier_page_links_to_try_prompt(admin_client):
    tier = make_tier("linked")
    page = admin_client.get(f"/admin/keys/tier/{tier.pk}/change/").content.decode()
    assert f"/admin/keys/tier/{tier.pk}/try-prompt/" in page


def test_try_prompt_names_blocking_rule(admin_client, upstream):
    rule = PromptRule.objects.create(name="no-pins", pattern="pin", message="No PINs.")
    tier = make_tier("ruled")
    tier.rules.add(rule)
    response = try_prompt(admin_client, tier, prompt="my P\u0406N is 1234")
    decision = response.context["decision"]
    assert decision.allowed is False
    assert decision.code == "prompt_rejected"
    assert decision.rule == rule
    assert "No PINs." in response.content.decode()
    assert upstream.requests == []


def test_try_prompt_allows_and_shows_cost(admin_client):
    tier = make_tier("open", max_tokens_cap=50, rate_limits="5/m")
    response = try_prompt(admin_client, tier, prompt="hello")
    decision = response.context["decision"]
    assert decision.allowed is True
    assert decision.chat.max_tokens == 50
    assert "rate limit 5/m" in response.content.decode()


def test_try_prompt_requires_prompt(admin_client):
    tier = make_tier("open")
    response = try_prompt(admin_client, tier)
    assert response.context["decision"] is None
    assert response.context["form"].errors["prompt"]


def test_try_prompt_needs_staff_login(client):
    tier = make_tier("open")
    response = client.post(f"/admin/keys/tier/{tier.pk}/try-prompt/", {"prompt": "x"})
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_key_page_shows_usage_against_caps(admin_client, api_client, upstream):
    api_key, raw_key = make_key(tier=make_tier("metered", tokens_per_day=10_000))
    api_client.post(
        "/generate-text/",
        json.dumps({"prompt": "one two three"}),
        content_type="application/json",
        headers={"x-api-key": raw_key},
    )
    page = admin_client.get(f"/admin/keys/apikey/{api_key.pk}/change/").content.decode()
    # The fake upstream reports 3 prompt and 4 completion tokens for this prompt.
    assert "Today: 7 tokens of 10000" in page
    assert "This month: 7 tokens" in page


def test_key_override_fields_are_editable(admin_client):
    api_key, _ = make_key(tier=make_tier("plain"))
    response = admin_client.post(
        f"/admin/keys/apikey/{api_key.pk}/change/",
        {
            "name": api_key.name,
            "tier": api_key.tier.pk,
            "expires_at_0": "",
            "expires_at_1": "",
            "rate_limits": "2/m",
            "tokens_per_day": "500",
            "tokens_per_month": "",
        },
    )
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.rate_limits == "2/m"
    assert api_key.tokens_per_day == 500


def test_key_override_rejects_bad_rate(admin_client):
    api_key, _ = make_key(tier=make_tier("plain"))
    response = admin_client.post(
        f"/admin/keys/apikey/{api_key.pk}/change/",
        {
            "name": api_key.name,
            "tier": api_key.tier.pk,
            "expires_at_0": "",
            "expires_at_1": "",
            "rate_limits": "often",
        },
    )
    assert response.status_code == 200
    assert "not a valid rate" in response.content.decode()


def test_try_prompt_unknown_tier_is_404(admin_client):
    response = admin_client.get("/admin/keys/tier/abc/try-prompt/")
    assert response.status_code == 404


def test_try_prompt_blank_prompt_is_form_error(admin_client):
    tier = make_tier("open")
    response = try_prompt(admin_client, tier, prompt="   ")
    assert response.context["decision"] is None
    assert response.context["form"].errors["prompt"]


def test_admin_rejects_key_expiring_in_past(admin_client):
    tier = make_tier("plain")
    response = admin_client.post(
        "/admin/keys/apikey/add/",
        {
            "name": "late",
            "tier": tier.pk,
            "expires_at_0": "2000-01-01",
            "expires_at_1": "00:00:00",
        },
    )
    assert response.status_code == 200
    assert "The expiry time is in the past" in response.content.decode()


def test_key_and_tier_pages_show_usage_charts(admin_client, api_client, upstream):
    api_key, raw_key = make_key(tier=make_tier("charted"))
    api_client.post(
        "/generate-text/",
        json.dumps({"prompt": "hi"}),
        content_type="application/json",
        headers={"x-api-key": raw_key},
    )
    key_page = admin_client.get(f"/admin/keys/apikey/{api_key.pk}/change/")
    tier_page = admin_client.get(f"/admin/keys/tier/{api_key.tier.pk}/change/")
    assert key_page.content.decode().count('class="usage-chart"') == 2
    assert tier_page.content.decode().count('class="usage-chart"') == 2


def test_tier_with_keys_is_not_deleted(admin_client):
    tier = make_tier("in-use")
    make_key(tier=tier)
    delete_url = f"/admin/keys/tier/{tier.pk}/delete/"

    page = admin_client.get(delete_url).content.decode()
    assert "<title>Cannot delete tier" in page
    admin_client.post(delete_url, {"post": "yes"})

    assert Tier.objects.filter(pk=tier.pk).exists()
