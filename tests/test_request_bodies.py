"""validate_body: serializers reused across bodies and threads, keeping no state."""

import threading

import pytest
from rest_framework.exceptions import ValidationError

from generation.serializers import (
    ChatCompletionSerializer,
    EmbeddingSerializer,
    _idle,
    validate_body,
)

HELLO = [{"role": "user", "content": "hello"}]


def test_each_body_gets_its_own_result():
    first = validate_body(
        ChatCompletionSerializer, {"messages": HELLO, "temperature": 0.5}
    )
    second = validate_body(
        ChatCompletionSerializer, {"messages": HELLO, "max_tokens": 7}
    )

    assert first["temperature"] == 0.5
    assert "max_tokens" not in first
    assert second["max_tokens"] == 7
    assert "temperature" not in second


def test_error_does_not_carry_over():
    with pytest.raises(ValidationError) as excinfo:
        validate_body(ChatCompletionSerializer, {"messages": HELLO, "colour": "blue"})
    assert "colour" in excinfo.value.detail

    data = validate_body(ChatCompletionSerializer, {"messages": HELLO})

    assert data["messages"] == HELLO


def test_valid_body_does_not_hide_next_error():
    validate_body(ChatCompletionSerializer, {"messages": HELLO})

    with pytest.raises(ValidationError) as excinfo:
        validate_body(ChatCompletionSerializer, {"messages": []})

    assert "messages" in excinfo.value.detail


def test_threads_validate_independently():
    barrier = threading.Barrier(8)
    results: dict[int, object] = {}

    def validate(index: int) -> None:
        body = {"messages": HELLO, "max_tokens": index + 1}
        barrier.wait(timeout=10)
        for _ in range(50):
            results[index] = validate_body(ChatCompletionSerializer, body)["max_tokens"]

    threads = [threading.Thread(target=validate, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert results == {index: index + 1 for index in range(8)}


def test_classes_keep_separate_serializers():
    chat = validate_body(ChatCompletionSerializer, {"messages": HELLO, "n": 2})
    embedding = validate_body(
        EmbeddingSerializer, {"model": "text-embedding-3-small", "input": "hello"}
    )
    again = validate_body(ChatCompletionSerializer, {"messages": HELLO})

    assert chat["n"] == 2
    assert embedding["input"] == "hello"
    assert "n" not in again


def test_result_survives_reuse_by_another_thread():
    first = validate_body(ChatCompletionSerializer, {"messages": HELLO, "n": 2})

    def validate_other() -> None:
        validate_body(ChatCompletionSerializer, {"messages": HELLO, "n": 5})

    thread = threading.Thread(target=validate_other)
    thread.start()
    thread.join(timeout=30)

    assert first["n"] == 2


def test_serializers_are_few_after_many_threads():
    # Earlier tests that validated bodies at once may have left several.
    _idle.pop(ChatCompletionSerializer, None)

    def validate(index: int) -> None:
        validate_body(ChatCompletionSerializer, {"messages": HELLO, "n": 1})

    for index in range(20):
        thread = threading.Thread(target=validate, args=(index,))
        thread.start()
        thread.join(timeout=30)

    assert len(_idle[ChatCompletionSerializer]) == 1
