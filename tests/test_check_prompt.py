from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from keys.models import PromptRule
from tests.factories import make_tier

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = StringIO()
    call_command("check_prompt", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def run_refused(*args) -> str:
    out = StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command("check_prompt", *args, stdout=out, stderr=StringIO())
    assert excinfo.value.returncode == 1
    return out.getvalue()


def test_allowed_prompt_reports_cost_and_limits(upstream):
    make_tier("basic", rate_limits="5/m", tokens_per_day=1000, max_tokens_cap=100)
    out = run("--tier", "basic", "hello there")
    assert out.splitlines()[0] == "ALLOWED"
    assert "max_tokens sent: 100" in out
    assert "rate limit 5/m" in out
    assert "1000 tokens per day" in out
    assert upstream.requests == []


def test_quiet_output_is_the_verdict_only(upstream):
    rule = PromptRule.objects.create(name="no-secrets", pattern="secret", message="No.")
    make_tier("quiet").rules.add(rule)
    make_tier("open")

    assert run("--tier", "open", "-v", "0", "hello") == "ALLOWED\n"
    refused = run_refused("--tier", "quiet", "-v", "0", "a secret")
    assert refused == "REFUSED (prompt_rejected)\n"
    invalid = run_refused("--tier", "open", "-v", "0", "   ")
    assert invalid == "REFUSED (invalid_request)\n"


def test_blocked_prompt_names_rule(upstream):
    rule = PromptRule.objects.create(
        name="no-secrets", pattern="secret", message="Keep secrets out."
    )
    make_tier("ruled").rules.add(rule)
    out = run_refused("--tier", "ruled", "my s\u0435cret")  # Cyrillic e
    assert out.splitlines()[0] == "REFUSED (prompt_rejected)"
    assert "Client would see: Keep secrets out." in out
    assert f"Rule: #{rule.pk} no-secrets" in out
    assert "no-secrets" in out.splitlines()[2]
    assert upstream.requests == []


def test_disallowed_model_is_reported():
    make_tier("mini", allowed_models="gpt-4o-mini")
    out = run_refused("--tier", "mini", "--model", "gpt-4o", "hi")
    assert "REFUSED (model_not_allowed)" in out
    assert "allowed models" in out


def test_too_long_prompt_is_reported():
    make_tier("short", max_prompt_chars=3)
    out = run_refused("--tier", "short", "hello")
    assert "REFUSED (prompt_too_long)" in out


def test_worst_case_over_cap_is_reported():
    make_tier("tiny", tokens_per_day=10, max_tokens_cap=100)
    out = run_refused("--tier", "tiny", "hello")
    assert "REFUSED (invalid_request)" in out
    assert "daily cap of 10" in out


def test_unknown_tier_is_an_error():
    with pytest.raises(CommandError, match="Tier 'nope' not found"):
        run("--tier", "nope", "hi")


def test_bad_max_tokens_is_an_error():
    make_tier("basic")
    with pytest.raises(CommandError, match="--max-tokens must be 1 or more"):
        run("--tier", "basic", "--max-tokens", "0", "hi")


def test_blank_prompt_is_refused_as_invalid():
    make_tier("basic")
    out = run_refused("--tier", "basic", "   ")
    assert "REFUSED (invalid_request)" in out
    assert "prompt: This field may not be blank." in out


def test_quota_message_matches_api():
    make_tier("tiny", tokens_per_day=10, max_tokens_cap=100)
    out = run_refused("--tier", "tiny", "hello")
    assert "whole daily token quota of 10." in out
