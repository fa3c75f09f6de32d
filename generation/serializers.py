"""Request bodies of the text generation endpoint."""

import math

from django.core.validators import RegexValidator
from rest_framework import serializers


class StrictCharField(serializers.CharField):
    """A CharField that rejects numbers and booleans instead of converting them."""

    default_error_messages = {"invalid": "Expected a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


def validate_not_blank(value: str) -> None:
    if not value.strip():
        raise serializers.ValidationError("This field may not be blank.")


class ModelNameField(StrictCharField):
    """A model name: up to 128 characters, without whitespace or control characters."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("max_length", 128)
        super().__init__(**kwargs)
        self.validators.append(
            RegexValidator(
                r"^[^\s\x00-\x1f\x7f]+$",
                message="A model name may not contain whitespace or control "
                "characters.",
            )
        )


class StrictIntegerField(serializers.IntegerField):
    """An IntegerField that accepts JSON integers only, not strings or booleans."""

    default_error_messages = {"invalid": "Expected an integer."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A FloatField that accepts JSON numbers only, not strings or booleans."""

    default_error_messages = {"invalid": "Expected a number."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A BooleanField that accepts JSON true and false only, not "yes" or 1."""

    default_error_messages = {"invalid": "Expected true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


NON_FINITE_MESSAGE = (
    "A number in this value is out of range. Send finite numbers, at most "
    "about 1.8e308 in magnitude."
)


def contains_non_finite(value: object) -> bool:
    """Return whether `value` contains an infinite or NaN float at any depth.

    Python's json module parses a number beyond the float range, such as
    1e400, as infinity, which cannot be encoded as JSON again.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


class FiniteJSONField(serializers.JSONField):
    """A JSONField that rejects infinite and NaN numbers with a clear message."""

    def to_internal_value(self, data):
        if contains_non_finite(data):
            raise serializers.ValidationError(NON_FINITE_MESSAGE)
        return super().to_internal_value(data)


class TypedJSONField(serializers.JSONField):
    """A JSONField whose value must be one of the given JSON types, with
    finite numbers only."""

    def __init__(self, *, types: tuple[type, ...], expected: str, **kwargs) -> None:
        self.types = types
        self.expected = expected
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if (
            isinstance(data, bool)
            and bool not in self.types
            or not isinstance(data, self.types)
        ):
            raise serializers.ValidationError(f"Expected {self.expected}.")
        if contains_non_finite(data):
            raise serializers.ValidationError(NON_FINITE_MESSAGE)
        return data


class RejectUnknownFieldsMixin:
    """Reject fields the serializer does not declare, naming the first one."""

    # Fields that would let a client choose the upstream or its credentials.
    upstream_fields = frozenset(
        {"api_key", "api_base", "base_url", "organization", "project", "headers"}
    )

    def validate(self, attrs: dict) -> dict:
        if not isinstance(self.initial_data, dict):
            return attrs
        unknown = sorted(set(self.initial_data) - set(self.fields))
        for name in unknown:
            if name in self.upstream_fields:
                raise serializers.ValidationError(
                    {name: "Clients cannot choose the upstream or its credentials."}
                )
        if unknown:
            raise serializers.ValidationError(
                {
                    unknown[
                        0
                    ]: "Unknown or unsupported field. Remove it from the request."
                }
            )
        return attrs


class GenerateTextSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    # Whitespace is kept as sent: it can matter, in code for example.
    prompt = StrictCharField(
        max_length=1_000_000, trim_whitespace=False, validators=[validate_not_blank]
    )
    model = ModelNameField(required=False)
    system = StrictCharField(
        required=False, max_length=1_000_000, trim_whitespace=False
    )
    max_tokens = StrictIntegerField(required=False, min_value=1, max_value=1_000_000)
    temperature = StrictFloatField(required=False, min_value=0, max_value=2)
    stream = StrictBooleanField(required=False, default=False)


MESSAGE_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# The fields of a chat message in OpenAI's API. Any other field is rejected, so
# that no text reaches the upstream without the tier's rules and limits seeing it.
MESSAGE_FIELDS = {
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "refusal",
    "audio",
}
# The fields of a tool call, and the text fields of its `function` and `custom`.
TOOL_CALL_FIELDS = {"id", "type", "function", "custom"}
TOOL_CALL_TEXT_FIELDS = {"function": ("name", "arguments"), "custom": ("name", "input")}


def _check_optional_text(value: object, label: str) -> None:
    if value is not None and not isinstance(value, str):
        raise serializers.ValidationError(f"{label} must be a string.")


def _check_call(call: object, fields: tuple[str, ...], label: str) -> None:
    if call is None:
        return
    if not isinstance(call, dict):
        raise serializers.ValidationError(f"{label} must be an object.")
    unknown = sorted(set(call) - set(fields))
    if unknown:
        raise serializers.ValidationError(
            f"{label} has an unknown field: {unknown[0]}. Allowed fields: "
            f"{', '.join(fields)}."
        )
    for field in fields:
        _check_optional_text(call.get(field), f"{label}'s {field}")


def _check_tool_calls(tool_calls: object) -> None:
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list):
        raise serializers.ValidationError("A message's tool_calls must be a list.")
    for call in tool_calls:
        if not isinstance(call, dict):
            raise serializers.ValidationError("Each tool call must be an object.")
        unknown = sorted(set(call) - TOOL_CALL_FIELDS)
        if unknown:
            raise serializers.ValidationError(
                f"A tool call has an unknown field: {unknown[0]}. Allowed fields: "
                f"{', '.join(sorted(TOOL_CALL_FIELDS))}."
            )
        _check_optional_text(call.get("id"), "A tool call's id")
        _check_optional_text(call.get("type"), "A tool call's type")
        for field, texts in TOOL_CALL_TEXT_FIELDS.items():
            _check_call(call.get(field), texts, f"A tool call's {field}")


def validate_message(message: object) -> None:
    if not isinstance(message, dict):
        raise serializers.ValidationError("Each message must be an object.")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise serializers.ValidationError(
            f"Each message needs a role, one of: {', '.join(sorted(MESSAGE_ROLES))}."
        )
    unknown = sorted(set(message) - MESSAGE_FIELDS)
    if unknown:
        raise serializers.ValidationError(
            f"Unknown message field: {unknown[0]}. Allowed fields: "
            f"{', '.join(sorted(MESSAGE_FIELDS))}."
        )
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise serializers.ValidationError(
            "A message's content must be a string, a list of parts, or null."
        )
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                raise serializers.ValidationError(
                    "Each content part must be an object."
                )
            _check_optional_text(part.get("text"), "A content part's text")
            _check_optional_text(part.get("refusal"), "A content part's refusal")
    _check_optional_text(message.get("name"), "A message's name")
    _check_optional_text(message.get("tool_call_id"), "A message's tool_call_id")
    _check_optional_text(message.get("refusal"), "A message's refusal")
    _check_tool_calls(message.get("tool_calls"))
    _check_call(
        message.get("function_call"), ("name", "arguments"), "A message's function_call"
    )
    audio = message.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise serializers.ValidationError("A message's audio must be an object.")


def validate_stop(value: object) -> None:
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise serializers.ValidationError("Expected a string or a list of strings.")


def validate_stream_options(value: object) -> None:
    if isinstance(value, dict) and "include_usage" in value:
        if not isinstance(value["include_usage"], bool):
            raise serializers.ValidationError("include_usage must be true or false.")


class ChatCompletionSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """The body of POST /v1/chat/completions, as OpenAI's API defines it."""

    model = ModelNameField(required=False)
    messages = serializers.ListField(
        child=FiniteJSONField(validators=[validate_message]),
        allow_empty=False,
        max_length=10_000,
    )
    # OpenAI's API takes null as false here, and its SDK sends null for None.
    stream = StrictBooleanField(required=False, allow_null=True, default=False)
    stream_options = TypedJSONField(
        required=False,
        allow_null=True,
        types=(dict,),
        expected="an object",
        validators=[validate_stream_options],
    )
    max_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = StrictIntegerField(
        required=False, allow_null=True, min_value=1
    )
    n = StrictIntegerField(required=False, allow_null=True, min_value=1, max_value=128)
    temperature = StrictFloatField(
        required=False, allow_null=True, min_value=0, max_value=2
    )
    top_p = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=1)
    presence_penalty = StrictFloatField(
        required=False, allow_null=True, min_value=-2, max_value=2
    )
    frequency_penalty = StrictFloatField(
        required=False, allow_null=True, min_value=-2, max_value=2
    )
    seed = StrictIntegerField(required=False, allow_null=True)
    stop = TypedJSONField(
        required=False,
        allow_null=True,
        types=(str, list),
        expected="a string or a list of strings",
        validators=[validate_stop],
    )
    logit_bias = TypedJSONField(
        required=False, allow_null=True, types=(dict,), expected="an object"
    )
    logprobs = StrictBooleanField(required=False, allow_null=True)
    top_logprobs = StrictIntegerField(
        required=False, allow_null=True, min_value=0, max_value=20
    )
    response_format = TypedJSONField(
        required=False, allow_null=True, types=(dict,), expected="an object"
    )
    tools = TypedJSONField(
        required=False, allow_null=True, types=(list,), expected="a list"
    )
    tool_choice = TypedJSONField(
        required=False,
        allow_null=True,
        types=(str, dict),
        expected="a string or an object",
    )
    parallel_tool_calls = StrictBooleanField(required=False, allow_null=True)
    user = StrictCharField(required=False, allow_blank=True, max_length=256)
    metadata = TypedJSONField(
        required=False, allow_null=True, types=(dict,), expected="an object"
    )
    reasoning_effort = StrictCharField(required=False, max_length=32)

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)
        if "max_tokens" in attrs and "max_completion_tokens" in attrs:
            raise serializers.ValidationError(
                {"max_tokens": "Send max_tokens or max_completion_tokens, not both."}
            )
        return attrs


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class EmbeddingInputField(serializers.JSONField):
    """OpenAI's embeddings `input`: a string, or a non-empty list of one kind.

    The list contains strings, token ids (integers of 0 or more), or token-id
    lists. Empty strings and empty token-id lists are rejected, as OpenAI's
    API rejects them.
    """

    default_error_messages = {
        "invalid": "Expected a string, a list of strings, a list of token ids, "
        "or a list of token-id lists.",
        "empty": "Expected a non-empty string, or a non-empty list without "
        "empty items.",
    }

    def to_internal_value(self, data):
        if isinstance(data, str):
            if not data:
                self.fail("empty")
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        if not data:
            self.fail("empty")
        if all(isinstance(item, str) for item in data):
            if not all(data):
                self.fail("empty")
        elif all(isinstance(item, list) for item in data):
            if not all(data):
                self.fail("empty")
            if not all(_is_token_id(token) for item in data for token in item):
                self.fail("invalid")
        elif not all(_is_token_id(item) for item in data):
            self.fail("invalid")
        return data


class EmbeddingSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """The body of POST /v1/embeddings, as OpenAI's API defines it."""

    # Required, as in OpenAI's API, because a tier's default model is usually a
    # chat model.
    model = ModelNameField(
        error_messages={
            "required": "The model field is required for embeddings. Name an "
            "embeddings model, such as text-embedding-3-small."
        }
    )
    input = EmbeddingInputField()
    encoding_format = serializers.ChoiceField(
        choices=["float", "base64"], required=False, allow_null=True
    )
    dimensions = StrictIntegerField(required=False, allow_null=True, min_value=1)
    user = StrictCharField(
        required=False, allow_null=True, allow_blank=True, max_length=256
    )


# Serializers not in use, by class; see validate_body. list.pop() and
# list.append() are atomic in CPython, so threads share the lists without a lock.
_idle: dict[type[serializers.Serializer], list[serializers.Serializer]] = {}
# Attributes in which DRF (3.x) caches one validation's results on a serializer.
_RESULT_ATTRIBUTES = ("_validated_data", "_errors", "_data")


def validate_body(serializer_class: type[serializers.Serializer], data: object) -> dict:
    """Validate a request body with `serializer_class` and return the validated data.

    DRF deep-copies a serializer's declared fields for every instance, which
    on the request path costs more than the validation itself. So serializers
    are reused: a validation takes an idle one of its class (or builds one),
    clears the previous body's results, and gives it back when done. There
    are only as many of each class as validations ever ran at once, usually
    a few, where one per thread would keep hundreds in a worker of many
    threads. Raises ValidationError like is_valid, and for a body that is not
    a JSON object.
    """
    if not isinstance(data, dict):
        raise serializers.ValidationError(
            f"The request body must be a JSON object, but it is {_json_kind(data)}."
        )
    idle = _idle.setdefault(serializer_class, [])
    try:
        serializer = idle.pop()
    except IndexError:
        serializer = serializer_class(data=data)
    else:
        serializer.initial_data = data
        for name in _RESULT_ATTRIBUTES:
            serializer.__dict__.pop(name, None)
    try:
        serializer.is_valid(raise_exception=True)
        # A new dict on every validation, so the next user cannot change it.
        return serializer.validated_data
    finally:
        idle.append(serializer)


def _json_kind(value: object) -> str:
    """Return the JSON name of a parsed value's type, with an article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
