from io import StringIO

import pytest
from django.core.management import call_command


def test_schema_validates_without_warnings(tmp_path):
    target = tmp_path / "schema.json"
    call_command(
        "spectacular",
        "--validate",
        "--fail-on-warn",
        "--format",
        "openapi-json",
        "--file",
        str(target),
        stderr=StringIO(),
    )
    assert target.stat().st_size > 0


@pytest.fixture
def schema(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_schema_is_served_as_json(schema):
    assert schema["openapi"].startswith("3.")


def test_schema_lists_every_endpoint(schema):
    assert set(schema["paths"]) == {
        "/generate-text/",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{model}",
    }


def test_schema_documents_key_schemes(schema):
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"]["type"] == "apiKey"
    assert schemes["ApiKeyHeader"]["in"] == "header"
    assert schemes["ApiKeyHeader"]["name"] == "x-api-key"
    assert schemes["BearerKey"]["scheme"] == "bearer"


def test_generate_text_request_requires_prompt(schema):
    request = schema["components"]["schemas"]["GenerateTextRequest"]
    assert request["required"] == ["prompt"]
    assert "stream" in request["properties"]


def test_errors_use_openai_envelope(schema):
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    error_ref = responses["401"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref == "#/components/schemas/Error"
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
