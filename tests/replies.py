"""Chat completions and chunks for scripted upstream replies, malformed ones too."""

import pytest


def chunk(**choice_fields: object) -> dict:
    """Return a chat.completion.chunk with one choice, its fields overridden."""
    choice = {"index": 0, "delta": {}, "finish_reason": None, **choice_fields}
    return {
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [choice],
    }


def text_chunk(text: str) -> dict:
    return chunk(delta={"content": text})


def finish_chunk(reason: str = "stop") -> dict:
    return chunk(finish_reason=reason)


def _tool_call(**fields: object) -> dict:
    return chunk(delta={"tool_calls": [{"index": 0, **fields}]})


# Chunks whose shape no OpenAI-compatible server sends. The proxy must end the
# stream with an upstream_error event on each.
MALFORMED_CHUNKS = [
    pytest.param({"choices": 5}, id="choices-number"),
    pytest.param({"choices": {"index": 0}}, id="choices-object"),
    pytest.param({"choices": ["text"]}, id="choice-string"),
    pytest.param(chunk(delta="oops"), id="delta-string"),
    pytest.param(chunk(delta=["oops"]), id="delta-list"),
    pytest.param(chunk(delta={"content": 5}), id="content-number"),
    pytest.param(chunk(delta={"content": ["part"]}), id="content-list"),
    pytest.param(chunk(delta={"refusal": {"text": "no"}}), id="refusal-object"),
    pytest.param(chunk(delta={"tool_calls": "call"}), id="tool-calls-string"),
    pytest.param(chunk(delta={"tool_calls": [5]}), id="tool-call-number"),
    pytest.param(_tool_call(function="lookup"), id="function-string"),
    pytest.param(_tool_call(function={"name": 5}), id="function-name-number"),
    pytest.param(_tool_call(function={"arguments": {}}), id="arguments-object"),
    pytest.param(chunk(delta={"function_call": "lookup"}), id="function-call-string"),
    pytest.param(chunk(finish_reason=5), id="finish-reason-number"),
]


def completion(**message_fields: object) -> dict:
    """Return a chat.completion with one choice, its message's fields overridden."""
    message = {"role": "assistant", "content": "hello", **message_fields}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return {"object": "chat.completion", "model": "gpt-4o-mini", "choices": [choice]}


def _without_message() -> dict:
    body = completion()
    del body["choices"][0]["message"]
    return body


# Chat completion bodies that the proxy must reject with upstream_error.
MALFORMED_COMPLETIONS = [
    pytest.param([completion()], id="body-list"),
    pytest.param({"choices": [5]}, id="choice-number"),
    pytest.param(_without_message(), id="message-missing"),
    pytest.param({"choices": [{"index": 0, "message": "hi"}]}, id="message-string"),
    pytest.param(completion(content=5), id="content-number"),
    pytest.param(completion(content=[{"type": "text"}]), id="content-list"),
    pytest.param(completion(refusal=True), id="refusal-boolean"),
    pytest.param(completion(tool_calls={"id": "call"}), id="tool-calls-object"),
    pytest.param(completion(tool_calls=["call"]), id="tool-call-string"),
    pytest.param(
        completion(tool_calls=[{"id": "call", "function": {"arguments": {}}}]),
        id="arguments-object",
    ),
    pytest.param(
        completion(tool_calls=[{"id": "call", "custom": {"input": 5}}]),
        id="custom-input-number",
    ),
    pytest.param(completion(function_call=["lookup"]), id="function-call-list"),
]
