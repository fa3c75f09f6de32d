"""A tier's rules for a chat request: model, length, prompt rules, max_tokens.

The view, the `check_prompt` command and the tier's admin page all call
`prepare_chat`, so an operator's trial run decides exactly as a request would.
"""

from dataclasses import dataclass

from django.conf import settings

from keys.models import PromptRule, Tier
from keys.rules import check_rules
from proxy_site.errors import ModelNotAllowed, PromptRejected, PromptTooLong

from .tokens import count_prompt_tokens, message_texts


@dataclass(frozen=True)
class PreparedChat:
    """A chat request after the tier's rules: what is sent upstream, and its cost."""

    model: str
    # The tier's system prompt, if any, then the client's messages.
    messages: list[dict]
    max_tokens: int
    prompt_tokens: int
    # The text the client sent, as the rules saw it.
    client_texts: list[str]

    @property
    def worst_case_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


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


def check_length(*, tier: Tier, texts: list[str]) -> None:
    length = sum(len(text) for text in texts)
    if tier.max_prompt_chars is not None and length > tier.max_prompt_chars:
        raise PromptTooLong(
            f"The prompt is {length} characters long; this API key's tier "
            f"allows at most {tier.max_prompt_chars}.",
            param="prompt",
        )


def tier_rules(tier: Tier) -> list[PromptRule]:
    return list(tier.rules.filter(enabled=True).order_by("name"))


def check_prompt_rules(*, tier: Tier, texts: list[str]) -> None:
    verdict = check_rules(tier_rules(tier), texts)
    if not verdict.allowed:
        rule = verdict.rule
        raise PromptRejected(
            rule.message if rule else None,
            extra={"rule_id": rule.pk if rule else None},
        )


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
) -> PreparedChat:
    """Apply the tier's rules to a chat request, raising the error that stops it.

    Checks run in a fixed order: model, prompt length, prompt rules.
    """
    model_name = resolve_model(tier=tier, requested=model)
    check_model(tier=tier, model=model_name)
    texts = [text for message in messages for text in message_texts(message)]
    check_length(tier=tier, texts=texts)
    check_prompt_rules(tier=tier, texts=texts)

    upstream_messages = list(messages)
    if tier.system_prompt:
        upstream_messages.insert(0, {"role": "system", "content": tier.system_prompt})
    return PreparedChat(
        model=model_name,
        messages=upstream_messages,
        max_tokens=resolve_max_tokens(tier=tier, requested=max_tokens),
        prompt_tokens=count_prompt_tokens(model_name, upstream_messages),
        client_texts=texts,
    )
