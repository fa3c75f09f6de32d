"""OpenAI's API under /v1/, so that the openai SDKs work with a changed base URL.

Keys come as `Authorization: Bearer` (what the SDKs send) or `x-api-key`. A
bad key gets 401 with `WWW-Authenticate`, so the SDKs raise their
AuthenticationError; every other error has OpenAI's error body.
"""

import json

from django.http import HttpResponse, HttpResponseBase
from drf_spectacular.utils import extend_schema
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request

from keys.authentication import BearerAPIKeyAuthentication
from proxy_site.errors import DATABASE_OUTAGES

from . import quotas
from .policy import prepare_chat
from .schema import EVENT_STREAM, OPENAI_OBJECT, error_responses
from .serializers import ChatCompletionSerializer, validate_body
from .services import complete_chat, stream_chat
from .streaming import event_stream_response, sse
from .views import KeyedAPIView

# Request fields that are not sent upstream as they are: the proxy applies
# the tier's caps to them, or sets them itself.
_MANAGED_FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
}


def _definition_texts(data: dict) -> list[str]:
    """Return tool and response-format definitions as text, for the rules.

    The model reads their names, descriptions and schemas too, so block rules
    must see them; the JSON text keeps every nested description.
    """
    return [
        json.dumps(data[field], ensure_ascii=False)
        for field in ("tools", "response_format")
        if data.get(field)
    ]


def _passthrough_event(event: dict, raw: str) -> bytes:
    return sse(raw)


class JSONResponseNegotiation(DefaultContentNegotiation):
    """Content negotiation that picks JSON for any Accept header, as OpenAI does.

    Request bodies are still parsed by their content type.
    """

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class OpenAIView(KeyedAPIView):
    authentication_classes = [BearerAPIKeyAuthentication]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = JSONResponseNegotiation

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        for name, value in self._openai_rate_headers(request).items():
            response.headers.setdefault(name, value)
        return response

    def _openai_rate_headers(self, request: Request) -> dict[str, str]:
        """Repeat the limits under the header names OpenAI's own API uses."""
        headers = {}
        limit = self.rate_limit_headers.get("X-RateLimit-Limit")
        if limit is not None:
            headers["x-ratelimit-limit-requests"] = limit
            headers["x-ratelimit-remaining-requests"] = self.rate_limit_headers[
                "X-RateLimit-Remaining"
            ]
            reset = self.rate_limit_headers["X-RateLimit-Reset"]
            headers["x-ratelimit-reset-requests"] = f"{reset}s"
        # The tracker exists once the key is authenticated. Asking the request
        # for its key instead would authenticate again after a failed attempt.
        tracker = getattr(self, "tracker", None)
        if tracker is None or not quotas.caps(tracker.api_key):
            return headers
        # The counters as this request's own reservation or settlement left
        # them; a request that never reached the quota reads them.
        try:
            tightest = quotas.tightest(
                tracker.quota_states or quotas.current_states(tracker.api_key)
            )
        except DATABASE_OUTAGES:
            # Without the database the counters are unknown, and the response
            # goes out without the token headers.
            return headers
        headers["x-ratelimit-limit-tokens"] = str(tightest.cap)
        headers["x-ratelimit-remaining-tokens"] = str(tightest.left)
        reset = quotas.seconds_until(tightest.resets_at)
        headers["x-ratelimit-reset-tokens"] = f"{reset}s"
        return headers


class ChatCompletionsView(OpenAIView):
    """POST /v1/chat/completions, with or without `stream`."""

    @extend_schema(
        operation_id="create_chat_completion",
        request=ChatCompletionSerializer,
        responses={
            200: OPENAI_OBJECT,
            **error_responses(400, 401, 403, 413, 415, 429, 502, 503, 504),
        },
        description=EVENT_STREAM.description,
    )
    def post(self, request: Request) -> HttpResponseBase:
        tracker = self.start(request, "chat.completions")
        with tracker:
            data = validate_body(ChatCompletionSerializer, request.data)
            limit_field = (
                "max_completion_tokens"
                if "max_completion_tokens" in data
                else "max_tokens"
            )
            chat = prepare_chat(
                tier=tracker.api_key.tier,
                messages=data["messages"],
                model=data.get("model"),
                max_tokens=data.get(limit_field),
                max_tokens_field=limit_field,
                choices=data.get("n"),
                extra_texts=_definition_texts(data),
                text_param="messages",
            )
            options = {
                name: value
                for name, value in data.items()
                if name not in _MANAGED_FIELDS and value is not None
            }
            if data.get("stream"):
                stream_options = data.get("stream_options") or {}
                relay = stream_chat(
                    tracker=tracker,
                    chat=chat,
                    options=options,
                    usage_requested=bool(stream_options.get("include_usage")),
                    render=_passthrough_event,
                )
                return event_stream_response(relay, self.rate_limit_headers)
            reply = complete_chat(tracker=tracker, chat=chat, options=options)
        # The upstream's body goes out as it came, without a second encoding.
        return HttpResponse(reply.content, content_type="application/json")
