"""The /v1/models and /v1/embeddings endpoints, driven by the real openai client."""

import json
import urllib.error
import urllib.request

import bpe_openai
import openai
import pytest

from generation.models import QuotaCounter, UsageRecord
from generation.tokens import count_text_tokens
from keys.models import PromptRule
from tests.factories import make_key, make_tier
from tests.fake_upstream import (
    DEFAULT_MODELS,
    EMBEDDING_DIMENSIONS,
    Behaviour,
    embedding_vector,
)

pytestmark = pytest.mark.django_db(transaction=True)

EMBEDDING_MODEL = "text-embedding-3-small"
ALLOWED_MODELS = ["text-embedding-3-small", "meta-llama/Llama-3:8b"]


def vector(key: str) -> list[float]:
    return embedding_vector(key, EMBEDDING_DIMENSIONS)


@pytest.fixture
def tier():
    """A tier that allows any model."""
    return make_tier("sdk", rate_limits="100/m", tokens_per_day=100_000)


@pytest.fixture
def listed_tier():
    return make_tier("listed", allowed_models=", ".join(ALLOWED_MODELS))


@pytest.fixture
def raw_key(tier):
    return make_key(tier=tier)[1]


def make_client(live_server, raw_key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=live_server.url + "/v1", api_key=raw_key, max_retries=0, timeout=10
    )


@pytest.fixture
def sdk(live_server, upstream, raw_key):
    client = make_client(live_server, raw_key)
    yield client
    client.close()


@pytest.fixture
def listed_sdk(live_server, upstream, listed_tier):
    client = make_client(live_server, make_key(tier=listed_tier)[1])
    yield client
    client.close()


def embed(sdk, **kwargs):
    kwargs.setdefault("model", EMBEDDING_MODEL)
    kwargs.setdefault("input", "hello world")
    return sdk.embeddings.create(**kwargs)


def post_json(live_server, path: str, body: dict, raw_key: str) -> tuple[int, dict]:
    """POST a JSON body without the openai SDK, which always adds encoding_format."""
    request = urllib.request.Request(
        live_server.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "x-api-key": raw_key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class TestModelList:
    def test_allowed_models_are_listed(self, listed_sdk, upstream):
        models = listed_sdk.models.list().data
        assert [model.id for model in models] == ALLOWED_MODELS
        assert models[0].owned_by == "proxy"
        assert models[0].created == 0
        assert upstream.requests == []

    def test_any_model_tier_lists_upstream(self, sdk, upstream):
        models = sdk.models.list().data
        assert [model.id for model in models] == list(DEFAULT_MODELS)
        assert models[0].owned_by == "fake-upstream"
        assert upstream.requests[0].path == "/v1/models"

    def test_upstream_list_is_cached(self, sdk, upstream):
        sdk.models.list()
        second = sdk.models.list().data
        assert [model.id for model in second] == list(DEFAULT_MODELS)
        assert len(upstream.requests) == 1

    def test_cache_is_per_upstream_url(self, sdk, upstream, settings):
        sdk.models.list()
        settings.OPENAI_BASE_URL = upstream.base_url + "/"
        sdk.models.list()
        assert len(upstream.requests) == 2

    def test_upstream_failure_is_502(self, sdk, upstream):
        upstream.queue(Behaviour(status=500))
        with pytest.raises(openai.InternalServerError) as excinfo:
            sdk.models.list()
        assert excinfo.value.status_code == 502
        assert excinfo.value.code == "upstream_error"

    def test_failure_is_not_cached(self, sdk, upstream):
        upstream.queue(Behaviour(status=500))
        with pytest.raises(openai.InternalServerError):
            sdk.models.list()
        models = sdk.models.list().data
        assert [model.id for model in models] == list(DEFAULT_MODELS)

    def test_malformed_upstream_list_is_502(self, sdk, upstream):
        upstream.queue(Behaviour(body={"object": "list", "data": [{"object": "x"}]}))
        with pytest.raises(openai.InternalServerError) as excinfo:
            sdk.models.list()
        assert excinfo.value.code == "upstream_error"

    def test_listing_is_recorded(self, sdk, upstream):
        sdk.models.list()
        record = UsageRecord.objects.get()
        assert record.endpoint == "models"
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert record.prompt_tokens == 0
        assert record.completion_tokens == 0
        assert record.reserved_tokens == 0

    def test_listing_uses_no_quota(self, sdk, upstream):
        sdk.models.list()
        assert not QuotaCounter.objects.filter(reserved__gt=0).exists()
        assert not QuotaCounter.objects.filter(used__gt=0).exists()


class TestModelRetrieve:
    def test_allowed_model_is_returned(self, listed_sdk, upstream):
        model = listed_sdk.models.retrieve("meta-llama/Llama-3:8b")
        assert model.id == "meta-llama/Llama-3:8b"
        assert model.object == "model"
        assert upstream.requests == []

    def test_disallowed_model_is_not_found(self, listed_sdk, upstream):
        with pytest.raises(openai.NotFoundError) as excinfo:
            listed_sdk.models.retrieve("gpt-4o")
        assert excinfo.value.code == "model_not_found"
        assert excinfo.value.param == "model"

    def test_upstream_model_is_returned(self, sdk, upstream):
        model = sdk.models.retrieve("gpt-4o")
        assert model.id == "gpt-4o"
        assert model.owned_by == "fake-upstream"

    def test_unknown_upstream_model_is_not_found(self, sdk, upstream):
        with pytest.raises(openai.NotFoundError) as excinfo:
            sdk.models.retrieve("no-such-model")
        assert excinfo.value.code == "model_not_found"

    def test_retrieve_uses_cached_list(self, sdk, upstream):
        sdk.models.list()
        sdk.models.retrieve("gpt-4o")
        assert len(upstream.requests) == 1

    def test_retrieve_is_recorded(self, sdk, upstream):
        sdk.models.retrieve("gpt-4o")
        record = UsageRecord.objects.get()
        assert record.endpoint == "models"
        assert record.model == "gpt-4o"
        assert record.status == UsageRecord.Status.SUCCEEDED

    def test_not_found_is_recorded(self, listed_sdk, upstream):
        with pytest.raises(openai.NotFoundError):
            listed_sdk.models.retrieve("gpt-4o")
        record = UsageRecord.objects.get()
        assert record.status == UsageRecord.Status.REFUSED
        assert record.http_status == 404
        assert record.reason == "model_not_found"


class TestEmbeddings:
    def test_string_input_as_float(self, sdk, upstream):
        response = embed(sdk, input="hello world", encoding_format="float")
        assert response.data[0].embedding == vector("hello world")
        assert upstream.requests[0].json["encoding_format"] == "float"

    def test_list_input_as_float(self, sdk, upstream):
        response = embed(sdk, input=["alpha beta", "gamma"], encoding_format="float")
        assert [item.index for item in response.data] == [0, 1]
        assert response.data[0].embedding == vector("alpha beta")
        assert response.data[1].embedding == vector("gamma")

    def test_default_encoding_is_base64(self, sdk, upstream):
        response = embed(sdk, input=["alpha beta", "gamma"])
        assert upstream.requests[0].json["encoding_format"] == "base64"
        assert response.data[0].embedding == vector("alpha beta")
        assert response.data[1].embedding == vector("gamma")

    def test_explicit_base64_stays_encoded(self, sdk, upstream):
        response = embed(sdk, input="alpha", encoding_format="base64")
        assert isinstance(response.data[0].embedding, str)

    def test_token_ids_are_accepted(self, sdk, upstream):
        response = embed(sdk, input=[11, 22, 33], encoding_format="float")
        assert response.data[0].embedding == vector(json.dumps([11, 22, 33]))
        assert UsageRecord.objects.get().reserved_tokens == 3

    def test_token_id_lists_are_accepted(self, sdk, upstream):
        response = embed(sdk, input=[[1, 2], [3]], encoding_format="float")
        assert response.data[1].embedding == vector(json.dumps([3]))
        assert UsageRecord.objects.get().reserved_tokens == 3

    def test_options_are_forwarded(self, sdk, upstream):
        response = embed(sdk, dimensions=40, user="u-1", encoding_format="float")
        sent = upstream.requests[0].json
        assert sent["dimensions"] == 40
        assert sent["user"] == "u-1"
        assert len(response.data[0].embedding) == 40

    def test_response_names_model(self, sdk, upstream):
        response = embed(sdk, model="text-embedding-3-large")
        assert response.model == "text-embedding-3-large"

    def test_no_encoding_format_returns_floats(self, live_server, upstream, raw_key):
        status, body = post_json(
            live_server,
            "/v1/embeddings",
            {"model": EMBEDDING_MODEL, "input": "alpha"},
            raw_key,
        )
        assert status == 200
        assert body["data"][0]["embedding"] == vector("alpha")
        assert upstream.requests[0].json["encoding_format"] == "float"

    def test_missing_model_is_rejected(self, live_server, upstream, raw_key, tier):
        # Even a tier whose default model is an embeddings model does not
        # stand in for it, as OpenAI's API requires the field.
        tier.default_model = EMBEDDING_MODEL
        tier.save()
        status, body = post_json(live_server, "/v1/embeddings", {"input": "a"}, raw_key)
        assert status == 400
        assert body["error"]["code"] == "invalid_request"
        assert body["error"]["param"] == "model"
        assert "model field is required for embeddings" in body["error"]["message"]
        assert upstream.requests == []


class TestEmbeddingUsage:
    def test_usage_is_recorded(self, sdk, upstream):
        response = embed(sdk, input=["alpha beta", "gamma"])
        record = UsageRecord.objects.get()
        assert record.endpoint == "embeddings"
        assert record.model == EMBEDDING_MODEL
        assert record.status == UsageRecord.Status.SUCCEEDED
        assert record.prompt_tokens == response.usage.prompt_tokens
        assert record.completion_tokens == 0

    def test_quota_is_reserved_and_settled(self, sdk, upstream):
        text = "unbelievably antidisestablishmentarianism"
        response = embed(sdk, input=text)
        record = UsageRecord.objects.get()
        assert record.reserved_tokens == count_text_tokens(EMBEDDING_MODEL, text)
        day = QuotaCounter.objects.get(period="day")
        assert day.reserved == 0
        assert day.used == response.usage.prompt_tokens

    def test_missing_usage_charges_own_count(self, sdk, upstream):
        item = {"object": "embedding", "index": 0, "embedding": [0.5]}
        body = {"object": "list", "data": [item], "model": EMBEDDING_MODEL}
        upstream.queue(Behaviour(body=body))
        embed(sdk, input="hello world", encoding_format="float")
        expected = count_text_tokens(EMBEDDING_MODEL, "hello world")
        assert UsageRecord.objects.get().prompt_tokens == expected
        assert QuotaCounter.objects.get(period="day").used == expected

    def test_input_over_whole_quota_is_400(self, sdk, upstream, tier):
        tier.tokens_per_day = 2
        tier.save()
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, input="one two three four five")
        assert excinfo.value.code == "invalid_request"
        assert upstream.requests == []

    def test_upstream_failure_is_502(self, sdk, upstream):
        upstream.queue(Behaviour(status=500))
        with pytest.raises(openai.InternalServerError) as excinfo:
            embed(sdk)
        assert excinfo.value.status_code == 502
        assert excinfo.value.code == "upstream_error"

    @pytest.mark.parametrize(
        "body",
        [
            [1],
            "text",
            {"object": "list"},
            {"object": "list", "data": [7], "model": "m"},
            {"object": "list", "data": [{"index": 0}], "model": "m"},
            {
                "object": "list",
                "data": [{"index": 0, "embedding": {"a": 1}}],
                "model": "m",
            },
            {
                "object": "list",
                "data": [{"index": 0, "embedding": [0.1, "x"]}],
                "model": "m",
            },
            {
                "object": "list",
                "data": [{"index": "0", "embedding": [0.1]}],
                "model": "m",
            },
        ],
    )
    def test_malformed_reply_is_502(self, sdk, upstream, body):
        upstream.queue(Behaviour(status=200, body=body))
        with pytest.raises(openai.InternalServerError) as excinfo:
            embed(sdk)
        assert excinfo.value.status_code == 502
        assert excinfo.value.code == "upstream_error"
        assert QuotaCounter.objects.get(period="day").reserved == 0

    def test_upstream_failure_releases_quota(self, sdk, upstream):
        upstream.queue(Behaviour(status=500))
        with pytest.raises(openai.InternalServerError):
            embed(sdk)
        day = QuotaCounter.objects.get(period="day")
        assert day.reserved == 0
        assert day.used == 0
        assert UsageRecord.objects.get().status == UsageRecord.Status.FAILED


class TestEmbeddingRules:
    def test_disallowed_model_is_403(self, listed_sdk, upstream):
        with pytest.raises(openai.PermissionDeniedError) as excinfo:
            embed(listed_sdk, model="text-embedding-3-large")
        assert excinfo.value.code == "model_not_allowed"
        assert upstream.requests == []

    def test_blocked_input_is_rejected(self, sdk, upstream, tier):
        rule = PromptRule.objects.create(name="r", pattern="forbidden", message="No.")
        tier.rules.add(rule)
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, input=["fine", "a forbidden word"])
        assert excinfo.value.code == "prompt_rejected"
        assert excinfo.value.body["rule_id"] == rule.pk
        assert upstream.requests == []

    def test_block_rule_sees_token_ids(self, sdk, upstream, tier):
        rule = PromptRule.objects.create(name="r", pattern="forbidden", message="No.")
        tier.rules.add(rule)
        # text-embedding-3-small reads cl100k_base token ids.
        token_ids = bpe_openai.get_encoding("cl100k_base").encode("a forbidden word")
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, model="text-embedding-3-small", input=[token_ids])
        assert excinfo.value.code == "prompt_rejected"
        assert upstream.requests == []

    def test_allow_only_tier_rejects_token_ids(self, sdk, upstream, tier):
        rule = PromptRule.objects.create(
            name="r",
            pattern="weather",
            action=PromptRule.Action.ALLOW,
            message="Weather only.",
        )
        tier.rules.add(rule)
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, input=[1, 2, 3])
        assert excinfo.value.code == "prompt_rejected"

    def test_long_input_is_rejected(self, sdk, upstream, tier):
        tier.max_prompt_chars = 10
        tier.save()
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, input=["hello", "world!"])
        assert excinfo.value.code == "prompt_too_long"
        assert excinfo.value.param == "input"


class TestEmbeddingValidation:
    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("", id="empty-string"),
            pytest.param([], id="empty-list"),
            pytest.param(["a", ""], id="empty-item"),
            pytest.param([[]], id="empty-token-list"),
            pytest.param(123, id="number"),
            pytest.param({"text": "a"}, id="object"),
            pytest.param(None, id="null"),
            pytest.param([1, "a"], id="mixed"),
            pytest.param([True], id="boolean"),
            pytest.param([-1], id="negative-token"),
            pytest.param([1.5], id="float-token"),
            pytest.param([["a"]], id="string-in-token-list"),
        ],
    )
    def test_bad_input_is_400(self, sdk, upstream, value):
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, input=value)
        assert excinfo.value.code == "invalid_request"
        assert excinfo.value.param == "input"
        assert upstream.requests == []

    @pytest.mark.parametrize(
        "field,value",
        [
            ("encoding_format", "hex"),
            ("dimensions", 0),
            ("dimensions", "8"),
            ("user", 5),
            ("model", 5),
        ],
    )
    def test_bad_option_is_400(self, sdk, upstream, field, value):
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, extra_body={field: value})
        assert excinfo.value.param == field

    def test_unknown_field_is_400(self, sdk, upstream):
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, extra_body={"temperature": 1})
        assert excinfo.value.param == "temperature"

    def test_body_api_key_is_rejected(self, sdk, upstream):
        with pytest.raises(openai.BadRequestError) as excinfo:
            embed(sdk, extra_body={"api_key": "x"})
        assert excinfo.value.param == "api_key"
        assert upstream.requests == []


ROUTES = {
    "list": lambda client: client.models.list(),
    "retrieve": lambda client: client.models.retrieve("gpt-4o"),
    "embeddings": lambda client: embed(client),
}


class TestAccess:
    @pytest.mark.parametrize("route", ROUTES)
    def test_bad_key_is_401(self, live_server, upstream, route):
        client = make_client(live_server, "sk-not-a-real-key")
        with pytest.raises(openai.AuthenticationError) as excinfo:
            ROUTES[route](client)
        assert excinfo.value.code == "invalid_api_key"
        assert upstream.requests == []

    @pytest.mark.parametrize("route", ROUTES)
    def test_rate_limit_is_429(self, sdk, upstream, tier, route):
        tier.rate_limits = "1/m"
        tier.save()
        ROUTES[route](sdk)
        with pytest.raises(openai.RateLimitError) as excinfo:
            ROUTES[route](sdk)
        assert excinfo.value.code == "rate_limit_exceeded"
        headers = excinfo.value.response.headers
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("s")

    def test_rate_headers_are_sent(self, sdk, upstream):
        raw = sdk.models.with_raw_response.list()
        assert raw.headers["x-ratelimit-limit-requests"] == "100"
        assert raw.headers["x-ratelimit-remaining-requests"] == "99"
