"""Prompt rules: text normalisation, pattern validation and matching."""

import functools
import logging
import re
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

import re2
from django.core.exceptions import ValidationError

from .models import PromptRule

logger = logging.getLogger(__name__)

# Maximum length of a keyword or regular expression, in characters.
MAX_PATTERN_LENGTH = 1000

# Memory RE2 may use for one compiled regular expression (its program and its
# DFA cache), in bytes. RE2's default is 8 MiB. A quarter of that still compiles
# patterns such as \pL{100}; larger ones fail validation with "pattern too large".
REGEX_MAX_MEM = 2 * 1024 * 1024

# Compiled rules kept per process. A rule whose pattern changes gets a new entry,
# and the stale one ages out.
_COMPILED_RULE_CACHE_SIZE = 1024

# Default-ignorable code points outside category Cf, which is dropped whole:
# Unicode's Other_Default_Ignorable_Code_Point and Variation_Selector ranges
# (combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian
# and other variation selectors, reserved and tag ranges).
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
    message is returned to the client. `reason` is a short explanation for logs.
    """

    allowed: bool
    rule: PromptRule | None = None
    reason: str = ""


def normalize(text: str) -> str:
    """Fold `text` into the form that rules are matched in and validated against.

    The steps, in order:

    - NFKC, which folds fullwidth forms, mathematical alphanumerics, ligatures,
      circled and superscript letters and compatibility spaces, then NFD.
    - Casefold.
    - Drop every format character (category Cf: zero-width space, joiners, soft
      hyphen, bidi controls, tags), every other default-ignorable code point
      (variation selectors, Hangul fillers) and every combining mark (categories
      Mn and Me), so accents are folded: "Café" becomes "cafe".
    - Map each non-ASCII character that Unicode's confusables data (UTS #39, as
      shipped by confusable-homoglyphs) lists as a look-alike of an ASCII
      character to that character, in lower case: Cyrillic "а" and Greek "ο"
      become "a" and "o".
    - Recompose with NFC and collapse each run of whitespace to one space.
      Leading and trailing whitespace is kept.

    It does not fold ASCII look-alikes into each other ("0" stays "0", "1" stays
    "1", "rn" stays "rn"), so leetspeak such as "s3cr3t" is not caught. It does
    not transliterate: letters that look like no ASCII character stay as they
    are. Dropping marks also merges words in scripts that write vowels or voicing
    with them (Hebrew points, Devanagari vowel signs, Japanese dakuten), so
    keywords in those scripts match a little more broadly.

    Casefolding first keeps the result the same for upper and lower case in
    every script, but it loses upper-case look-alikes whose lower case looks
    different (Greek "Ν" looks like "N", "ν" like "v"). check_rules() therefore
    also matches in a skeleton that maps before it casefolds.
    """
    decomposed = _decompose(text)
    folded = decomposed.casefold().translate(_translation_table())
    return _recompose(folded)


def _match_forms(text: str) -> tuple[str, str]:
    """Compute normalize(text) and the skeleton of `text`, which maps look-alikes
    as written and only then casefolds.

    The skeleton is UTS #39's skeleton followed by a casefold: Greek "ΝΕΤ" is
    "net" there but "vet" in normalize(). The two differ only for letters whose
    upper and lower case have different look-alikes.
    """
    decomposed = _decompose(text)
    table = _translation_table()
    normalized = _recompose(decomposed.casefold().translate(table))
    skeleton = _recompose(decomposed.translate(table).casefold())
    return normalized, skeleton


def _decompose(text: str) -> str:
    return unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))


def _recompose(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))


@functools.cache
def _translation_table() -> dict[int, str | None]:
    """Build the str.translate table that drops ignorable characters and maps
    look-alikes to lower-case ASCII. Built once per process, on first use."""
    skeletons = _ascii_skeletons()
    table: dict[int, str | None] = {}
    for code_point in range(0x80, sys.maxunicode + 1):
        char = chr(code_point)
        if unicodedata.category(char) in _DROPPED_CATEGORIES:
            table[code_point] = None
        elif char in skeletons:
            table[code_point] = skeletons[char]
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
        candidates = {
            entry["c"] for entry in homoglyphs if _is_ascii_target(entry["c"])
        }
        # UTS #39 maps every "I"-like character to its prototype "l", and
        # "0"-like ones to "O". Adding the prototype's own ASCII look-alikes
        # lets Cyrillic "І" map to "I", which casefolds to "i" as in "PIN".
        for candidate in list(candidates):
            for entry in confusables_data.get(candidate, ()):
                if _is_ascii_target(entry["c"]):
                    candidates.add(entry["c"])
        if candidates:
            skeletons[char] = _preferred_ascii_target(char, candidates).lower()
    return skeletons


def _is_ascii_target(candidate: str) -> bool:
    return candidate.isascii() and candidate.isprintable() and " " not in candidate


def _preferred_ascii_target(char: str, candidates: Iterable[str]) -> str:
    """Pick the ASCII look-alike of `char` to map it to.

    A single letter of the same case as `char` comes first, then a letter of the
    other case, a digit, other printable ASCII, and last a sequence such as "rn".
    """

    def rank(candidate: str) -> tuple[int, str]:
        if len(candidate) > 1:
            order = 4
        elif candidate.isalpha():
            order = 0 if candidate.isupper() == char.isupper() else 1
        else:
            order = 2 if candidate.isdigit() else 3
        return (order, candidate)

    return min(candidates, key=rank)


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
        detail = _re2_error_text(exc)
        if "too large" in detail:
            advice = "Use smaller repetition counts or fewer alternatives."
        else:
            advice = "RE2 supports no look-around and no backreferences."
        raise ValidationError(
            f'The regular expression is invalid: RE2 reports "{detail}". {advice}',
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


@dataclass(frozen=True)
class _MatchText:
    """Text in the two forms that rules are matched in."""

    normalized: str
    skeleton: str

    @classmethod
    def of(cls, text: str) -> "_MatchText":
        return cls(*_match_forms(text))

    def contains(self, keyword: "_MatchText") -> bool:
        if keyword.normalized in self.normalized:
            return True
        return keyword.skeleton in self.skeleton

    @functools.cached_property
    def encoded_forms(self) -> tuple[bytes, ...]:
        # RE2 searches bytes, so each form is encoded once for all regex rules.
        if self.skeleton == self.normalized:
            return (self.normalized.encode(),)
        return (self.normalized.encode(), self.skeleton.encode())


@dataclass(frozen=True)
class _CompiledRule:
    """A rule's pattern prepared for matching, or the reason it is invalid."""

    keyword: _MatchText | None = None
    regex: re2._Regexp | None = None
    error: str = ""

    def matches(self, texts: list[_MatchText]) -> bool:
        if self.regex is not None:
            return any(
                self.regex.search(form) for text in texts for form in text.encoded_forms
            )
        return any(text.contains(self.keyword) for text in texts)


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
    normalized, skeleton = _match_forms(pattern)
    return _CompiledRule(keyword=_MatchText(normalized.strip(), skeleton.strip()))


def _compiled(rule: PromptRule) -> _CompiledRule:
    return _compile_rule(rule.pk, rule.kind, rule.pattern)


def check_rules(rules: Iterable[PromptRule], texts: Iterable[str]) -> RuleVerdict:
    """Check every piece of text a client sent against a tier's prompt rules.

    Disabled rules are ignored, and rules are tried in order of name. Each text
    is matched separately, so a keyword split across two messages does not
    match. A keyword rule matches when normalize(keyword), without surrounding
    whitespace, is a substring of normalize(text). A regex rule matches when RE2
    finds it, case-insensitively, in normalize(text). Both kinds also match when
    they match in the skeleton forms described at _match_forms().

    The first matching block rule rejects the request. Then, if there are allow
    rules, at least one of them must match some text, or the request is rejected
    with the first allow rule. A rule whose stored pattern is invalid (saved
    without validation) fails closed: a block rule rejects every request, and an
    allow rule never matches.
    """
    enabled = sorted((rule for rule in rules if rule.enabled), key=attrgetter("name"))
    if not enabled:
        return RuleVerdict(allowed=True)
    match_texts = [_MatchText.of(text) for text in texts if text]

    for rule in enabled:
        if rule.action != PromptRule.Action.BLOCK:
            continue
        compiled = _compiled(rule)
        if compiled.error:
            reason = f"block rule {rule.name!r} has an invalid pattern"
            return RuleVerdict(allowed=False, rule=rule, reason=reason)
        if compiled.matches(match_texts):
            reason = f"matched block rule {rule.name!r}"
            return RuleVerdict(allowed=False, rule=rule, reason=reason)

    allow_rules = [rule for rule in enabled if rule.action == PromptRule.Action.ALLOW]
    if not allow_rules:
        return RuleVerdict(allowed=True)
    for rule in allow_rules:
        compiled = _compiled(rule)
        if not compiled.error and compiled.matches(match_texts):
            return RuleVerdict(allowed=True, reason=f"matched allow rule {rule.name!r}")
    names = ", ".join(repr(rule.name) for rule in allow_rules)
    return RuleVerdict(
        allowed=False,
        rule=allow_rules[0],
        reason=f"matched no allow rule (tried {names})",
    )
