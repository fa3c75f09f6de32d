import datetime
import json

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from generation.models import QuotaCounter, UsageRecord
from generation.policy import prepare_chat
from generation.quotas import period_end
from keys.models import PromptRule, Tier
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db

URL = "/generate-text/"
START = datetime.datetime(2026, 3, 31, 23, 0, 0, tzinfo=datetime.UTC)


def post(client, key, **body):
    body.setdefault("prompt", "hello")
    return client.post(
        URL,
        json.dumps(body),
        content_type="application/json",
        headers={"x-api-key": key},
    )


def worst_case(tier, prompt="hello", max_tokens=None) -> int:
    messages = [{"role": "user", "content": prompt}]
    return prepare_chat(
        tier=tier, messages=messages, max_tokens=max_tokens
    ).worst_case_tokens


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


class TestModels:
    def test_allowed_model_passes(self, api_client, upstream):
        _, raw_key = make_key(tier=make_tier("m", allowed_models="gpt-4o, gpt-4o-mini"))
        assert post(api_client, raw_key, model="gpt-4o").status_code == 200

    def test_other_model_is_refused(self, api_client, upstream):
        _, raw_key = make_key(tier=make_tier("m", allowed_models="gpt-4o-mini"))
        response = post(api_client, raw_key, model="gpt-4o")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "model_not_allowed"
        assert response.json()["error"]["param"] == "model"
        assert upstream.requests == []

    def test_default_model_must_be_allowed_too(self, api_client, upstream, settings):
        tier = make_tier("m", allowed_models="gpt-4o")
        _, raw_key = make_key(tier=tier)
        assert settings.PROXY_DEFAULT_MODEL != "gpt-4o"
        assert post(api_client, raw_key).status_code == 403


class TestPromptLength:
    def test_prompt_at_limit_passes(self, api_client, upstream):
        _, raw_key = make_key(tier=make_tier("short", max_prompt_chars=5))
        assert post(api_client, raw_key, prompt="abcde").status_code == 200

    def test_longer_prompt_is_refused(self, api_client, upstream):
        _, raw_key = make_key(tier=make_tier("short", max_prompt_chars=5))
        response = post(api_client, raw_key, prompt="abcdef")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "prompt_too_long"
        assert upstream.requests == []

    def test_system_text_counts_towards_length(self, api_client, upstream):
        _, raw_key = make_key(tier=make_tier("short", max_prompt_chars=5))
        response = post(api_client, raw_key, prompt="abc", system="def")
        assert response.json()["error"]["code"] == "prompt_too_long"


class TestRules:
    def test_blocked_prompt_is_refused_with_rule(self, api_client, upstream):
        rule = PromptRule.objects.create(
            name="no-passwords", pattern="password", message="Do not send passwords."
        )
        tier = make_tier("ruled", tokens_per_day=100_000)
        tier.rules.add(rule)
        _, raw_key = make_key(tier=tier)
        response = post(api_client, raw_key, prompt="my PASSWORD is hunter2")
        error = response.json()["error"]
        assert response.status_code == 400
        assert error["code"] == "prompt_rejected"
        assert error["message"] == "Do not send passwords."
        assert error["rule_id"] == rule.pk
        assert upstream.requests == []

    def test_blocked_prompt_uses_no_quota(self, api_client, upstream):
        rule = PromptRule.objects.create(name="r", pattern="secret", message="No.")
        tier = make_tier("ruled", tokens_per_day=100_000)
        tier.rules.add(rule)
        api_key, raw_key = make_key(tier=tier)
        post(api_client, raw_key, prompt="a secret")
        counters = QuotaCounter.objects.filter(api_key=api_key)
        assert sum(counter.used + counter.reserved for counter in counters) == 0
        record = UsageRecord.objects.get(api_key=api_key)
        assert record.status == UsageRecord.Status.REFUSED
        assert record.rule_id == rule.pk
        assert record.reserved_tokens == 0

    def test_rule_checks_system_text(self, api_client, upstream):
        rule = PromptRule.objects.create(name="r", pattern="secret", message="No.")
        tier = make_tier("ruled")
        tier.rules.add(rule)
        _, raw_key = make_key(tier=tier)
        response = post(api_client, raw_key, prompt="fine", system="a s\u200becret")
        assert response.json()["error"]["code"] == "prompt_rejected"

    def test_rule_of_other_tier_does_not_apply(self, api_client, upstream):
        rule = PromptRule.objects.create(name="r", pattern="secret", message="No.")
        make_tier("other").rules.add(rule)
        _, raw_key = make_key(tier=make_tier("free"))
        assert post(api_client, raw_key, prompt="a secret").status_code == 200


class TestRuleChanges:
    """Each worker keeps a tier's rules, and every change through Django reaches it."""

    @pytest.fixture
    def ruled(self, api_client, upstream):
        rule = PromptRule.objects.create(name="r", pattern="secret", message="No.")
        tier = make_tier("ruled")
        tier.rules.add(rule)
        _, raw_key = make_key(tier=tier)
        # The first request reads the rules and keeps them.
        assert self.status(api_client, raw_key) == 400
        return tier, rule, raw_key

    @staticmethod
    def status(api_client, raw_key, prompt="a secret") -> int:
        return post(api_client, raw_key, prompt=prompt).status_code

    def test_rules_are_read_once(self, api_client, ruled):
        _, _, raw_key = ruled
        with CaptureQueriesContext(connection) as queries:
            assert self.status(api_client, raw_key) == 400
        assert not [q for q in queries if "keys_promptrule" in q["sql"]]

    def test_changed_pattern_applies(self, api_client, ruled):
        _, rule, raw_key = ruled
        rule.pattern = "river"
        rule.save()
        assert self.status(api_client, raw_key) == 200
        assert self.status(api_client, raw_key, prompt="a river") == 400

    def test_disabled_rule_stops_applying(self, api_client, ruled):
        _, rule, raw_key = ruled
        rule.enabled = False
        rule.save()
        assert self.status(api_client, raw_key) == 200

    def test_removed_rule_stops_applying(self, api_client, ruled):
        tier, rule, raw_key = ruled
        tier.rules.remove(rule)
        assert self.status(api_client, raw_key) == 200

    def test_rule_removed_from_its_side_stops_applying(self, api_client, ruled):
        tier, rule, raw_key = ruled
        rule.tiers.clear()
        assert self.status(api_client, raw_key) == 200

    def test_deleted_rule_stops_applying(self, api_client, ruled):
        _, rule, raw_key = ruled
        rule.delete()
        assert self.status(api_client, raw_key) == 200

    def test_stale_tier_save_keeps_rule_change(self, api_client, ruled):
        tier, rule, raw_key = ruled
        stale = Tier.objects.get(pk=tier.pk)
        rule.enabled = False
        rule.save()

        stale.description = "edited from an older copy"
        stale.save()

        assert Tier.objects.get(pk=tier.pk).rules_version > stale.rules_version
        assert self.status(api_client, raw_key) == 200

    def test_rule_added_from_its_side_applies(self, api_client, ruled):
        tier, _, raw_key = ruled
        other = PromptRule.objects.create(name="o", pattern="river", message="No.")
        other.tiers.add(tier)
        assert self.status(api_client, raw_key, prompt="a river") == 400


class TestMaxTokensAndSystemPrompt:
    def test_max_tokens_is_lowered_to_tier_cap(self, api_client, upstream):
        _, raw_key = make_key(tier=make_tier("capped", max_tokens_cap=50))
        post(api_client, raw_key, max_tokens=500)
        assert upstream.requests[0].json["max_tokens"] == 50

    def test_missing_max_tokens_gets_tier_default(self, api_client, upstream):
        tier = make_tier("capped", max_tokens_cap=50, default_max_tokens=20)
        _, raw_key = make_key(tier=tier)
        post(api_client, raw_key)
        assert upstream.requests[0].json["max_tokens"] == 20

    def test_missing_max_tokens_without_tier_values(
        self, api_client, upstream, settings
    ):
        _, raw_key = make_key(tier=make_tier("plain"))
        post(api_client, raw_key)
        assert upstream.requests[0].json["max_tokens"] == settings.PROXY_MAX_TOKENS_CAP

    def test_tier_system_prompt_comes_first(self, api_client, upstream):
        _, raw_key = make_key(tier=make_tier("sys", system_prompt="Be polite."))
        post(api_client, raw_key, prompt="hi", system="Be brief.")
        assert upstream.requests[0].json["messages"] == [
            {"role": "system", "content": "Be polite."},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ]


class TestQuota:
    def test_request_over_daily_quota_left_is_429(self, api_client, upstream, clock):
        tier = make_tier("tiny", max_tokens_cap=10, tokens_per_day=1000)
        api_key, raw_key = make_key(tier=tier)
        QuotaCounter.objects.create(
            api_key=api_key,
            period=QuotaCounter.Period.DAY,
            period_start=START.date(),
            used=1000 - worst_case(tier) + 1,
        )
        response = post(api_client, raw_key)
        error = response.json()["error"]
        assert response.status_code == 429
        assert error["code"] == "insufficient_quota"
        assert error["quota_period"] == "day"
        assert int(response["Retry-After"]) == 3600
        assert upstream.requests == []

    def test_request_over_whole_cap_is_400(self, api_client, upstream, clock):
        tier = make_tier("tiny", max_tokens_cap=10)
        tier.tokens_per_day = worst_case(tier) - 1
        tier.save()
        _, raw_key = make_key(tier=tier)
        response = post(api_client, raw_key)
        error = response.json()["error"]
        assert response.status_code == 400
        assert "Retry-After" not in response
        assert error["code"] == "invalid_request"
        assert error["quota_period"] == "day"
        assert "waiting will not help" in error["message"]
        assert "wait until" not in error["message"]
        assert upstream.requests == []

    def test_monthly_cap_resets_on_first_of_month(self, api_client, upstream, clock):
        tier = make_tier("monthly", max_tokens_cap=10)
        tier.tokens_per_month = worst_case(tier)
        tier.save()
        _, raw_key = make_key(tier=tier)
        assert post(api_client, raw_key).status_code == 200
        refused = post(api_client, raw_key)
        assert refused.status_code == 429
        assert refused.json()["error"]["quota_resets_at"] == "2026-04-01T00:00:00+00:00"
        clock.move_to(datetime.datetime(2026, 4, 1, 0, 0, 1, tzinfo=datetime.UTC))
        assert post(api_client, raw_key).status_code == 200

    def test_settles_to_reported_usage(self, api_client, upstream, clock):
        tier = make_tier("metered", tokens_per_day=100_000, tokens_per_month=1_000_000)
        api_key, raw_key = make_key(tier=tier)
        body = post(api_client, raw_key, prompt="one two three").json()
        for counter in QuotaCounter.objects.filter(api_key=api_key):
            assert counter.reserved == 0
            assert counter.used == body["usage"]["total_tokens"]

    def test_requests_fit_until_cap_is_used(self, api_client, upstream, clock):
        tier = make_tier("metered", max_tokens_cap=10)
        # The fake upstream reports 1 prompt and 2 completion tokens for "hello",
        # so after one request the room left is one token short of a worst case.
        tier.tokens_per_day = worst_case(tier) + 2
        tier.save()
        _, raw_key = make_key(tier=tier)
        assert post(api_client, raw_key).status_code == 200
        assert post(api_client, raw_key).status_code == 429

    def test_key_cap_overrides_tier_cap(self, api_client, upstream, clock):
        tier = make_tier("big", tokens_per_day=1_000_000, max_tokens_cap=10)
        api_key, raw_key = make_key(tier=tier)
        api_key.tokens_per_day = 1
        api_key.save()
        response = post(api_client, raw_key)
        assert response.status_code == 400
        assert "whole daily token quota of 1." in response.json()["error"]["message"]

    def test_failed_upstream_call_releases_reservation(
        self, api_client, upstream, clock
    ):
        from tests.fake_upstream import Behaviour

        tier = make_tier("metered", tokens_per_day=100_000)
        api_key, raw_key = make_key(tier=tier)
        upstream.queue(Behaviour(status=500))
        assert post(api_client, raw_key).status_code == 502
        counter = QuotaCounter.objects.get(api_key=api_key, period="day")
        assert counter.reserved == 0
        assert counter.used == 0

    def test_cheap_bound_is_reserved_when_it_fits(self, api_client, upstream, clock):
        tier = make_tier("roomy", tokens_per_day=100_000, max_tokens_cap=10)
        api_key, raw_key = make_key(tier=tier)
        prompt = "hello hello hello hello"
        chat = prepare_chat(
            tier=tier, messages=[{"role": "user", "content": prompt}], max_tokens=10
        )
        assert chat.worst_case_bound > chat.worst_case_tokens

        assert post(api_client, raw_key, prompt=prompt).status_code == 200

        record = UsageRecord.objects.get(api_key=api_key)
        assert record.reserved_tokens == chat.worst_case_bound

    def test_request_with_room_loads_no_encoding(
        self, api_client, upstream, clock, monkeypatch
    ):
        def no_encoding(model):
            raise AssertionError(f"an encoding for {model} was loaded")

        monkeypatch.setattr("generation.tokens._encoding_for", no_encoding)
        tier = make_tier("roomy", tokens_per_day=100_000, tokens_per_month=10**6)
        _, raw_key = make_key(tier=tier)

        assert post(api_client, raw_key, prompt="hello").status_code == 200

    def test_exact_count_after_bound_misses(self, api_client, upstream, clock):
        tier = make_tier("snug", max_tokens_cap=10)
        prompt = "hello hello hello hello"
        chat = prepare_chat(
            tier=tier, messages=[{"role": "user", "content": prompt}], max_tokens=10
        )
        # Room for the exact worst case, not for the bound.
        tier.tokens_per_day = chat.worst_case_bound - 1
        tier.save()
        api_key, raw_key = make_key(tier=tier)

        assert post(api_client, raw_key, prompt=prompt).status_code == 200

        record = UsageRecord.objects.get(api_key=api_key)
        assert record.reserved_tokens == chat.worst_case_tokens
        counter = QuotaCounter.objects.get(api_key=api_key)
        assert counter.reserved == 0

    def test_rejected_month_gives_back_day(self, api_client, upstream, clock):
        tier = make_tier("two-caps", tokens_per_day=100_000, max_tokens_cap=10)
        # Room for one request in a new month, so that the request reaches the
        # statement that reserves both periods. This month is used up, though.
        tier.tokens_per_month = 10 * worst_case(tier)
        tier.save()
        api_key, raw_key = make_key(tier=tier)
        QuotaCounter.objects.create(
            api_key=api_key,
            period=QuotaCounter.Period.MONTH,
            period_start=START.date().replace(day=1),
            used=tier.tokens_per_month,
        )

        response = post(api_client, raw_key)

        assert response.status_code == 429
        assert response.json()["error"]["quota_period"] == "month"
        day = QuotaCounter.objects.get(api_key=api_key, period="day")
        assert (day.used, day.reserved) == (0, 0)
        assert upstream.requests == []
        record = UsageRecord.objects.get(api_key=api_key)
        assert record.status == UsageRecord.Status.REFUSED
        assert record.http_status == 429
        assert record.reason == "insufficient_quota"
        assert record.reserved_tokens == 0

    def test_both_periods_used_up_waits_for_month(self, api_client, upstream, clock):
        clock.move_to(datetime.datetime(2026, 3, 15, 12, 0, tzinfo=datetime.UTC))
        tier = make_tier("two-caps", max_tokens_cap=10)
        tier.tokens_per_day = tier.tokens_per_month = 10 * worst_case(tier)
        tier.save()
        api_key, raw_key = make_key(tier=tier)
        for period, start in [("day", 15), ("month", 1)]:
            QuotaCounter.objects.create(
                api_key=api_key,
                period=period,
                period_start=datetime.date(2026, 3, start),
                used=tier.tokens_per_day,
            )

        response = post(api_client, raw_key)

        assert response.status_code == 429
        # The day's reset alone would not let a request through.
        assert response.json()["error"]["quota_period"] == "month"
        assert int(response["Retry-After"]) == (16 * 24 + 12) * 3600

    def test_day_ends_at_utc_midnight(self):
        now = datetime.datetime(2026, 12, 31, 15, 30, tzinfo=datetime.UTC)
        assert period_end("day", now) == datetime.datetime(
            2027, 1, 1, tzinfo=datetime.UTC
        )
        assert period_end("month", now) == datetime.datetime(
            2027, 1, 1, tzinfo=datetime.UTC
        )


class TestUsageRecords:
    def test_success_is_recorded(self, api_client, upstream):
        api_key, raw_key = make_key(tier=make_tier("rec"))
        response = post(api_client, raw_key, prompt="one two")
        record = UsageRecord.objects.get(api_key=api_key)
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert record.tier == api_key.tier
        assert record.request_id == response["X-Request-ID"]
        assert record.prompt_tokens == response.json()["usage"]["prompt_tokens"]
        assert record.completion_tokens == response.json()["usage"]["completion_tokens"]
        assert record.upstream_latency_ms is not None
        assert record.settled_at is not None
        assert record.prompt_text == ""

    def test_prompt_is_stored_when_tier_opts_in(self, api_client, upstream):
        api_key, raw_key = make_key(tier=make_tier("keep", store_prompts=True))
        post(api_client, raw_key, prompt="remember me")
        assert UsageRecord.objects.get(api_key=api_key).prompt_text == "remember me"

    def test_upstream_failure_is_recorded(self, api_client, upstream):
        from tests.fake_upstream import Behaviour

        api_key, raw_key = make_key(tier=make_tier("rec"))
        upstream.queue(Behaviour(status=500))
        post(api_client, raw_key)
        record = UsageRecord.objects.get(api_key=api_key)
        assert record.status == UsageRecord.Status.FAILED
        assert record.reason == "upstream_error"
        assert record.http_status == 502

    def test_bad_input_is_recorded(self, api_client, upstream):
        api_key, raw_key = make_key(tier=make_tier("rec"))
        post(api_client, raw_key, prompt="")
        record = UsageRecord.objects.get(api_key=api_key)
        assert record.status == UsageRecord.Status.REFUSED
        assert record.reason == "invalid_request"

    def test_wrong_key_leaves_no_record(self, api_client, upstream):
        post(api_client, "sk-AAAAAAAA-" + "B" * 40)
        assert not UsageRecord.objects.exists()


class TestUsageAdmin:
    @pytest.fixture
    def admin_client(self, client):
        from django.contrib.auth.models import User

        user = User.objects.create_superuser("admin", "a@example.com", "pw-for-tests")
        client.force_login(user)
        return client

    def test_records_are_listed_and_filtered(self, admin_client, api_client, upstream):
        ok_key, ok_raw = make_key(name="ok-key", tier=make_tier("rec"))
        _, bad_raw = make_key(name="bad-key", tier=make_tier("rec"))
        post(api_client, ok_raw)
        post(api_client, bad_raw, prompt="")
        listed = admin_client.get("/admin/generation/usagerecord/")
        assert {r.api_key.name for r in listed.context["cl"].result_list} == {
            "ok-key",
            "bad-key",
        }
        refused = admin_client.get(
            "/admin/generation/usagerecord/?status__exact=refused"
        )
        assert [r.api_key.name for r in refused.context["cl"].result_list] == [
            "bad-key"
        ]
        by_key = admin_client.get(
            f"/admin/generation/usagerecord/?api_key__id__exact={ok_key.pk}"
        )
        assert [r.api_key.name for r in by_key.context["cl"].result_list] == ["ok-key"]


def test_allow_rule_ignores_system_text(api_client, upstream):
    rule = PromptRule.objects.create(
        name="recipes", pattern="recipe", action="allow", message="Recipes only."
    )
    tier = make_tier("allow-only")
    tier.rules.add(rule)
    _, raw_key = make_key(tier=tier)
    refused = post(api_client, raw_key, prompt="tell me a joke", system="recipe")
    allowed = post(api_client, raw_key, prompt="a recipe for soup")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "prompt_rejected"
    assert allowed.status_code == 200


def test_default_model_outside_allowed_list_is_invalid():
    tier = make_tier("narrow")
    tier.allowed_models = "gpt-4o-mini"
    tier.default_model = "gpt-4o"
    with pytest.raises(ValidationError) as excinfo:
        tier.full_clean()
    assert "default_model" in excinfo.value.message_dict


def test_allowed_models_are_tidied_on_clean():
    tier = make_tier("tidy")
    tier.allowed_models = " gpt-4o ,,\ngpt-4o-mini,"
    tier.full_clean()
    assert tier.allowed_models == "gpt-4o, gpt-4o-mini"


def test_health_probes_are_not_redirected(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    response = client.get("/healthz")
    assert response.status_code == 200
