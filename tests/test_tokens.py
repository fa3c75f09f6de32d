import bpe_openai
import pytest

from generation.tokens import (
    PIECE_CHARS,
    count_prompt_tokens,
    count_text_tokens,
    decode_tokens,
)


def test_known_text_counts_like_openai():
    # "hello world" is two tokens in o200k_base, gpt-4o-mini's encoding.
    assert count_text_tokens("gpt-4o-mini", "hello world") == 2


def test_special_token_text_is_plain_text():
    assert count_text_tokens("gpt-4o-mini", "<|endoftext|>") > 1


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("ab c " * 200_000, id="one-megabyte-words"),
        pytest.param("x" * 1_000_000, id="one-megabyte-no-spaces"),
        pytest.param("\u6f22" * 340_000, id="cjk"),
    ],
)
def test_long_text_is_counted_in_pieces(text):
    count = count_text_tokens("gpt-4o-mini", text)
    assert count > len(text) // 40


def test_pieces_count_close_to_whole():
    text = "alpha beta gamma " * (PIECE_CHARS // 4)
    whole = len(bpe_openai.get_encoding("o200k_base").encode_ordinary(text))
    pieces = count_text_tokens("gpt-4o-mini", text)
    assert len(text) > 2 * PIECE_CHARS
    assert abs(pieces - whole) <= 4


def test_unknown_model_falls_back_to_o200k():
    assert count_text_tokens("llama-3-local", "hello world") == 2


def test_prompt_count_includes_message_overhead():
    messages = [{"role": "user", "content": "hello world"}]
    assert count_prompt_tokens("gpt-4o-mini", messages) == 2 + 3 + 3


def test_embedding_model_uses_cl100k():
    # "my password" is tokens 2465 and 3636 in cl100k_base.
    assert decode_tokens("text-embedding-3-small", [2465, 3636]) == "my password"
