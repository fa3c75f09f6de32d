"""OpenAPI descriptions that drf-spectacular cannot infer from the views."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse, inline_serializer
from rest_framework import serializers


class APIKeyHeaderScheme(OpenApiAuthenticationExtension):
    target_class = "keys.authentication.APIKeyAuthentication"
    name = "ApiKeyHeader"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
            "description": "A proxy API key. `Authorization: Bearer` works too.",
        }


class BearerScheme(OpenApiAuthenticationExtension):
    target_class = "keys.authentication.BearerAPIKeyAuthentication"
    name = "BearerKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A proxy API key. The `x-api-key` header works too.",
        }


ERROR = inline_serializer(
    "Error",
    {
        "error": inline_serializer(
            "ErrorDetail",
            {
                "message": serializers.CharField(),
                "type": serializers.CharField(),
                "param": serializers.CharField(allow_null=True),
                "code": serializers.CharField(),
            },
        )
    },
)

USAGE = inline_serializer(
    "Usage",
    {
        "prompt_tokens": serializers.IntegerField(),
        "completion_tokens": serializers.IntegerField(),
        "total_tokens": serializers.IntegerField(),
    },
)

GENERATE_TEXT_RESPONSE = inline_serializer(
    "GenerateTextResponse",
    {"text": serializers.CharField(), "model": serializers.CharField(), "usage": USAGE},
)

# OpenAI's own response objects are passed through as the upstream sent them.
OPENAI_OBJECT = OpenApiResponse(
    description="OpenAI's response object, as the upstream returned it."
)
EVENT_STREAM = OpenApiResponse(
    description="With `stream`: server-sent events, ending with `data: [DONE]`. "
    'A failure after the first event ends the stream with `data: {"error": ...}`.'
)


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(ERROR) for status in statuses}
