from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from keys.models import APIKey
from keys.services import find_usable_key
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_issue_key_prints_key_alone_on_last_line():
    out, err = run("issue_key", "--name", "billing service")
    raw_key = out.strip().splitlines()[-1]
    assert find_usable_key(raw_key) is not None
    assert raw_key == out.strip()
    assert "shown once" in err


def test_issue_key_uses_given_tier_and_expiry():
    make_tier("gold")
    out, _ = run("issue_key", "--name", "n", "--tier", "gold", "--expires-in-days", "3")
    api_key = find_usable_key(out.strip())
    assert api_key.tier.name == "gold"
    assert api_key.expires_at is not None


def test_issue_key_defaults_to_default_tier():
    out, _ = run("issue_key", "--name", "n")
    assert find_usable_key(out.strip()).tier.name == "default"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--name", "n", "--tier", "nope"],
            "Tier 'nope' not found",
            id="unknown-tier",
        ),
        pytest.param(["--name", "  "], "--name must not be empty", id="blank-name"),
        pytest.param(
            ["--name", "n", "--expires-in-days", "0"], "between 1 and", id="zero-days"
        ),
        pytest.param(
            ["--name", "n", "--expires-in-days", "x"],
            "invalid int value",
            id="bad-days",
        ),
        pytest.param([], "--name", id="missing-name"),
        pytest.param(
            ["--name", "n", "--expires-in-days", "99999999999"],
            "between 1 and 36500",
            id="huge-days",
        ),
        pytest.param(["--name", "x" * 200], "maximum is 128", id="long-name"),
    ],
)
def test_issue_key_rejects_bad_arguments(args, message):
    with pytest.raises(CommandError, match=message):
        run("issue_key", *args)
    assert not APIKey.objects.exists()


def test_revoke_key_by_prefix():
    api_key, raw_key = make_key()
    out, _ = run("revoke_key", api_key.prefix)
    assert f"Revoked API key {api_key.prefix}" in out
    assert find_usable_key(raw_key) is None


def test_revoke_key_accepts_whole_key():
    api_key, raw_key = make_key()
    run("revoke_key", raw_key)
    api_key.refresh_from_db()
    assert api_key.is_revoked


def test_revoke_unknown_prefix_fails():
    with pytest.raises(CommandError, match="No API key has the prefix 'ABCDEFGH'"):
        run("revoke_key", "ABCDEFGH")


def test_revoke_twice_fails():
    api_key, _ = make_key()
    run("revoke_key", api_key.prefix)
    with pytest.raises(CommandError, match="already revoked"):
        run("revoke_key", api_key.prefix)


def test_list_keys_shows_prefix_and_state_not_secret():
    active, active_raw = make_key(name="alpha")
    revoked, _ = make_key(name="beta")
    run("revoke_key", revoked.prefix)
    out, _ = run("list_keys")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["PREFIX", "NAME", "TIER", "STATE"]
    row = next(line for line in lines if line.startswith(active.prefix))
    assert "alpha" in row
    assert "active" in row
    assert any(line.startswith(revoked.prefix) and "revoked" in line for line in lines)
    assert active_raw not in out
    assert active.hashed_key not in out


def test_list_keys_with_no_keys_says_how_to_issue():
    out, err = run("list_keys")
    assert out.splitlines() == [out.splitlines()[0]]
    assert "issue_key" in err
