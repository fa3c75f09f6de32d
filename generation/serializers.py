"""Request bodies of the text generation endpoint."""

from rest_framework import serializers


class StrictCharField(serializers.CharField):
    """A CharField that rejects numbers and booleans instead of converting them."""

    default_error_messages = {"invalid": "Expected a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


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


class GenerateTextSerializer(serializers.Serializer):
    prompt = StrictCharField(max_length=1_000_000)
    model = StrictCharField(required=False, max_length=128)
    system = StrictCharField(required=False, max_length=1_000_000)
    max_tokens = StrictIntegerField(required=False, min_value=1, max_value=1_000_000)
    temperature = StrictFloatField(required=False, min_value=0, max_value=2)

    def validate(self, attrs: dict) -> dict:
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError(
                {unknown[0]: "Unknown field. Remove it from the request."}
            )
        return attrs
