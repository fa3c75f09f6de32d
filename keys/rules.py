"""Prompt rules: text normalisation, pattern validation and matching."""

import functools
import logging
import re
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import re2
from django.core.exceptions import ValidationError

from .models import PromptRule

logger = logging.getLogger(__name__)

# Longest keyword or regular expression an operator may save, in characters.
MAX_PATTERN_LENGTH = 1000

# Memory RE2 may use for one compiled regular expression (its program and its
# DFA cache), in bytes. RE2's default is 8 MiB. A quarter of that still compiles
# patterns such as \pL{100}; larger ones fail validation with "pattern too large".
REGEX_MAX_MEM = 2 * 1024 * 1024

# Compiled rules kept per process. A rule whose pattern changes gets a new entry,
# and the stale one ages out.
_COMPILED_RULE_CACHE_SIZE = 1024

# Default_Ignorable_Code_Point ranges that are not in category Cf, from Unicode
# 15.1 DerivedCoreProperties.txt: combining grapheme joiner, Hangul fillers,
# Khmer inherent vowels, Mongolian free variation selectors, variation
# selectors, and reserved or tag ranges. Every Cf character is dropped as well.
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x2065, 0x2065),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0xE0000, 0xE0FFF),
)

# Format characters (zero-width space and joiners, soft hyphen, bidi controls,
# tags), nonspacing marks and enclosing marks.
_DROPPED_CATEGORIES = frozenset({"Cf", "Mn", "Me"})

_WHITESPACE_RUN = re.compile(r"\s+")


@dataclass(frozen=True)
class RuleVerdict:
    """The outcome of checking a request's text against a tier's rules.

    When `allowed` is false, `rule` is the rule that rejected the request and its
    message is what the client sees. `reason` is a short explanation for logs.
    """

    allowed: bool
    rule: PromptRule | None = None
    reason: str = ""


def normalize(text: str) -> str:
    """Return the form of `text` that keyword rules and regex rules are matched in.

    The steps, in order:

    - NFKC, which folds fullwidth forms, mathematical alphanumerics, ligatures,
      circled and superscript letters and compatibility spaces.
    - NFD, then drop every format character (category Cf: zero-width space,
      joiners, soft hyphen, bidi controls, tags), every other default-ignorable
      code point (variation selectors, Hangul fillers) and every combining mark
      (categories Mn and Me), so accents are folded: "café" becomes "cafe".
    - Map each non-ASCII character that Unicode's confusables data (UTS #39, as
      shipped by confusable-homoglyphs) lists as a look-alike of an ASCII
      character to that character: Cyrillic "а" and Greek "ο" become "a" and
      "o".
    - Casefold, recompose with NFC and collapse each run of whitespace to one
      space. Leading and trailing whitespace is kept.

    It does not fold ASCII look-alikes into each other ("0" stays "0", "1" stays
    "1", "rn" stays "rn"), so leetspeak such as "s3cr3t" is not caught. It does
    not transliterate: Cyrillic letters that do not look Latin stay Cyrillic.
    Dropping marks also merges words in scripts that write vowels or voicing
    with them (Hebrew points, Devanagari vowel signs, Japanese dakuten), so
    keywords in those scripts match a little more broadly.
    """
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFD", text)
    text = text.translate(_translation_table())
    text = text.casefold()
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE_RUN.sub(" ", text)


@functools.cache
def _translation_table() -> dict[int, str | None]:
    """Build the str.translate table that drops ignorable characters and maps
    confusables to ASCII. Built once per process, on first use."""
    skeletons = _ascii_skeletons()
    table: dict[int, str | None] = {}
    for code_point in range(0x80, sys.maxunicode + 1):
        char = chr(code_point)
        category = unicodedata.category(char)
        if category in _DROPPED_CATEGORIES:
            table[code_point] = None
        elif char in skeletons:
            table[code_point] = skeletons[char]
        elif category[0] == "L" and char.casefold() in skeletons:
            # Casefolding runs after this table, so a letter whose lower-case
            # form is a look-alike is mapped here, before it is folded.
            table[code_point] = skeletons[char.casefold()]
    for first, last in _IGNORABLE_RANGES:
        for code_point in range(first, last + 1):
            table[code_point] = None
    return table


def _ascii_skeletons() -> dict[str, str]:
    """Map each non-ASCII character with an ASCII look-alike to that look-alike,
    in lower case.

    confusable-homoglyphs stores each confusable pair in both directions, so the
    ASCII look-alikes of a character are found among its own entries.
    """
    from confusable_homoglyphs.confusables import confusables_data

    skeletons = {}
    for char, homoglyphs in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        candidates = [entry["c"] for entry in homoglyphs]
        target = _preferred_ascii_target(candidates)
        if target is not None:
            skeletons[char] = target.lower()
    return skeletons


def _preferred_ascii_target(candidates: Iterable[str]) -> str | None:
    """Pick the ASCII look-alike to map to: a single letter if there is one, then
    a single digit, then any other printable ASCII without spaces."""
    printable = [
        candidate
        for candidate in candidates
        if candidate.isascii() and candidate.isprintable() and " " not in candidate
    ]
    if not printable:
        return None
    return min(printable, key=_target_rank)


def _target_rank(candidate: str) -> tuple[int, str]:
    if len(candidate) > 1:
        return (4, candidate)
    if candidate.islower():
        return (0, candidate)
    if candidate.isupper():
        return (1, candidate)
    if candidate.isdigit():
        return (2, candidate)
    return (3, candidate)


def validate_pattern(*, kind: str, pattern: str) -> None:
    """Raise ValidationError unless `pattern` is a usable pattern of `kind`.

    A pattern must be non-empty and at most MAX_PATTERN_LENGTH characters. A
    keyword must keep at least one character after normalize(). A regular
    expression must compile with RE2 within REGEX_MAX_MEM, and must not contain
    characters that normalize() removes or replaces, because the text it is
    searched in never contains them.
    """
    if kind not in PromptRule.Kind.values:
        raise ValidationError(
            f"Unknown rule kind {kind!r}. Use one of: "
            f"{', '.join(PromptRule.Kind.values)}.",
            code="invalid_kind",
        )
    if not pattern or not pattern.strip():
        raise ValidationError("The pattern is empty.", code="empty_pattern")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValidationError(
            f"The pattern is {len(pattern)} characters long; the maximum is "
            f"{MAX_PATTERN_LENGTH}.",
            code="pattern_too_long",
        )
    if kind == PromptRule.Kind.KEYWORD:
        _validate_keyword(pattern)
    else:
        _validate_regex(pattern)


def _validate_keyword(keyword: str) -> None:
    if not normalize(keyword).strip():
        raise ValidationError(
            "The keyword is empty after normalisation because it contains only "
            "zero-width, format or combining characters.",
            code="empty_pattern",
        )


def _validate_regex(pattern: str) -> None:
    try:
        _compile_regex(pattern)
    except re2.error as exc:
        raise ValidationError(
            f"The regular expression is invalid: {_re2_error_text(exc)}. RE2 "
            "syntax has no look-around and no backreferences.",
            code="invalid_regex",
        ) from exc

    replacements = []
    for char in dict.fromkeys(pattern):
        if char.isascii():
            continue
        normalized = normalize(char)
        if normalized != char.lower():
            advice = f"write {normalized!r}" if normalized else "remove it"
            replacements.append(f"{char!r} (U+{ord(char):04X}, {advice})")
    if replacements:
        raise ValidationError(
            "The regular expression contains characters that never occur in "
            "normalised text, so they can never match: "
            f"{', '.join(replacements)}.",
            code="unmatchable_characters",
        )


def _compile_regex(pattern: str) -> re2._Regexp:
    options = re2.Options()
    options.case_sensitive = False
    options.max_mem = REGEX_MAX_MEM
    options.never_capture = True
    options.log_errors = False
    return re2.compile(pattern, options)


def _re2_error_text(exc: re2.error) -> str:
    # The RE2 binding raises its error with the message as bytes.
    detail = exc.args[0] if exc.args else ""
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", errors="replace")
    return str(detail)


class _NormalizedText:
    """One piece of request text, normalised, with its UTF-8 bytes for RE2."""

    def __init__(self, text: str) -> None:
        self.text = normalize(text)
        self._encoded: bytes | None = None

    @property
    def encoded(self) -> bytes:
        # Searching bytes spares RE2's binding from encoding the text once per rule.
        if self._encoded is None:
            self._encoded = self.text.encode("utf-8")
        return self._encoded


@dataclass(frozen=True)
class _CompiledRule:
    keyword: str = ""
    regex: re2._Regexp | None = None
    error: str = ""

    def matches(self, texts: list[_NormalizedText]) -> bool:
        if self.regex is not None:
            return any(self.regex.search(text.encoded) for text in texts)
        return any(self.keyword in text.text for text in texts)


@functools.lru_cache(maxsize=_COMPILED_RULE_CACHE_SIZE)
def _compile_rule(rule_pk: int | None, kind: str, pattern: str) -> _CompiledRule:
    try:
        validate_pattern(kind=kind, pattern=pattern)
    except ValidationError as exc:
        error = " ".join(exc.messages)
        logger.error("Prompt rule %s has an invalid pattern: %s", rule_pk, error)
        return _CompiledRule(error=error)
    if kind == PromptRule.Kind.REGEX:
        return _CompiledRule(regex=_compile_regex(pattern))
    return _CompiledRule(keyword=normalize(pattern).strip())


def _compiled(rule: PromptRule) -> _CompiledRule:
    return _compile_rule(rule.pk, rule.kind, rule.pattern)


def check_rules(rules: Iterable[PromptRule], texts: Iterable[str]) -> RuleVerdict:
    """Check every piece of text a client sent against a tier's prompt rules.

    Disabled rules are ignored, and rules are tried in order of name. Each rule
    is matched against each text separately after normalize(): a keyword rule
    matches when its normalised keyword, without surrounding whitespace, is a
    substring, and a regex rule matches when RE2 finds it (case-insensitively).

    The first matching block rule rejects the request. Then, if there are allow
    rules, at least one of them must match some text, or the request is rejected
    with the first allow rule. A rule whose stored pattern is invalid (saved
    without validation) fails closed: a block rule rejects every request, and an
    allow rule never matches.
    """
    enabled = sorted((rule for rule in rules if rule.enabled), key=_rule_name)
    if not enabled:
        return RuleVerdict(allowed=True)
    normalized = [_NormalizedText(text) for text in texts if text]

    for rule in enabled:
        if rule.action != PromptRule.Action.BLOCK:
            continue
        compiled = _compiled(rule)
        if compiled.error:
            reason = f"block rule {rule.name!r} has an invalid pattern"
            return RuleVerdict(allowed=False, rule=rule, reason=reason)
        if compiled.matches(normalized):
            reason = f"matched block rule {rule.name!r}"
            return RuleVerdict(allowed=False, rule=rule, reason=reason)

    allow_rules = [rule for rule in enabled if rule.action == PromptRule.Action.ALLOW]
    if not allow_rules:
        return RuleVerdict(allowed=True)
    for rule in allow_rules:
        compiled = _compiled(rule)
        if not compiled.error and compiled.matches(normalized):
            return RuleVerdict(allowed=True, reason=f"matched allow rule {rule.name!r}")
    names = ", ".join(repr(rule.name) for rule in allow_rules)
    return RuleVerdict(
        allowed=False,
        rule=allow_rules[0],
        reason=f"matched no allow rule (tried {names})",
    )


def _rule_name(rule: PromptRule) -> str:
    return rule.name
