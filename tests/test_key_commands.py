import csv
import datetime
import json
from io import StringIO

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.utils import timezone

from keys.models import APIKey, Tier
from keys.services import find_usable_key, hash_key, revoke_key
from tests.factories import make_key, make_tier

pytestmark = pytest.mark.django_db

START = datetime.datetime(2026, 5, 4, 9, 0, tzinfo=datetime.UTC)


def run(*args, **options) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


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
        pytest.param(
            ["--name", "a\nb"],
            r"--name: 'a\\nb' contains the control character '\\n'",
            id="newline-in-name",
        ),
        pytest.param(
            ["--name", "a\x1b[31mb"],
            "contains the control character",
            id="escape-in-name",
        ),
        pytest.param(
            ["--name", "a\u2028b"],
            "contains the control character",
            id="line-separator-in-name",
        ),
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


@pytest.mark.parametrize("command", ["revoke_key", "rotate_key", "extend_key"])
@pytest.mark.parametrize(
    "mangle",
    [lambda key: key + "x", lambda key: key[:-1], lambda key: key[3:]],
    ids=["extra-character", "missing-character", "without-sk"],
)
def test_mistyped_whole_key_is_not_echoed(command, mangle):
    _, raw_key = make_key()
    secret = raw_key.split("-")[2]
    options = ["--days", "1"] if command == "extend_key" else []
    with pytest.raises(CommandError) as excinfo:
        run(command, mangle(raw_key), *options)
    assert secret[:8] not in str(excinfo.value)
    assert "manage.py list_keys" in str(excinfo.value)


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


def test_list_keys_empty_hints_issue_key():
    out, err = run("list_keys")
    assert out.splitlines() == [out.splitlines()[0]]
    assert "issue_key" in err


def test_issue_key_json_prints_one_object():
    make_tier("gold")
    out, _ = run(
        "issue_key", "--name", "n", "--tier", "gold", "--expires-in-days", "2", "--json"
    )
    record = json.loads(out)
    api_key = find_usable_key(record["key"])
    assert set(record) == {"prefix", "key", "name", "tier", "expires_at"}
    assert record["prefix"] == api_key.prefix
    assert record["name"] == "n"
    assert record["tier"] == "gold"
    assert datetime.datetime.fromisoformat(record["expires_at"]) == api_key.expires_at


def test_issue_key_batch_prints_csv():
    out, err = run("issue_key", "--name", "worker", "--count", "3")
    rows = list(csv.DictReader(StringIO(out)))
    assert [row["name"] for row in rows] == ["worker-1", "worker-2", "worker-3"]
    for row in rows:
        assert find_usable_key(row["key"]).prefix == row["prefix"]
    assert {row["tier"] for row in rows} == {"default"}
    assert "Issued 3 keys" in err
    assert "shown once" in err


def test_issue_key_batch_prints_json_list():
    out, _ = run("issue_key", "--name", "worker", "--count", "2", "--format", "json")
    records = json.loads(out)
    assert [record["name"] for record in records] == ["worker-1", "worker-2"]
    assert all(find_usable_key(record["key"]) for record in records)


def test_issue_key_single_csv_has_header_and_row():
    out, _ = run("issue_key", "--name", "n", "--format", "csv")
    [row] = list(csv.DictReader(StringIO(out)))
    assert find_usable_key(row["key"]).name == "n"


def test_issue_key_quiet_prints_only_key():
    out, err = run("issue_key", "--name", "n", verbosity=0)
    assert find_usable_key(out.strip()) is not None
    assert len(out.splitlines()) == 1
    assert err == ""


def test_issue_key_dry_run_issues_nothing():
    out, _ = run("issue_key", "--name", "n", "--count", "4", "--dry-run")
    assert "would issue 4 key(s) named 'n-1' to 'n-4'" in out
    assert "sk-" not in out
    assert not APIKey.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--count", "0"], "between 1 and 1000, not 0", id="zero-count"),
        pytest.param(["--count", "1001"], "between 1 and 1000", id="huge-count"),
        pytest.param(
            ["--json", "--format", "csv"], "contradict each other", id="json-and-csv"
        ),
        pytest.param(["--format", "xml"], "invalid choice", id="unknown-format"),
    ],
)
def test_issue_key_rejects_bad_batch_arguments(args, message):
    with pytest.raises(CommandError, match=message):
        run("issue_key", "--name", "n", *args)
    assert not APIKey.objects.exists()


def test_issue_key_batch_name_counts_suffix():
    with pytest.raises(CommandError, match="131 characters long; the maximum is 128"):
        run("issue_key", "--name", "x" * 127, "--count", "100")


def test_rotate_key_prints_new_key_last():
    api_key, old_key = make_key(name="svc")
    out, err = run("rotate_key", api_key.prefix)
    new_key = out.strip().splitlines()[-1]
    assert find_usable_key(new_key).pk == api_key.pk
    assert find_usable_key(old_key) is None
    assert "no longer works" in err
    assert "shown once" in err


def test_rotate_key_grace_keeps_old_key(clock):
    api_key, old_key = make_key()
    _, err = run("rotate_key", api_key.prefix, "--grace-minutes", "15")
    assert "works until 2026-05-04 09:15:00 UTC" in err
    assert find_usable_key(old_key) is not None
    clock.shift(datetime.timedelta(minutes=15))
    assert find_usable_key(old_key) is None


def test_rotate_key_json_names_grace_end(clock):
    api_key, _ = make_key()
    out, _ = run("rotate_key", api_key.prefix, "--grace-minutes", "5", "--json")
    record = json.loads(out)
    assert find_usable_key(record["key"]).pk == api_key.pk
    assert record["prefix"] == api_key.prefix
    assert record["previous_key_expires_at"] == "2026-05-04T09:05:00+00:00"


def test_rotate_key_quiet_prints_only_key():
    api_key, _ = make_key()
    out, err = run("rotate_key", api_key.prefix, verbosity=0)
    assert len(out.splitlines()) == 1
    assert find_usable_key(out.strip()) is not None
    assert err == ""


def test_rotate_key_dry_run_changes_nothing():
    api_key, old_key = make_key()
    out, _ = run("rotate_key", api_key.prefix, "--dry-run")
    assert "would rotate API key" in out
    assert "sk-" not in out
    assert APIKey.objects.get(pk=api_key.pk).hashed_key == hash_key(old_key)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["ABCDEFGH"], "No API key has the prefix 'ABCDEFGH'", id="unknown"
        ),
        pytest.param(
            ["{prefix}", "--grace-minutes", "-1"], "between 0 and 10080", id="negative"
        ),
        pytest.param(
            ["{prefix}", "--grace-minutes", "10081"], "not 10081", id="too-long"
        ),
        pytest.param(["{prefix}", "--grace-minutes", "x"], "invalid int", id="not-int"),
    ],
)
def test_rotate_key_rejects_bad_arguments(args, message):
    api_key, old_key = make_key()
    args = [arg.format(prefix=api_key.prefix) for arg in args]
    with pytest.raises(CommandError, match=message):
        run("rotate_key", *args)
    assert find_usable_key(old_key) is not None


def test_rotate_revoked_key_fails():
    api_key, _ = make_key()
    revoke_key(api_key=api_key)
    with pytest.raises(CommandError, match="is revoked; only an active key"):
        run("rotate_key", api_key.prefix)


def test_revoke_key_dry_run_keeps_key():
    api_key, raw_key = make_key()
    out, _ = run("revoke_key", api_key.prefix, "--dry-run")
    assert f"would revoke API key {api_key.prefix}" in out
    assert find_usable_key(raw_key) is not None


def test_revoke_key_quiet_prints_nothing():
    api_key, raw_key = make_key()
    out, err = run("revoke_key", api_key.prefix, verbosity=0)
    assert out == ""
    assert err == ""
    assert find_usable_key(raw_key) is None


def make_keys_in_every_state() -> dict[str, APIKey]:
    gold = make_tier("gold")
    active, _ = make_key(name="active-one", tier=gold)
    expired, _ = make_key(name="expired-one")
    APIKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now())
    revoked, _ = make_key(name="revoked-one", tier=gold)
    revoke_key(api_key=revoked)
    return {"active": active, "expired": expired, "revoked": revoked}


@pytest.mark.parametrize(
    ("args", "names"),
    [
        pytest.param(["--state", "active"], ["active-one"], id="active"),
        pytest.param(["--state", "expired"], ["expired-one"], id="expired"),
        pytest.param(["--state", "revoked"], ["revoked-one"], id="revoked"),
        pytest.param(["--tier", "gold"], ["active-one", "revoked-one"], id="tier"),
        pytest.param(
            ["--tier", "gold", "--state", "revoked"], ["revoked-one"], id="both"
        ),
    ],
)
def test_list_keys_filters(args, names):
    make_keys_in_every_state()
    out, _ = run("list_keys", *args)
    rows = out.splitlines()[1:]
    assert [row.split()[1] for row in rows] == names


def test_list_keys_json_has_no_secret():
    keys = make_keys_in_every_state()
    out, _ = run("list_keys", "--json")
    records = json.loads(out)
    by_name = {record["name"]: record for record in records}
    assert by_name["revoked-one"]["state"] == "revoked"
    assert by_name["revoked-one"]["revoked_at"] is not None
    assert by_name["expired-one"]["state"] == "expired"
    assert by_name["active-one"]["tier"] == "gold"
    assert by_name["active-one"]["prefix"] == keys["active"].prefix
    assert "key" not in by_name["active-one"]
    assert "hashed_key" not in by_name["active-one"]
    assert keys["active"].hashed_key not in out


def test_list_keys_json_empty_is_empty_list():
    out, err = run("list_keys", "--json")
    assert json.loads(out) == []
    assert err == ""


def test_list_keys_filter_without_match_says_so():
    make_keys_in_every_state()
    out, err = run("list_keys", "--tier", "default", "--state", "revoked")
    assert len(out.splitlines()) == 1
    assert "No API key matches the filters." in err


def test_list_keys_unknown_tier_fails():
    with pytest.raises(CommandError, match="Tier 'nope' not found. Known tiers:"):
        run("list_keys", "--tier", "nope")


def test_list_keys_uses_one_query(django_assert_num_queries):
    make_keys_in_every_state()
    with django_assert_num_queries(1):
        run("list_keys")


def test_expire_stale_keys_expires_unused(clock):
    stale, stale_raw = make_key(name="stale")
    clock.shift(datetime.timedelta(days=40))
    fresh, fresh_raw = make_key(name="fresh")
    out, _ = run("expire_stale_keys", "--unused-days", "30")
    assert stale.prefix in out
    assert fresh.prefix not in out
    assert "Expired 1 API key(s) unused for 30 days." in out
    assert find_usable_key(stale_raw) is None
    assert find_usable_key(fresh_raw) is not None


def test_expire_stale_keys_dry_run_lists_and_keeps(clock):
    stale, stale_raw = make_key(name="stale")
    clock.shift(datetime.timedelta(days=40))
    out, _ = run("expire_stale_keys", "--unused-days", "30", "--dry-run")
    assert stale.prefix in out
    assert "last used never" in out
    assert "would expire 1 API key(s)" in out
    assert find_usable_key(stale_raw) is not None


def test_expire_stale_keys_quiet_prints_nothing(clock):
    _, raw_key = make_key()
    clock.shift(datetime.timedelta(days=40))
    out, err = run("expire_stale_keys", "--unused-days", "30", verbosity=0)
    assert out == ""
    assert err == ""
    assert find_usable_key(raw_key) is None


def test_expire_stale_keys_reports_none_found():
    make_key()
    out, _ = run("expire_stale_keys", "--unused-days", "30")
    assert "No active API key has been unused for 30 days." in out


@pytest.mark.parametrize("days", ["0", "36501"])
def test_expire_stale_keys_rejects_bad_days(days):
    with pytest.raises(CommandError, match="--unused-days must be between 1 and"):
        run("expire_stale_keys", "--unused-days", days)


def test_extend_key_moves_expiry(clock):
    api_key, _ = make_key(expires_in_days=2)
    out, _ = run("extend_key", api_key.prefix, "--days", "30")
    assert "now expires at 2026-06-05 09:00 UTC" in out
    assert APIKey.objects.get(pk=api_key.pk).expires_at == START + datetime.timedelta(
        days=32
    )


def test_extend_key_dry_run_changes_nothing(clock):
    api_key, _ = make_key(expires_in_days=2)
    out, _ = run("extend_key", api_key.prefix, "--days", "30", "--dry-run")
    assert "would expire at 2026-06-05 09:00 UTC" in out
    assert APIKey.objects.get(pk=api_key.pk).expires_at == START + datetime.timedelta(
        days=2
    )


def test_extend_key_without_expiry_changes_nothing():
    api_key, _ = make_key()
    out, _ = run("extend_key", api_key.prefix, "--days", "30")
    assert "does not expire" in out
    assert APIKey.objects.get(pk=api_key.pk).expires_at is None


def test_extend_revoked_key_fails():
    api_key, _ = make_key(expires_in_days=2)
    revoke_key(api_key=api_key)
    with pytest.raises(CommandError, match="revocation is final"):
        run("extend_key", api_key.prefix, "--days", "30")


def test_tier_create_sets_given_fields():
    out, _ = run(
        "tier",
        "create",
        "gold",
        "--rate-limits",
        "10/m, 1000/d",
        "--tokens-per-day",
        "5000",
        "--allowed-models",
        "gpt-4o, gpt-4o-mini",
        "--max-choices",
        "2",
        "--store-prompts",
    )
    tier = Tier.objects.get(name="gold")
    assert tier.rate_limits == "10/m, 1000/d"
    assert tier.tokens_per_day == 5000
    assert tier.allowed_model_list == ["gpt-4o", "gpt-4o-mini"]
    assert tier.max_choices == 2
    assert tier.store_prompts is True
    assert tier.tokens_per_month is None
    assert "Created tier 'gold'." in out


def test_tier_update_changes_only_given_fields():
    make_tier("gold", rate_limits="10/m", tokens_per_day=5000, store_prompts=True)
    out, _ = run(
        "tier",
        "update",
        "gold",
        "--tokens-per-day",
        "none",
        "--system-prompt",
        "Be brief.",
        "--no-store-prompts",
    )
    tier = Tier.objects.get(name="gold")
    assert tier.tokens_per_day is None
    assert tier.system_prompt == "Be brief."
    assert tier.store_prompts is False
    assert tier.rate_limits == "10/m"
    assert "tokens_per_day: 5000 -> None" in out


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["tier", "-v", "0", "create", "silver"], id="before-action"),
        pytest.param(["tier", "create", "silver", "-v", "0"], id="after-action"),
        pytest.param(
            ["tier", "create", "silver", "--verbosity", "0", "--traceback"],
            id="long-options-after-action",
        ),
    ],
)
def test_tier_create_takes_common_options(args):
    out, _ = run(*args)
    assert out == ""
    assert Tier.objects.filter(name="silver").exists()


def test_tier_show_takes_verbosity_after_action():
    make_tier("gold", rate_limits="10/m")
    out, _ = run("tier", "show", "gold", "--json", "-v", "0")
    assert json.loads(out)["rate_limits"] == "10/m"


def test_tier_verbosity_after_action_wins():
    out, _ = run("tier", "-v", "0", "create", "silver", "-v", "1")
    assert "Created tier 'silver'." in out


def test_tier_update_can_clear_text_field():
    make_tier("gold", rate_limits="10/m")
    run("tier", "update", "gold", "--rate-limits", "")
    assert Tier.objects.get(name="gold").rate_limits == ""


def test_tier_update_without_options_changes_nothing():
    make_tier("gold", rate_limits="10/m")
    out, _ = run("tier", "update", "gold")
    assert "No field of tier 'gold' changed." in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--rate-limits", "lots"],
            "--rate-limits: 'lots' is not a valid rate",
            id="bad-rate",
        ),
        pytest.param(
            ["--max-choices", "0"],
            "--max-choices: Ensure this value",
            id="zero-choices",
        ),
        pytest.param(
            ["--max-choices", "9999999999999"],
            "--max-choices: Ensure this value",
            id="huge-choices",
        ),
        pytest.param(
            ["--tokens-per-day", "-5"],
            "--tokens-per-day: Ensure this value",
            id="negative-cap",
        ),
        pytest.param(
            ["--tokens-per-day", "many"],
            "expected a whole number or 'none'",
            id="not-a-number",
        ),
        pytest.param(
            ["--default-model", "m" * 200],
            "--default-model: Ensure this value has at most",
            id="long-model",
        ),
        pytest.param(
            ["--default-model", "none"],
            "--default-model: 'none' is not a model name",
            id="none-model",
        ),
        pytest.param(
            ["--allowed-models", " , ,"],
            "--allowed-models: ' , ,' names no model",
            id="separators-only",
        ),
        pytest.param(
            ["--default-model", " gpt-4o"],
            "--default-model: ' gpt-4o' is not a valid model name",
            id="space-in-default-model",
        ),
        pytest.param(
            ["--default-model", "gpt\x01"],
            "--default-model: 'gpt\\\\x01' is not a valid model name",
            id="control-in-default-model",
        ),
        pytest.param(
            ["--allowed-models", "gpt-4o, gpt 4o mini"],
            "--allowed-models: 'gpt 4o mini' is not a valid model name",
            id="space-in-allowed-model",
        ),
        pytest.param(
            ["--allowed-models", "m" * 200],
            "--allowed-models: 'm{200}' is not a valid model name",
            id="long-allowed-model",
        ),
    ],
)
def test_tier_update_rejects_invalid_values(args, message):
    make_tier("gold", rate_limits="10/m", tokens_per_day=5000)
    with pytest.raises(CommandError, match=message):
        run("tier", "update", "gold", *args)
    tier = Tier.objects.get(name="gold")
    assert tier.rate_limits == "10/m"
    assert tier.tokens_per_day == 5000
    assert tier.max_choices == 1


@pytest.mark.parametrize("name", ["Gold Tier", "gold\nsilver", "gold\n"])
def test_tier_create_rejects_bad_name(name):
    with pytest.raises(CommandError, match="NAME: Enter a valid"):
        run("tier", "create", name)
    assert not Tier.objects.filter(name=name).exists()


def test_tier_update_clears_default_model_with_empty_value():
    make_tier("gold", default_model="gpt-4o")
    run("tier", "update", "gold", "--default-model", "")
    assert Tier.objects.get(name="gold").default_model == ""


def test_tier_create_existing_fails():
    make_tier("gold")
    with pytest.raises(CommandError, match="already exists. Change it with"):
        run("tier", "create", "gold")


def test_tier_update_unknown_fails():
    with pytest.raises(CommandError, match="Tier 'nope' not found"):
        run("tier", "update", "nope", "--max-choices", "2")


def test_tier_dry_run_saves_nothing():
    make_tier("gold", rate_limits="10/m")
    out, _ = run("tier", "update", "gold", "--rate-limits", "20/m", "--dry-run")
    assert "Dry run: would update tier 'gold'." in out
    assert "rate_limits: '10/m' -> '20/m'" in out
    assert Tier.objects.get(name="gold").rate_limits == "10/m"
    run("tier", "create", "silver", "--dry-run")
    assert not Tier.objects.filter(name="silver").exists()


def test_tier_dry_run_still_validates():
    with pytest.raises(CommandError, match="not a valid rate"):
        run("tier", "create", "silver", "--rate-limits", "x", "--dry-run")


def test_tier_quiet_prints_nothing():
    out, err = run("tier", "create", "silver", "--max-choices", "3", verbosity=0)
    assert out == ""
    assert err == ""
    assert Tier.objects.get(name="silver").max_choices == 3


def test_tier_show_json():
    make_tier("gold", rate_limits="10/m", tokens_per_month=9)
    out, _ = run("tier", "show", "gold", "--json")
    record = json.loads(out)
    assert record["name"] == "gold"
    assert record["rate_limits"] == "10/m"
    assert record["tokens_per_month"] == 9
    assert record["tokens_per_day"] is None
    assert record["rules"] == []


def test_tier_show_table():
    make_tier("gold", rate_limits="10/m")
    out, _ = run("tier", "show", "gold")
    fields = {}
    for line in out.splitlines():
        field, _, value = line.partition(" ")
        fields[field] = value.strip()
    assert fields["rate_limits"] == "10/m"
    assert fields["tokens_per_day"] == "none"
    assert fields["description"] == ""


def test_tier_show_table_escapes_control_characters():
    make_tier("gold", description="two\nlines \x1b[31mred", system_prompt="Be brief.")
    out, _ = run("tier", "show", "gold")
    [description] = [
        line for line in out.splitlines() if line.startswith("description")
    ]
    assert "\x1b" not in out
    assert description.endswith("'two\\nlines \\x1b[31mred'")
    assert "  Be brief." in out


def test_tier_requires_subcommand():
    with pytest.raises(CommandError, match="required"):
        run("tier")
