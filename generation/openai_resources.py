"""OpenAI's models and embeddings endpoints under /v1/, beside chat completions."""

import hashlib
import logging

from django.conf import settings
from django.core.cache import cache
from drf_spectacular.utils import extend_schema
from openai.types import Model
from rest_framework.request import Request
from rest_framework.response import Response

from proxy_site.errors import ModelNotFound

from .embeddings import create_embeddings
from .models import UsageRecord
from .openai_views import OpenAIView
from .schema import OPENAI_OBJECT, error_responses
from .serializers import EmbeddingSerializer, validate_body
from .upstream import get_client, upstream_errors
from .usage import UsageTracker

logger = logging.getLogger(__name__)

# Seconds the upstream's model list is kept in the Django cache, so that
# listing models does not call the upstream on every request.
UPSTREAM_MODELS_CACHE_SECONDS = 300
# Models of an allow-listed tier are listed from the tier alone, without asking
# the upstream, so they carry these fixed values instead of the upstream's.
ALLOWED_MODEL_CREATED = 0
ALLOWED_MODEL_OWNER = "proxy"
_RECORD_MODEL_LENGTH = UsageRecord._meta.get_field("model").max_length


def _allowed_model(model_id: str) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": ALLOWED_MODEL_CREATED,
        "owned_by": ALLOWED_MODEL_OWNER,
    }


def _models_cache_key() -> str:
    # One entry per upstream URL, so that after OPENAI_BASE_URL changes the
    # previous upstream's models are not served.
    digest = hashlib.sha256(settings.OPENAI_BASE_URL.encode()).hexdigest()[:16]
    return f"proxy.upstream-models.{digest}"


def _read_cached_models(key: str) -> list[dict] | None:
    # Every cache backend raises its own errors, and a cache that is down
    # only costs an upstream call here.
    try:
        return cache.get(key)
    except Exception as exc:  # noqa: BLE001
        logger.warning("Model list cache read failed: %s", type(exc).__name__)
        return None


def _write_cached_models(key: str, models: list[dict]) -> None:
    try:
        cache.set(key, models, UPSTREAM_MODELS_CACHE_SECONDS)
    except Exception as exc:  # noqa: BLE001
        logger.warning("Model list cache write failed: %s", type(exc).__name__)


def _model_objects(page: object) -> list[dict]:
    """Return the model objects of a model list reply as JSON-ready dicts.

    Raises ValueError, which upstream_errors turns into a 502, when the reply
    is not a list of models with ids.
    """
    data = getattr(page, "data", None)
    if not isinstance(data, list):
        raise ValueError("The upstream's model list has no data list.")
    for model in data:
        if not isinstance(model, Model) or not isinstance(model.id, str):
            raise ValueError("The upstream's model list has an entry without an id.")
    return [model.model_dump(mode="json", exclude_unset=True) for model in data]


def upstream_models(tracker: UsageTracker) -> list[dict]:
    """Return the upstream's models, from the cache or else from the upstream."""
    key = _models_cache_key()
    models = _read_cached_models(key)
    if models is not None:
        return models
    with upstream_errors():
        page = tracker.call_upstream(lambda: get_client().models.list())
        models = _model_objects(page)
    _write_cached_models(key, models)
    return models


def visible_models(tracker: UsageTracker) -> list[dict]:
    """Return the models the tracker's key may use, as OpenAI's model objects.

    An allow-listed tier gets its allowed ids without an upstream call. A tier
    that allows any model gets the upstream's list.
    """
    allowed = tracker.api_key.tier.allowed_model_list
    if allowed:
        return [_allowed_model(model_id) for model_id in allowed]
    return upstream_models(tracker)


class ModelListView(OpenAIView):
    """GET /v1/models: the models the key's tier may use."""

    @extend_schema(
        operation_id="list_models",
        responses={200: OPENAI_OBJECT, **error_responses(401, 429, 502, 503, 504)},
    )
    def get(self, request: Request) -> Response:
        tracker = self.start(request, "models")
        with tracker:
            models = visible_models(tracker)
            tracker.succeed(prompt_tokens=0, completion_tokens=0)
        return Response({"object": "list", "data": models})


class ModelDetailView(OpenAIView):
    """GET /v1/models/{model}: one model, if the key's tier may use it.

    For a tier that allows any model, the model must also be in the
    upstream's (cached) model list.
    """

    @extend_schema(
        operation_id="retrieve_model",
        responses={200: OPENAI_OBJECT, **error_responses(401, 404, 429, 502)},
    )
    def get(self, request: Request, model: str) -> Response:
        tracker = self.start(request, "models")
        with tracker:
            tracker.record.model = model[:_RECORD_MODEL_LENGTH]
            found = next(
                (item for item in visible_models(tracker) if item["id"] == model),
                None,
            )
            if found is None:
                raise ModelNotFound(
                    f"The model {model!r} does not exist, or this API key may "
                    f"not use it. GET /v1/models lists the models it may use.",
                    param="model",
                )
            tracker.succeed(prompt_tokens=0, completion_tokens=0)
        return Response(found)


class EmbeddingsView(OpenAIView):
    """POST /v1/embeddings."""

    @extend_schema(
        operation_id="create_embedding",
        request=EmbeddingSerializer,
        responses={
            200: OPENAI_OBJECT,
            **error_responses(400, 401, 403, 413, 415, 429, 502, 503, 504),
        },
    )
    def post(self, request: Request) -> Response:
        tracker = self.start(request, "embeddings")
        with tracker:
            data = validate_body(EmbeddingSerializer, request.data)
            options = {
                name: data[name]
                for name in ("dimensions", "user")
                if data.get(name) is not None
            }
            # The openai SDKs send encoding_format=base64 when their caller
            # chose none, and decode the vectors themselves, so the client's
            # value goes upstream unchanged. A request without one gets float,
            # OpenAI's default, sent explicitly, because the proxy's own openai
            # client would otherwise request base64 and decode it itself.
            options["encoding_format"] = data.get("encoding_format") or "float"
            response = create_embeddings(
                tracker=tracker,
                input=data["input"],
                model=data["model"],
                options=options,
            )
        # A base64 embedding is a string where the response type declares a
        # list of floats, which pydantic would warn about on every request.
        body = response.model_dump(mode="json", exclude_unset=True, warnings=False)
        return Response(body)
