"""Text generation: build the upstream request, call it, shape the result."""

from django.conf import settings

from keys.models import APIKey

from .upstream import get_client, upstream_errors


def resolve_model(*, api_key: APIKey, requested: str | None) -> str:
    return requested or api_key.tier.default_model or settings.PROXY_DEFAULT_MODEL


def generate_text(
    *,
    api_key: APIKey,
    prompt: str,
    model: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> dict:
    """Send one prompt to the upstream chat completions API and return its text.

    Raises a ProxyError subclass for every upstream failure.
    """
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    options = {}
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    if temperature is not None:
        options["temperature"] = temperature
    model_name = resolve_model(api_key=api_key, requested=model)

    client = get_client()
    with upstream_errors():
        completion = client.chat.completions.create(
            model=model_name, messages=messages, **options
        )

    choice = completion.choices[0] if completion.choices else None
    usage = completion.usage
    return {
        "text": (choice.message.content if choice else None) or "",
        "model": completion.model or model_name,
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "total_tokens": usage.total_tokens if usage else 0,
        },
    }
