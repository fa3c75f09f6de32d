"""Text generation: apply the tier's rules, call the upstream, record usage."""

from .policy import prepare_chat
from .tokens import count_text_tokens
from .upstream import get_client, upstream_errors
from .usage import UsageTracker


def generate_text(
    *,
    tracker: UsageTracker,
    prompt: str,
    model: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> dict:
    """Send one prompt to the upstream chat completions API and return its text.

    Raises a ProxyError subclass when a rule, the quota or the upstream stops
    the request; the tracker records the outcome either way.
    """
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    chat = prepare_chat(
        tier=tracker.api_key.tier,
        messages=messages,
        model=model,
        max_tokens=max_tokens,
    )
    tracker.reserve(chat)

    options = {}
    if temperature is not None:
        options["temperature"] = temperature
    with upstream_errors():
        completion = tracker.call_upstream(
            lambda: get_client().chat.completions.create(
                model=chat.model,
                messages=chat.messages,
                # NOTE: OpenAI's reasoning models take max_completion_tokens
                # instead; most OpenAI-compatible servers know only max_tokens.
                max_tokens=chat.max_tokens,
                **options,
            )
        )

    choice = completion.choices[0] if completion.choices else None
    text = (choice.message.content if choice else None) or ""
    if completion.usage is not None:
        prompt_tokens = completion.usage.prompt_tokens
        completion_tokens = completion.usage.completion_tokens
    else:
        # Some OpenAI-compatible servers report no usage; count it here.
        prompt_tokens = chat.prompt_tokens
        completion_tokens = count_text_tokens(chat.model, text)
    tracker.succeed(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return {
        "text": text,
        "model": completion.model or chat.model,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
