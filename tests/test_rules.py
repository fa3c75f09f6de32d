import time

import pytest
from django.core import checks
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import DatabaseError

from keys.checks import check_prompt_rule_patterns
from keys.models import PromptRule
from keys.rules import MAX_PATTERN_LENGTH, check_rules, normalize, validate_pattern
from tests.servers import run_in_project


def make_rule(
    pattern: str,
    *,
    name: str = "rule",
    kind: str = PromptRule.Kind.KEYWORD,
    action: str = PromptRule.Action.BLOCK,
    enabled: bool = True,
) -> PromptRule:
    return PromptRule(
        name=name,
        kind=kind,
        pattern=pattern,
        action=action,
        message=f"Rejected by {name}.",
        enabled=enabled,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("se\u200bcret", "secret", id="zero-width-space"),
        pytest.param("se\u200dc\u200cret", "secret", id="zero-width-joiners"),
        pytest.param("sec\u00adret", "secret", id="soft-hyphen"),
        pytest.param("sec\u2060ret\ufeff", "secret", id="word-joiner-and-bom"),
        pytest.param("\u202esecret\u202c", "secret", id="bidi-override"),
        pytest.param("secr\ufe0fet", "secret", id="variation-selector"),
        pytest.param("\u0455\u0435\u0441r\u0435t", "secret", id="cyrillic-lower"),
        pytest.param("\u0421\u041e\u0420\u0415", "cope", id="cyrillic-upper"),
        pytest.param("\u03bfpen", "open", id="greek-omicron"),
        pytest.param("\u03a1\u0391SS", "pass", id="greek-upper"),
        pytest.param("\uff53\uff45\uff43\uff52\uff45\uff54", "secret", id="fullwidth"),
        pytest.param("\U0001d42c\U0001d41e\U0001d41c", "sec", id="math-bold"),
        pytest.param("SeCrEt", "secret", id="mixed-case"),
        pytest.param("STRASSE stra\u00dfe", "strasse strasse", id="sharp-s"),
        pytest.param("Caf\u00e9 nai\u0308ve", "cafe naive", id="accents"),
        pytest.param("s\u0336e\u0336c\u0336", "sec", id="strikethrough-marks"),
        pytest.param("a \t\n\u00a0\u3000 b", "a b", id="whitespace-run"),
        pytest.param("\ufb01le", "file", id="ligature"),
    ],
)
def test_normalize_folds(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("s3cr3t", id="leetspeak"),
        pytest.param("0 and 1", id="ascii-digits"),
        pytest.param("\u0436\u0438\u0437\u043d\u044c", id="cyrillic-word"),
        pytest.param("\u65e5\u672c", id="cjk"),
    ],
)
def test_normalize_keeps(text):
    assert normalize(text) == text


def test_normalize_same_for_both_cases_in_cyrillic():
    assert normalize("\u0416\u0418\u0417\u041d\u042c") == normalize(
        "\u0436\u0438\u0437\u043d\u044c"
    )


def test_normalize_is_idempotent():
    text = "\u0405\u0435\u0441\u200b\u0420\u0415\u0422 \uff53\u00e9 \u03a1\u0391SS"
    assert normalize(normalize(text)) == normalize(text)


def test_no_rules_allow():
    verdict = check_rules([], ["anything"])
    assert verdict.allowed
    assert verdict.rule is None


def test_keyword_block_rule_rejects():
    rule = make_rule("secret", name="no-secrets")
    verdict = check_rules([rule], ["Tell me the SECRET plan"])
    assert not verdict.allowed
    assert verdict.rule == rule
    assert verdict.reason == "matched block rule 'no-secrets'"


def test_keyword_block_rule_passes_other_text():
    verdict = check_rules([make_rule("secret")], ["Tell me a story"])
    assert verdict.allowed


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "what is the s\u200be\u200bc\u200br\u200be\u200bt", id="zero-width"
        ),
        pytest.param("\u0455\u0435\u0441r\u0435t please", id="cyrillic"),
        pytest.param("\uff33\uff25\uff23\uff32\uff25\uff34", id="fullwidth"),
        pytest.param("S\u0415CR\u0395T", id="cyrillic-and-greek-upper"),
    ],
)
def test_keyword_block_rule_sees_through_disguise(text):
    verdict = check_rules([make_rule("secret")], [text])
    assert not verdict.allowed


def test_keyword_with_homoglyphs_matches_plain_text():
    rule = make_rule("\u0455\u0435\u0441r\u0435t")
    assert not check_rules([rule], ["a secret"]).allowed


def test_greek_capitals_match_latin_keyword():
    # Greek capital upsilon looks like "Y", but its lower case looks like "u".
    rule = make_rule("paypal")
    verdict = check_rules([rule], ["\u03a1\u0391\u03a5\u03a1\u0391L login"])
    assert not verdict.allowed


def test_keyword_matches_any_text():
    verdict = check_rules([make_rule("secret")], ["hello", "", "the secret"])
    assert not verdict.allowed


def test_keyword_surrounding_whitespace_is_ignored():
    verdict = check_rules([make_rule("  secret\n")], ["secret."])
    assert not verdict.allowed


def test_regex_block_rule_rejects():
    rule = make_rule(r"\bpass(word)?\s*[:=]", name="no-passwords", kind="regex")
    verdict = check_rules([rule], ["my PASSWORD: hunter2"])
    assert not verdict.allowed
    assert verdict.rule == rule
    assert verdict.reason == "matched block rule 'no-passwords'"


def test_regex_block_rule_passes_other_text():
    rule = make_rule(r"\bpass(word)?\s*[:=]", kind="regex")
    assert check_rules([rule], ["a passing grade"]).allowed


def test_regex_searches_normalised_text():
    rule = make_rule(r"sec\s?ret", kind="regex")
    verdict = check_rules([rule], ["\u0405\u0415\u0421\u200bR\u0415\u0422"])
    assert not verdict.allowed


def test_allow_rule_that_matches_allows():
    rule = make_rule("recipe", action="allow", name="cooking-only")
    verdict = check_rules([rule], ["a cake RECIPE please"])
    assert verdict.allowed
    assert verdict.rule is None
    assert verdict.reason == "matched allow rule 'cooking-only'"


def test_allow_rule_that_does_not_match_rejects():
    first = make_rule("recipe", action="allow", name="a-cooking")
    second = make_rule("ingredient", action="allow", name="b-cooking")
    verdict = check_rules([second, first], ["write a poem"])
    assert not verdict.allowed
    assert verdict.rule == first
    assert "no allow rule" in verdict.reason


def test_any_allow_rule_is_enough():
    rules = [
        make_rule("recipe", action="allow", name="a"),
        make_rule("ingredient", action="allow", name="b"),
    ]
    assert check_rules(rules, ["which ingredient?"]).allowed


def test_allow_rules_reject_request_without_text():
    rule = make_rule("recipe", action="allow")
    assert not check_rules([rule], []).allowed


def test_block_rule_wins_over_allow_rule():
    block = make_rule("poison", name="z-block")
    allow = make_rule("recipe", action="allow", name="a-allow")
    verdict = check_rules([allow, block], ["a poison recipe"])
    assert not verdict.allowed
    assert verdict.rule == block


def test_first_block_rule_by_name_rejects():
    later = make_rule("cake", name="b-rule")
    earlier = make_rule("cake", name="a-rule")
    verdict = check_rules([later, earlier], ["cake"])
    assert verdict.rule == earlier


@pytest.mark.parametrize(
    "action",
    [
        pytest.param(PromptRule.Action.BLOCK, id="block"),
        pytest.param(PromptRule.Action.ALLOW, id="allow"),
    ],
)
def test_disabled_rule_is_ignored(action):
    rule = make_rule("secret", action=action, enabled=False)
    assert check_rules([rule], ["nothing to see"]).allowed
    assert check_rules([rule], ["a secret"]).allowed


def test_changed_pattern_takes_effect():
    rule = make_rule("first")
    assert not check_rules([rule], ["first"]).allowed
    rule.pattern = "second"
    assert check_rules([rule], ["first"]).allowed
    assert not check_rules([rule], ["second"]).allowed


def test_invalid_stored_block_rule_rejects_everything():
    rule = make_rule("(unclosed", kind="regex", name="broken")
    verdict = check_rules([rule], ["harmless"])
    assert not verdict.allowed
    assert verdict.rule == rule
    assert "invalid pattern" in verdict.reason


def test_invalid_stored_allow_rule_never_matches():
    rule = make_rule("(unclosed", kind="regex", action="allow")
    assert not check_rules([rule], ["(unclosed"]).allowed


def test_catastrophic_pattern_runs_in_linear_time():
    rule = make_rule("(a+)+$", kind="regex", name="nested-plus")
    text = "a" * 100_000 + "b"
    started = time.perf_counter()
    verdict = check_rules([rule], [text])
    elapsed = time.perf_counter() - started
    assert verdict.allowed
    # A backtracking engine needs time exponential in the number of "a"s here.
    # RE2 is linear, so one second is only a guard against a hang.
    assert elapsed < 1.0


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        pytest.param("keyword", "secret", id="keyword"),
        pytest.param(
            "keyword", "\u0436\u0438\u0437\u043d\u044c", id="cyrillic-keyword"
        ),
        pytest.param("regex", r"\bsecret\b", id="regex"),
        pytest.param("regex", r"(a+)+$", id="nested-repetition"),
        pytest.param("regex", "SECRET", id="upper-case-regex"),
        pytest.param("regex", "x" * MAX_PATTERN_LENGTH, id="longest"),
    ],
)
def test_validate_pattern_accepts(kind, pattern):
    validate_pattern(kind=kind, pattern=pattern)


@pytest.mark.parametrize(
    ("kind", "pattern", "code", "fragment"),
    [
        pytest.param("keyword", "", "empty_pattern", "empty", id="empty-keyword"),
        pytest.param("keyword", "  \n", "empty_pattern", "empty", id="blank-keyword"),
        pytest.param(
            "keyword", "\u200b\u0301", "empty_pattern", "zero-width", id="invisible"
        ),
        pytest.param("regex", "", "empty_pattern", "empty", id="empty-regex"),
        pytest.param(
            "regex", "(unclosed", "invalid_regex", "missing )", id="unclosed-group"
        ),
        pytest.param(
            "regex", r"(?<=a)b", "invalid_regex", "look-around", id="look-behind"
        ),
        pytest.param(
            "regex", r"(a)\1", "invalid_regex", "invalid escape", id="backreference"
        ),
        pytest.param(
            "regex", r"\pL{300}", "invalid_regex", "too large", id="too-much-memory"
        ),
        pytest.param(
            "regex", "caf\u00e9", "unmatchable_characters", "'e'", id="accent"
        ),
        pytest.param(
            "regex", "\u0455ecret", "unmatchable_characters", "'s'", id="homoglyph"
        ),
        pytest.param(
            "keyword",
            "x" * (MAX_PATTERN_LENGTH + 1),
            "pattern_too_long",
            "1001",
            id="too-long",
        ),
        pytest.param("glob", "*", "invalid_kind", "glob", id="unknown-kind"),
    ],
)
def test_validate_pattern_rejects(kind, pattern, code, fragment):
    with pytest.raises(ValidationError) as caught:
        validate_pattern(kind=kind, pattern=pattern)
    assert caught.value.code == code
    assert fragment in caught.value.messages[0]


@pytest.mark.django_db
def test_check_flags_broken_rule():
    broken = PromptRule.objects.create(
        name="broken", kind="regex", pattern="(unclosed", message="No."
    )
    errors = check_prompt_rule_patterns(app_configs=None)
    assert [error.id for error in errors] == ["keys.E001"]
    assert errors[0].level == checks.ERROR
    assert errors[0].obj == broken
    assert "'broken'" in errors[0].msg
    assert "missing )" in errors[0].hint


@pytest.mark.django_db
def test_check_is_silent_for_valid_rules():
    PromptRule.objects.create(name="kw", pattern="secret", message="No.")
    PromptRule.objects.create(name="re", kind="regex", pattern=r"\d{16}", message="No.")
    assert check_prompt_rule_patterns(app_configs=None) == []


@pytest.mark.django_db
def test_check_skips_disabled_rules():
    PromptRule.objects.create(
        name="off", kind="regex", pattern="(", message="No.", enabled=False
    )
    assert check_prompt_rule_patterns(app_configs=None) == []


@pytest.mark.django_db
def test_check_command_reports_broken_rule():
    PromptRule.objects.create(name="broken", kind="regex", pattern="(", message="No.")
    with pytest.raises(SystemCheckError, match="keys.E001"):
        call_command("check")


def test_check_is_silent_without_tables(monkeypatch):
    def fail(*args, **kwargs):
        raise DatabaseError("no such table: keys_promptrule")

    monkeypatch.setattr(PromptRule.objects, "filter", fail)
    assert check_prompt_rule_patterns(app_configs=None) == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("bo\u0001mb", id="control-character"),
        pytest.param("bo\u007fmb", id="delete-character"),
        pytest.param("bo\ue000mb", id="private-use"),
        pytest.param("bo\u0378mb", id="unassigned"),
        pytest.param("bo\u2800mb", id="braille-blank"),
        pytest.param("bo\ufffcmb", id="object-replacement"),
        pytest.param("\u0299\u1d0f\u1d0d\u0299", id="small-capitals"),
    ],
)
def test_invisible_and_small_capital_tricks_are_folded(text):
    assert normalize(text) == "bomb"


def test_whitespace_controls_become_spaces():
    assert normalize("line\nbreak\ttab") == "line break tab"


def test_allow_rule_must_match_allow_texts():
    rule = PromptRule(
        pk=1, name="recipes", pattern="recipe", action="allow", message="Recipes only."
    )
    verdict = check_rules(
        [rule], ["tell me a joke", "recipe"], allow_texts=["tell me a joke"]
    )
    assert verdict.allowed is False
    assert verdict.rule == rule


def test_folding_table_frees_confusables_data():
    # A separate process, so that nothing else has imported the data module.
    script = (
        "import sys\n"
        "from keys.normalization import normalize\n"
        "assert normalize('\\u0440in') == 'pin'\n"
        "print('confusable_homoglyphs.confusables' in sys.modules)\n"
    )
    result = run_in_project(["-c", script], PROXY_READ_DOTENV="off")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
