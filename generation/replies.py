"""Shape checks of upstream chat completions and chunks, and the output they carry.

The proxy reads the choices of every reply, and the messages (or stream
deltas) in them when it counts the completion's tokens itself. A reply in
which one of those fields has the wrong type is malformed. Usage is not
checked here, because the proxy counts the tokens itself in place of any
usage value that is not a token count.
"""

from collections.abc import Iterator

from .tokens import call_texts


class MalformedReply(Exception):
    """An upstream reply or stream event without the shape of a chat completion.

    The message names the field and the type found, never the upstream's text.
    """


def check_completion(data: object) -> None:
    """Check the shape of a chat completion body and of its choices.

    Every choice must have a message. Raises MalformedReply.
    """
    if not isinstance(data, dict):
        raise MalformedReply(f"the body is {_type(data)}, expected an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedReply("choices is missing, empty or not a list")
    for index, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise MalformedReply(f"choices[{index}] is {_type(choice)}")
        check_message(choice.get("message"), f"choices[{index}].message")


def check_chunk(event: dict) -> None:
    """Check the shape of a chat.completion.chunk's choices.

    A chunk may leave out `choices` and a choice may leave out `delta`.
    Raises MalformedReply.
    """
    choices = event.get("choices")
    if choices is None:
        return
    if not isinstance(choices, list):
        raise MalformedReply(f"choices is {_type(choices)}, expected a list")
    for index, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise MalformedReply(f"choices[{index}] is {_type(choice)}")
        delta = choice.get("delta")
        if delta is not None:
            check_message(delta, f"choices[{index}].delta")
        _check_optional_string(choice, "finish_reason", f"choices[{index}]")


def check_message(message: object, where: str) -> None:
    """Check the fields of an assistant message or delta that the proxy reads.

    `where` names the message in the error. Raises MalformedReply.
    """
    if not isinstance(message, dict):
        raise MalformedReply(f"{where} is {_type(message)}, expected an object")
    _check_optional_string(message, "content", where)
    _check_optional_string(message, "refusal", where)
    function_call = message.get("function_call")
    if function_call is not None:
        _check_call(function_call, ("name", "arguments"), f"{where}.function_call")
    tool_calls = message.get("tool_calls")
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list):
        raise MalformedReply(f"{where}.tool_calls is {_type(tool_calls)}")
    for index, call in enumerate(tool_calls):
        call_where = f"{where}.tool_calls[{index}]"
        if not isinstance(call, dict):
            raise MalformedReply(f"{call_where} is {_type(call)}")
        if call.get("function") is not None:
            fields = ("name", "arguments")
            _check_call(call["function"], fields, f"{call_where}.function")
        if call.get("custom") is not None:
            _check_call(call["custom"], ("name", "input"), f"{call_where}.custom")


def generated_texts(message: dict) -> Iterator[str]:
    """Yield the text that the model generated in a checked message or delta.

    That is the content, the refusal, and the name and arguments of each tool
    call (function and custom tools) and of the legacy function_call.
    """
    yield from _strings(message, ("content", "refusal"))
    yield from call_texts(message)


def _strings(container: dict | None, names: tuple[str, ...]) -> Iterator[str]:
    if not container:
        return
    for name in names:
        value = container.get(name)
        if value:
            yield value


def _check_call(call: object, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(call, dict):
        raise MalformedReply(f"{where} is {_type(call)}, expected an object")
    for name in fields:
        _check_optional_string(call, name, where)


def _check_optional_string(container: dict, name: str, where: str) -> None:
    value = container.get(name)
    if value is not None and not isinstance(value, str):
        raise MalformedReply(
            f"{where}.{name} is {_type(value)}, expected a string or null"
        )


def _type(value: object) -> str:
    return type(value).__name__
