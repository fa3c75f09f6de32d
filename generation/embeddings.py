"""Embeddings calls to the upstream, after the tier's rules, with usage recorded."""

import logging
import math

from openai.types import CreateEmbeddingResponse

from proxy_site.errors import UpstreamError

from .policy import (
    PreparedChat,
    check_length,
    check_model,
    check_prompt_rules,
)
from .tokens import count_text_tokens, decode_tokens, reported_tokens
from .upstream import get_client, upstream_errors
from .usage import UsageTracker

logger = logging.getLogger(__name__)

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


def input_texts(value: EmbeddingInput, model: str) -> list[str]:
    """Return every input of an embeddings request as text.

    Token-id inputs are decoded with the model's encoding, so that prompt
    rules see them too. For a model that is not OpenAI's the decoding uses
    o200k_base and may not be the text the model reads.
    """
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(item, int) for item in value):
        return [decode_tokens(model, value)]
    texts = []
    for item in value:
        texts.append(item if isinstance(item, str) else decode_tokens(model, item))
    return texts


def count_token_ids(value: EmbeddingInput) -> int:
    """Return the number of token ids in an embeddings request's token-id inputs."""
    if isinstance(value, str):
        return 0
    if all(isinstance(item, int) for item in value):
        return len(value)
    return sum(len(item) for item in value if isinstance(item, list))


def create_embeddings(
    *,
    tracker: UsageTracker,
    input: EmbeddingInput,
    model: str,
    options: dict,
) -> CreateEmbeddingResponse:
    """Apply the tier's rules, reserve quota, call the embeddings API and settle.

    Checks run in the chat endpoints' order: model, input length, prompt
    rules, then the token quota. `options` contains the other request fields that
    are sent upstream as they are (encoding_format, dimensions, user). Raises
    a ProxyError subclass when a rule, the quota or the upstream stops the
    request; the tracker records the outcome either way.
    """
    tier = tracker.api_key.tier
    check_model(tier=tier, model=model)
    texts = input_texts(input, model)
    check_length(tier=tier, texts=texts, param="input")
    check_prompt_rules(tier=tier, texts=texts)

    string_texts = (
        [input]
        if isinstance(input, str)
        else [item for item in input if isinstance(item, str)]
    )
    prompt_tokens = count_token_ids(input) + sum(
        count_text_tokens(model, text) for text in string_texts
    )
    # An embedding has no completion, so the worst case is the input's tokens.
    tracker.reserve(
        PreparedChat(
            model=model,
            messages=[],
            max_tokens=0,
            known_prompt_tokens=prompt_tokens,
            client_texts=texts,
        )
    )
    with upstream_errors():
        response = tracker.call_upstream(
            lambda: get_client().embeddings.create(model=model, input=input, **options)
        )

    if not isinstance(response, CreateEmbeddingResponse) or not isinstance(
        response.data, list
    ):
        logger.error("Upstream embeddings reply is not a list of embeddings.")
        raise UpstreamError()
    if not all(_is_embedding(item) for item in response.data):
        logger.error("Upstream embeddings reply has an item that is not an embedding.")
        raise UpstreamError()
    # The SDK builds the reply without validating it, so usage may be anything.
    reported = reported_tokens(getattr(response.usage, "prompt_tokens", None))
    if reported is not None:
        prompt_tokens = reported
    tracker.succeed(prompt_tokens=prompt_tokens, completion_tokens=0)
    return response


def _is_embedding(item: object) -> bool:
    """Tell whether an item of the upstream's reply is a usable embedding.

    The openai client builds the reply without validating it. An embedding is
    a list of finite numbers, or a base64 string when the client asked for
    base64, and carries an integer index.
    """
    index = getattr(item, "index", None)
    if isinstance(index, bool) or not isinstance(index, int):
        return False
    vector = getattr(item, "embedding", None)
    if isinstance(vector, str):
        return True
    return isinstance(vector, list) and all(
        type(value) in (float, int) and math.isfinite(value) for value in vector
    )
