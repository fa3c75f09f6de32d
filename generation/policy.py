"""A tier's rules for a chat request: model, length, prompt rules, max_tokens.

The view, the `check_prompt` command and the tier's admin page all call
`prepare_chat`, so an operator's trial run decides exactly as a request would.
"""

import functools
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone

from keys.models import PromptRule, Tier
from keys.rules import check_rules, tier_rules
from keys.validators import split_list
from proxy_site.errors import (
    ModelNotAllowed,
    PromptRejected,
    PromptTooLong,
    ProxyError,
)

from .models import QuotaCounter
from .quotas import quota_exceeded_error
from .tokens import (
    count_prompt_tokens,
    count_text_tokens,
    message_texts,
    prompt_token_bound,
)

QuotaPeriod = QuotaCounter.Period


@dataclass(frozen=True)
class PreparedChat:
    """A chat request after the tier's rules: what is sent upstream, and its cost."""

    model: str
    # The tier's system prompt, if any, then the client's messages.
    messages: list[dict]
    max_tokens: int
    # The text the client sent, as the rules saw it.
    client_texts: list[str]
    # Client text outside the messages (tool definitions), counted as prompt.
    extra_texts: list[str] = field(default_factory=list)
    # Completions requested (OpenAI's `n`), after the tier's cap.
    choices: int = 1
    # The name the client used for the completion limit; OpenAI's newer
    # models take max_completion_tokens.
    max_tokens_field: str = "max_tokens"
    # The prompt's tokens, when the caller counted them already.
    known_prompt_tokens: int | None = None

    @functools.cached_property
    def prompt_tokens(self) -> int:
        """The prompt's tokens in the model's encoding (loaded on first use)."""
        if self.known_prompt_tokens is not None:
            return self.known_prompt_tokens
        return count_prompt_tokens(self.model, self.messages) + sum(
            count_text_tokens(self.model, text) for text in self.extra_texts
        )

    @functools.cached_property
    def prompt_token_bound(self) -> int:
        """At least `prompt_tokens`, found without an encoding."""
        if self.known_prompt_tokens is not None:
            return self.known_prompt_tokens
        return prompt_token_bound(self.messages, self.extra_texts)

    @property
    def worst_case_tokens(self) -> int:
        """The maximum tokens the request can use: prompt plus every completion."""
        return self.prompt_tokens + self.choices * self.max_tokens

    @property
    def worst_case_bound(self) -> int:
        """At least `worst_case_tokens`, found without an encoding."""
        return self.prompt_token_bound + self.choices * self.max_tokens

    @property
    def upstream_limits(self) -> dict:
        """The cost parameters to send upstream, with the tier's caps applied."""
        limits = {self.max_tokens_field: self.max_tokens}
        if self.choices > 1:
            limits["n"] = self.choices
        return limits


def resolve_model(*, tier: Tier, requested: str | None) -> str:
    return requested or tier.default_model or settings.PROXY_DEFAULT_MODEL


def check_model(*, tier: Tier, model: str) -> None:
    allowed = tier.allowed_model_list
    if allowed and model not in allowed:
        raise ModelNotAllowed(
            f"The model {model!r} is not allowed for this API key. "
            f"Allowed models: {', '.join(allowed)}.",
            param="model",
        )


def check_length(*, tier: Tier, texts: list[str], param: str = "prompt") -> None:
    length = sum(len(text) for text in texts)
    if tier.max_prompt_chars is not None and length > tier.max_prompt_chars:
        raise PromptTooLong(
            f"The prompt is {length} characters long; this API key's tier "
            f"allows at most {tier.max_prompt_chars}.",
            param=param,
        )


def check_prompt_rules(
    *, tier: Tier, texts: list[str], prompt_texts: list[str] | None = None
) -> None:
    """Raise PromptRejected if a block rule matches any text, or if the tier has
    allow rules and none matches the prompt (`prompt_texts`, by default all)."""
    verdict = check_rules(tier_rules(tier), texts, allow_texts=prompt_texts)
    if not verdict.allowed:
        rule = verdict.rule
        error = PromptRejected(
            rule.message if rule else None,
            extra={"rule_id": rule.pk if rule else None},
        )
        # For operators only: the client sees the rule's message and id.
        error.rule = rule
        error.reason = verdict.reason
        raise error


def resolve_max_tokens(*, tier: Tier, requested: int | None) -> int:
    """Return the max_tokens to send: the request's, lowered to the tier's cap."""
    cap = tier.max_tokens_cap or settings.PROXY_MAX_TOKENS_CAP
    if requested is None:
        return min(tier.default_max_tokens or cap, cap)
    return min(requested, cap)


def prepare_chat(
    *,
    tier: Tier,
    messages: list[dict],
    model: str | None = None,
    max_tokens: int | None = None,
    max_tokens_field: str = "max_tokens",
    choices: int | None = None,
    extra_texts: list[str] | None = None,
    text_param: str = "prompt",
) -> PreparedChat:
    """Apply the tier's rules to a chat request, raising the error that stops it.

    Checks run in a fixed order: model, prompt length, prompt rules.
    `extra_texts` is client text outside the messages, such as tool
    descriptions; the rules and the length limit see it too. `text_param`
    names the request field that a too-long error points at.
    """
    model_name = resolve_model(tier=tier, requested=model)
    check_model(tier=tier, model=model_name)
    texts = [text for message in messages for text in message_texts(message)]
    texts.extend(extra_texts or [])
    check_length(tier=tier, texts=texts, param=text_param)
    prompt_texts = [
        text
        for message in messages
        if message.get("role") == "user"
        for text in message_texts(message)
    ]
    check_prompt_rules(tier=tier, texts=texts, prompt_texts=prompt_texts)

    upstream_messages = list(messages)
    if tier.system_prompt:
        upstream_messages.insert(0, {"role": "system", "content": tier.system_prompt})
    return PreparedChat(
        model=model_name,
        messages=upstream_messages,
        max_tokens=resolve_max_tokens(tier=tier, requested=max_tokens),
        client_texts=texts,
        extra_texts=list(extra_texts or []),
        choices=min(choices or 1, tier.max_choices),
        max_tokens_field=max_tokens_field,
    )


@dataclass(frozen=True)
class Decision:
    """The tier's decision on a request, as shown to operators trying prompts."""

    allowed: bool
    # The error code the client would receive, when refused.
    code: str = ""
    # The message the client would receive, when refused.
    message: str = ""
    # Why, for the operator: the rule or limit that decided.
    reason: str = ""
    rule: PromptRule | None = None
    chat: PreparedChat | None = None
    limits: list[str] = field(default_factory=list)


def tier_limits(tier: Tier) -> list[str]:
    """Describe the tier's rate limits and token caps in words."""
    limits = [f"rate limit {rate}" for rate in split_list(tier.rate_limits)]
    if tier.tokens_per_day is not None:
        limits.append(f"{tier.tokens_per_day} tokens per day")
    if tier.tokens_per_month is not None:
        limits.append(f"{tier.tokens_per_month} tokens per month")
    return limits


def evaluate_prompt(
    *,
    tier: Tier,
    messages: list[dict],
    model: str | None = None,
    max_tokens: int | None = None,
) -> Decision:
    """Decide a request as the API would, without calling the upstream.

    Runs prepare_chat, then compares the worst case with the tier's token
    caps as if the key had used nothing yet in the period. Request rates are
    listed but not counted.
    """
    limits = tier_limits(tier)
    try:
        chat = prepare_chat(
            tier=tier, messages=messages, model=model, max_tokens=max_tokens
        )
    except ProxyError as exc:
        return Decision(
            allowed=False,
            code=exc.default_code,
            message=str(exc.detail),
            reason=getattr(exc, "reason", "") or _reason_for(exc),
            rule=getattr(exc, "rule", None),
            limits=limits,
        )
    now = timezone.now()
    for period, label, cap in (
        (QuotaPeriod.DAY, "daily", tier.tokens_per_day),
        (QuotaPeriod.MONTH, "monthly", tier.tokens_per_month),
    ):
        if cap is not None and chat.worst_case_tokens > cap:
            error = quota_exceeded_error(
                period=period, cap=cap, left=cap, amount=chat.worst_case_tokens, now=now
            )
            return Decision(
                allowed=False,
                code=error.default_code,
                message=str(error.detail),
                reason=f"the worst case of {chat.worst_case_tokens} tokens is over "
                f"the {label} cap of {cap}",
                chat=chat,
                limits=limits,
            )
    return Decision(
        allowed=True, reason="no rule or limit refused it", chat=chat, limits=limits
    )


def generate_text_messages(prompt: str, system: str | None) -> list[dict]:
    """Build the chat messages of a /generate-text/ request."""
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return messages


def trial_arguments(data: dict) -> dict:
    """Turn a validated /generate-text/ body into evaluate_prompt's arguments."""
    return {
        "messages": generate_text_messages(data["prompt"], data.get("system")),
        "model": data.get("model"),
        "max_tokens": data.get("max_tokens"),
    }


def _reason_for(exc: ProxyError) -> str:
    reasons = {
        ModelNotAllowed: "the model is not in the tier's allowed models",
        PromptTooLong: "the prompt is longer than the tier's max_prompt_chars",
    }
    return reasons.get(type(exc), exc.default_code)
