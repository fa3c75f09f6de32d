"""Prompt rules: pattern validation and matching against normalised text."""

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

import re2
from django.core.exceptions import ValidationError

from .models import PromptRule, Tier
from .normalization import match_forms, normalize

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


@dataclass(frozen=True)
class RuleVerdict:
    """The outcome of checking a request's text against a tier's rules.

    When `allowed` is false, `rule` is the rule that rejected the request and its
    message is returned to the client. `reason` is a short explanation for logs.
    """

    allowed: bool
    rule: PromptRule | None = None
    reason: str = ""


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
        return cls(*match_forms(text))

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
    normalized, skeleton = match_forms(pattern)
    return _CompiledRule(keyword=_MatchText(normalized.strip(), skeleton.strip()))


def _compiled(rule: PromptRule) -> _CompiledRule:
    return _compile_rule(rule.pk, rule.kind, rule.pattern)


def check_rules(
    rules: Iterable[PromptRule],
    texts: Iterable[str],
    allow_texts: Iterable[str] | None = None,
) -> RuleVerdict:
    """Check every piece of text a client sent against a tier's prompt rules.

    Disabled rules are ignored, and rules are tried in order of name. Each text
    is matched separately, so a keyword split across two messages does not
    match. A keyword rule matches when normalize(keyword), without surrounding
    whitespace, is a substring of normalize(text). A regex rule matches when RE2
    finds it, case-insensitively, in normalize(text). Both kinds also match when
    they match in the skeleton forms described at match_forms().

    The first matching block rule rejects the request. Then, if there are allow
    rules, at least one of them must match one of `allow_texts` (by default
    `texts`), or the request is rejected with the first allow rule. Callers
    pass the user's own prompt there, so that a system message cannot carry
    the allowed words. A rule whose stored pattern is invalid (saved
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
    if allow_texts is not None:
        match_texts = [_MatchText.of(text) for text in allow_texts if text]
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


# Tiers whose rule lists are kept per process.
_TIER_RULES_CACHE_SIZE = 256


def tier_rules(tier: Tier) -> list[PromptRule]:
    """Return the tier's enabled prompt rules, in order of name.

    The list is kept per process under the tier's `rules_version`, which
    rises whenever one of its rules or the set of its rules is saved through
    Django (see keys.signals).

    NOTE: QuerySet.update() and raw SQL send no signal, so a rule changed that
    way is seen only after keys.signals.touch_tiers() or the next save.
    """
    return list(_tier_rules(tier.pk, tier.rules_version))


@functools.lru_cache(maxsize=_TIER_RULES_CACHE_SIZE)
def _tier_rules(tier_pk: int, rules_version: int) -> tuple[PromptRule, ...]:
    return tuple(
        PromptRule.objects.filter(tiers=tier_pk, enabled=True).order_by("name")
    )


def clear_tier_rules() -> None:
    """Forget every tier's rule list in this process."""
    _tier_rules.cache_clear()
