"""Chat completions and chunks for scripted upstream replies, malformed ones too."""

import json

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


def split_text(text: str, count: int = 3) -> list[str]:
    """Split `text` into `count` consecutive pieces, as a stream would send it."""
    size = -(-len(text) // count)
    return [text[start : start + size] for start in range(0, len(text), size)]


# About 300 tokens of model output that is not message content.
LONG_TEXT = " ".join(["sunny"] * 300)
LONG_ARGUMENTS = json.dumps({"forecast": LONG_TEXT})


def _function(**fields: object) -> dict:
    return {"id": "call_1", "type": "function", "function": fields}


# Assistant messages whose output is all in tool calls or a refusal.
GENERATED_MESSAGES = [
    pytest.param(
        {
            "content": None,
            "tool_calls": [_function(name="f", arguments=LONG_ARGUMENTS)],
        },
        id="tool-call",
    ),
    pytest.param(
        {
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "custom",
                    "custom": {"name": "f", "input": LONG_TEXT},
                }
            ],
        },
        id="custom-tool-call",
    ),
    pytest.param(
        {"content": None, "function_call": {"name": "f", "arguments": LONG_ARGUMENTS}},
        id="function-call",
    ),
    pytest.param({"content": None, "refusal": LONG_TEXT}, id="refusal"),
]

# The same kinds of output as stream deltas, the long text split over several.
GENERATED_DELTAS = [
    pytest.param(
        [{"tool_calls": [{"index": 0, **_function(name="f", arguments="")}]}]
        + [
            {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            for piece in split_text(LONG_ARGUMENTS)
        ],
        id="tool-call",
    ),
    pytest.param(
        [{"function_call": {"name": "f", "arguments": ""}}]
        + [
            {"function_call": {"arguments": piece}}
            for piece in split_text(LONG_ARGUMENTS)
        ],
        id="function-call",
    ),
    pytest.param([{"refusal": piece} for piece in split_text(LONG_TEXT)], id="refusal"),
]


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
    pytest.param("[" * 100_000, id="nested-too-deep"),
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
    pytest.param(b"[" * 100_000, id="nested-too-deep"),
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
