"""Token counts for quota reservations, with OpenAI's own encodings.

The encodings come from bpe-openai, which offers tiktoken's interface and
ships the encoding files inside its wheel. tiktoken itself downloads them on
first use, which fails on hosts without outbound network access.

bpe-openai and one encoding take about 150 MB in a process, so the module is
imported on first use. A chat request is first reserved with
`prompt_token_bound`, which needs no encoding; see UsageTracker.reserve.
"""

import functools
import logging

logger = logging.getLogger(__name__)

FALLBACK_ENCODING = "o200k_base"
# Chat formatting adds a few tokens per message and before the reply; these
# are the figures OpenAI documents for its chat models.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


@functools.lru_cache(maxsize=32)
def _encoding_for(model: str):
    import bpe_openai

    # bpe-openai 0.1 maps more models to encoding names of more models than it builds
    # encodings for by model name (the embedding models, for one), so the
    # encoding is looked up by its name.
    try:
        name = bpe_openai.encoding_name_for_model(model)
    except Exception:  # noqa: BLE001  (any unknown or foreign model name)
        return _fallback_encoding()
    return _named_encoding(name)


@functools.lru_cache(maxsize=8)
def _named_encoding(name: str):
    import bpe_openai

    return bpe_openai.get_encoding(name)


def _fallback_encoding():
    return _named_encoding(FALLBACK_ENCODING)


# bpe-openai refuses to encode a million characters, or text that makes more
# than 200,000 tokens, in one call, so long text is counted in pieces of at
# most this many characters (at 4 tokens per character, at most 160,000).
PIECE_CHARS = 40_000


def count_text_tokens(model: str, text: str) -> int:
    """Count the tokens of `text`, with special-token text counted as plain text.

    Long text is counted in pieces cut at spaces, which may differ from the
    count of the whole by a token or so per piece.
    """
    return _count(_encoding_for(model), text)


def _count(encoding, text: str) -> int:
    total = 0
    start = 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
            if cut > start:
                end = cut
        total += len(encoding.encode_ordinary(text[start:end]))
        start = end
    return total


def decode_tokens(model: str, token_ids: list[int]) -> str:
    """Return the text of token ids; ids the encoding does not know are skipped."""
    encoding = _encoding_for(model)
    try:
        return encoding.decode(token_ids)
    except Exception:  # noqa: BLE001  (out-of-range ids raise various errors)
        known = [i for i in token_ids if 0 <= i < encoding.n_vocab]
        return encoding.decode(known)


def count_prompt_tokens(model: str, messages: list[dict]) -> int:
    """Count the tokens a chat request's messages take, as the model reads them.

    Models that are not OpenAI's are counted with o200k_base; the count is
    then an estimate, and settlement uses the upstream's reported usage.
    """
    encoding = _encoding_for(model)
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for text in message_texts(message):
            total += _count(encoding, text)
    return total


def prompt_token_bound(messages: list[dict], extra_texts: list[str] = ()) -> int:
    """Return at least as many tokens as count_prompt_tokens would, without
    an encoding.

    Every token of a byte-level encoding stands for at least one byte of
    UTF-8, so a text's byte length bounds its token count. For English text
    the bound is about four times the count.
    """
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for text in message_texts(message):
            total += _utf8_length(text)
    return total + sum(_utf8_length(text) for text in extra_texts)


def _utf8_length(text: str) -> int:
    # Requests with lone surrogates are refused before this point; should one
    # slip through, "surrogatepass" still counts it, as 3 bytes.
    return len(text.encode("utf-8", "surrogatepass"))


def message_texts(message: dict) -> list[str]:
    """Return every piece of text in a chat message, whatever its shape.

    That is the content (a string, or the text and refusal of each part), the
    name, the refusal, the tool_call_id, and the names and arguments (or
    input) of tool calls and of the older function_call. Values that are not
    strings are skipped.
    """
    texts = []
    content = message.get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                _add_texts(texts, part, ("text", "refusal"))
            elif isinstance(part, str):
                texts.append(part)
    _add_texts(texts, message, ("name", "refusal", "tool_call_id"))
    texts.extend(call_texts(message))
    return texts


def call_texts(message: dict) -> list[str]:
    """Return the names and arguments (or input) of a message's tool calls and
    of its older function_call. Values that are not strings are skipped."""
    texts = []
    tool_calls = message.get("tool_calls")
    for call in tool_calls if isinstance(tool_calls, list) else ():
        if isinstance(call, dict):
            _add_texts(texts, call.get("function"), ("name", "arguments"))
            _add_texts(texts, call.get("custom"), ("name", "input"))
    _add_texts(texts, message.get("function_call"), ("name", "arguments"))
    return texts


def _add_texts(texts: list[str], source: object, keys: tuple[str, ...]) -> None:
    if not isinstance(source, dict):
        return
    for key in keys:
        value = source.get(key)
        if isinstance(value, str):
            texts.append(value)


# Largest token count accepted from the upstream for one request: the largest
# value the usage record's token columns can hold. No model comes near it.
MAX_REPORTED_TOKENS = 2**31 - 1


def reported_tokens(value: object) -> int | None:
    """Return a token count reported by the upstream, or None if it is not a
    count (missing, negative, fractional, not a number, or over
    MAX_REPORTED_TOKENS)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not 0 <= value <= MAX_REPORTED_TOKENS:
        return None
    return value
