"""Chat calls to the upstream, after the tier's rules, with usage recorded."""

import json
import logging
from dataclasses import dataclass

from proxy_site.errors import UpstreamError

from .policy import PreparedChat, generate_text_messages, prepare_chat
from .replies import MalformedReply, check_completion, generated_texts
from .streaming import ChatStreamRelay, EventRenderer, sse
from .tokens import count_text_tokens, reported_tokens
from .upstream import post_json, upstream_errors
from .usage import UsageTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatReply:
    """An upstream chat completion: its JSON body as sent, and as parsed."""

    content: bytes
    data: dict

    @property
    def choices(self) -> list[dict]:
        return self.data["choices"]

    def text(self) -> str:
        """Return the first choice's message text, or "" if it has none."""
        return _message_text(self.choices[0])


def _message_text(choice: dict) -> str:
    return choice["message"].get("content") or ""


def _parse_reply(content: bytes) -> ChatReply:
    """Check that the upstream body is a chat completion with choices."""
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        # json raises RecursionError for nesting deeper than Python's
        # recursion limit.
        logger.error("Upstream chat completion is not JSON, or is nested too deeply.")
        raise UpstreamError() from None
    try:
        check_completion(data)
    except MalformedReply as exc:
        logger.error("Upstream chat completion is malformed: %s.", exc)
        raise UpstreamError() from exc
    return ChatReply(content=content, data=data)


def _chat_body(chat: PreparedChat, options: dict) -> dict:
    return {
        "model": chat.model,
        "messages": chat.messages,
        **chat.upstream_limits,
        **options,
    }


def complete_chat(
    *, tracker: UsageTracker, chat: PreparedChat, options: dict
) -> ChatReply:
    """Reserve quota, call the chat completions API, settle, return the reply.

    The reply's body is kept as the upstream sent it, so that the view can
    pass it on without building it again.

    Raises a ProxyError subclass when the quota or the upstream stops the
    request; the tracker records the outcome either way.
    """
    tracker.reserve(chat)
    with upstream_errors():
        response = tracker.call_upstream(
            lambda: post_json("/chat/completions", _chat_body(chat, options))
        )
        content = response.read()
    reply = _parse_reply(content)
    usage = reply.data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    prompt_tokens = reported_tokens(usage.get("prompt_tokens"))
    completion_tokens = reported_tokens(usage.get("completion_tokens"))
    # Some OpenAI-compatible servers report no usage, or nonsense; count it here.
    if prompt_tokens is None:
        prompt_tokens = chat.prompt_tokens
    if completion_tokens is None:
        texts = [
            text
            for choice in reply.choices
            for text in generated_texts(choice["message"])
        ]
        completion_tokens = count_text_tokens(chat.model, "".join(texts))
    tracker.succeed(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return reply


def stream_chat(
    *,
    tracker: UsageTracker,
    chat: PreparedChat,
    options: dict,
    usage_requested: bool,
    render: EventRenderer,
    finish=None,
) -> ChatStreamRelay:
    """Reserve quota and open an upstream stream; return the relay that reads it.

    Failures before the upstream responds raise, as for complete_chat. From the
    first event on, the relay settles the quota and records the outcome.
    """
    tracker.reserve(chat)
    options = {**options, "stream": True, "stream_options": {"include_usage": True}}
    with upstream_errors():
        upstream = tracker.call_upstream(
            lambda: post_json(
                "/chat/completions", _chat_body(chat, options), stream=True
            ),
            stream=True,
        )
    return ChatStreamRelay(
        tracker=tracker,
        chat=chat,
        upstream=upstream,
        usage_requested=usage_requested,
        render=render,
        finish=finish,
    )


def generate_text(
    *,
    tracker: UsageTracker,
    prompt: str,
    model: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    stream: bool = False,
):
    """Send one prompt to the upstream and return its text.

    Returns the response body, or for `stream` a relay of server-sent events:
    `{"text": ...}` per piece of text, then `{"model": ..., "usage": ...}`,
    then `[DONE]`.
    """
    chat = prepare_chat(
        tier=tracker.api_key.tier,
        messages=generate_text_messages(prompt, system),
        model=model,
        max_tokens=max_tokens,
    )
    options = {} if temperature is None else {"temperature": temperature}
    if stream:
        return stream_chat(
            tracker=tracker,
            chat=chat,
            options=options,
            usage_requested=False,
            render=_render_text_event,
            finish=lambda usage: sse(json.dumps({"model": chat.model, "usage": usage})),
        )

    reply = complete_chat(tracker=tracker, chat=chat, options=options)
    record = tracker.record
    model_name = reply.data.get("model")
    return {
        "text": reply.text(),
        "model": model_name
        if isinstance(model_name, str) and model_name
        else chat.model,
        "usage": {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
        },
    }


def _render_text_event(event: dict, raw: str) -> bytes | None:
    pieces = [
        (choice.get("delta") or {}).get("content") or ""
        for choice in event.get("choices") or []
    ]
    text = "".join(pieces)
    return sse(json.dumps({"text": text})) if text else None
