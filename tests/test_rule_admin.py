import pytest
from django.contrib.auth.models import User

from keys.models import PromptRule
from keys.rules import tier_rules
from tests.factories import make_tier

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "pw-for-tests")
    client.force_login(user)
    return client


def make_rule(name: str = "no-secrets", **fields) -> PromptRule:
    defaults = {"pattern": "secret", "message": "Secrets are not allowed."}
    return PromptRule.objects.create(name=name, **{**defaults, **fields})


def rule_form(**fields) -> dict:
    data = {
        "name": "no-cards",
        "kind": "regex",
        "pattern": r"\b\d{16}\b",
        "action": "block",
        "message": "Card numbers are not allowed.",
        "enabled": "on",
    }
    data.update(fields)
    return data


def tier_form(tier, rule_links: list[dict]) -> dict:
    """The tier change form as the browser posts it, with one inline row per
    entry of `rule_links` (keys: id, promptrule, DELETE)."""
    data = {
        "name": tier.name,
        "description": tier.description,
        "default_model": "",
        "allowed_models": "",
        "system_prompt": "",
        "rate_limits": "",
        "tokens_per_day": "",
        "tokens_per_month": "",
        "max_prompt_chars": "",
        "max_tokens_cap": "",
        "default_max_tokens": "",
        "max_choices": "1",
        "Tier_rules-TOTAL_FORMS": str(len(rule_links)),
        "Tier_rules-INITIAL_FORMS": str(sum("id" in link for link in rule_links)),
        "Tier_rules-MIN_NUM_FORMS": "0",
        "Tier_rules-MAX_NUM_FORMS": "1000",
    }
    for index, link in enumerate(rule_links):
        data[f"Tier_rules-{index}-tier"] = str(tier.pk)
        data[f"Tier_rules-{index}-id"] = str(link.get("id", ""))
        data[f"Tier_rules-{index}-promptrule"] = str(link["promptrule"])
        if link.get("DELETE"):
            data[f"Tier_rules-{index}-DELETE"] = "on"
    return data


def test_tier_page_shows_rules_inline(admin_client):
    tier = make_tier("gold")
    tier.rules.add(make_rule(pattern="password"))
    page = admin_client.get(f"/admin/keys/tier/{tier.pk}/change/").content.decode()
    assert 'id="Tier_rules-group"' in page
    assert "Prompt rules" in page
    assert "no-secrets (block)" in page
    assert "<p>password</p>" in page
    assert 'id="change_id_Tier_rules-0-promptrule"' in page
    assert 'id="add_id_Tier_rules-0-promptrule"' in page


def test_tier_page_groups_fields(admin_client):
    tier = make_tier("gold")
    page = admin_client.get(f"/admin/keys/tier/{tier.pk}/change/").content.decode()
    assert ">Limits</h2>" in page
    assert ">Privacy</h2>" in page
    assert 'name="tokens_per_day"' in page
    assert 'name="store_prompts"' in page


def test_tier_add_page_renders(admin_client):
    response = admin_client.get("/admin/keys/tier/add/")
    assert response.status_code == 200
    assert 'id="Tier_rules-group"' in response.content.decode()


def test_tier_inline_attaches_rule(admin_client):
    tier = make_tier("gold")
    rule = make_rule()
    response = admin_client.post(
        f"/admin/keys/tier/{tier.pk}/change/",
        tier_form(tier, [{"promptrule": rule.pk}]),
    )
    assert response.status_code == 302
    assert list(tier.rules.all()) == [rule]


def test_tier_inline_detaches_rule_and_keeps_it(admin_client):
    tier = make_tier("gold")
    rule = make_rule()
    tier.rules.add(rule)
    link = tier.rules.through.objects.get(tier=tier, promptrule=rule)
    response = admin_client.post(
        f"/admin/keys/tier/{tier.pk}/change/",
        tier_form(tier, [{"id": link.pk, "promptrule": rule.pk, "DELETE": True}]),
    )
    assert response.status_code == 302
    assert list(tier.rules.all()) == []
    assert PromptRule.objects.filter(pk=rule.pk).exists()


def test_tier_inline_changes_reach_workers(admin_client):
    tier = make_tier("gold")
    rule = make_rule()
    # A worker has read the tier's rules before the change.
    assert tier_rules(tier) == []

    admin_client.post(
        f"/admin/keys/tier/{tier.pk}/change/",
        tier_form(tier, [{"promptrule": rule.pk}]),
    )
    tier.refresh_from_db()
    assert tier_rules(tier) == [rule]

    link = tier.rules.through.objects.get(tier=tier, promptrule=rule)
    admin_client.post(
        f"/admin/keys/tier/{tier.pk}/change/",
        tier_form(tier, [{"id": link.pk, "promptrule": rule.pk, "DELETE": True}]),
    )
    tier.refresh_from_db()
    assert tier_rules(tier) == []


def test_tier_inline_rejects_duplicate_rule(admin_client):
    tier = make_tier("gold")
    rule = make_rule()
    response = admin_client.post(
        f"/admin/keys/tier/{tier.pk}/change/",
        tier_form(tier, [{"promptrule": rule.pk}, {"promptrule": rule.pk}]),
    )
    assert response.status_code == 200
    assert "duplicate" in response.content.decode()
    assert tier.rules.count() == 0


def test_rule_autocomplete_finds_rule_for_inline(admin_client):
    make_rule()
    make_rule(name="no-cards", pattern="card")
    response = admin_client.get(
        "/admin/autocomplete/",
        {
            "app_label": "keys",
            "model_name": "tier_rules",
            "field_name": "promptrule",
            "term": "card",
        },
    )
    assert response.status_code == 200
    names = [result["text"] for result in response.json()["results"]]
    assert names == ["no-cards (block)"]


def test_rule_admin_creates_valid_rule(admin_client):
    response = admin_client.post("/admin/keys/promptrule/add/", rule_form())
    assert response.status_code == 302
    assert PromptRule.objects.get().pattern == r"\b\d{16}\b"


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        pytest.param("(unclosed", "missing )", id="unclosed-group"),
        pytest.param(r"(?=x)", "look-around", id="look-ahead"),
        pytest.param("caf\u00e9", "never occur", id="accent"),
    ],
)
def test_rule_admin_shows_invalid_regex(admin_client, pattern, fragment):
    response = admin_client.post(
        "/admin/keys/promptrule/add/", rule_form(pattern=pattern)
    )
    assert response.status_code == 200
    assert fragment in response.content.decode()
    assert not PromptRule.objects.exists()


def test_rule_admin_rejects_empty_keyword(admin_client):
    response = admin_client.post(
        "/admin/keys/promptrule/add/", rule_form(kind="keyword", pattern="\u200b")
    )
    assert response.status_code == 200
    assert "empty after normalisation" in response.content.decode()
    assert not PromptRule.objects.exists()


def test_rule_admin_list_counts_tiers(admin_client):
    rule = make_rule()
    make_tier("gold").rules.add(rule)
    make_tier("silver").rules.add(rule)
    page = admin_client.get("/admin/keys/promptrule/").content.decode()
    assert "no-secrets" in page
    assert '<td class="field-tier_count">2</td>' in page


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("no-secrets", "no-secrets", id="name"),
        pytest.param("hunter2", "no-passwords", id="pattern"),
        pytest.param("card numbers", "no-cards", id="message"),
    ],
)
def test_rule_admin_search(admin_client, query, expected):
    make_rule()
    make_rule(name="no-passwords", pattern="hunter2")
    make_rule(name="no-cards", message="Card numbers are not allowed.")
    page = admin_client.get("/admin/keys/promptrule/", {"q": query}).content.decode()
    names = {"no-secrets", "no-passwords", "no-cards"}
    for name in names - {expected}:
        assert f">{name}</a>" not in page
    assert f">{expected}</a>" in page


def test_rule_admin_filters_by_action(admin_client):
    make_rule()
    make_rule(name="cooking-only", pattern="recipe", action="allow")
    page = admin_client.get("/admin/keys/promptrule/?action__exact=allow")
    content = page.content.decode()
    assert ">cooking-only</a>" in content
    assert ">no-secrets</a>" not in content


def test_rule_change_page_lists_tiers(admin_client):
    rule = make_rule()
    make_tier("gold").rules.add(rule)
    page = admin_client.get(f"/admin/keys/promptrule/{rule.pk}/change/")
    assert "gold" in page.content.decode()
