"""HTTP endpoints: text generation and liveness."""

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from keys.authentication import APIKeyAuthentication, HasAPIKey
from keys.ratelimits import enforce_key_rates, rate_limit_headers
from proxy_site.error_views import method_not_allowed
from proxy_site.errors import (
    LengthRequired,
    RateLimitExceeded,
    UnreadableRequestBody,
)

from .parsers import LimitedJSONParser
from .schema import GENERATE_TEXT_RESPONSE, error_responses
from .serializers import GenerateTextSerializer, validate_body
from .services import generate_text
from .streaming import ChatStreamRelay, event_stream_response
from .usage import UsageTracker


class KeyHeaderBrowsableAPIRenderer(BrowsableAPIRenderer):
    """Show the request form even before the browser has sent a key.

    The key travels in a header that a browser form cannot set, so DRF's usual
    rule of showing forms only to permitted users would hide them from everyone.
    """

    def show_form_for_method(self, view, method, request, instance) -> bool:
        return method in view.allowed_methods


class KeyedAPIView(APIView):
    """Base of the endpoints that take a proxy API key and count against limits.

    Subclasses call `start(request, endpoint)` first in their handler: it
    counts the request against the key's rates and returns the tracker that
    records the request's outcome.
    """

    permission_classes = [HasAPIKey]
    parser_classes = [LimitedJSONParser]
    # OPTIONS gets 405 like any other method the endpoint does not serve, so it
    # neither looks the key up nor escapes the key's rate limits. The 405's
    # Allow header lists the methods, and /openapi.json describes the bodies.
    http_method_names = [
        name for name in APIView.http_method_names if name != "options"
    ]

    def initial(self, request: Request, *args, **kwargs) -> None:
        self.rate_limit_headers: dict[str, str] = {}
        self.tracker: UsageTracker | None = None
        # Reject a wrong method with 405 before checking the key. The format is
        # set first so that the error is rendered in the negotiated format.
        self.format_kwarg = self.get_format_suffix(**kwargs)
        if request.method.lower() not in self.http_method_names or not hasattr(
            self, request.method.lower()
        ):
            raise exceptions.MethodNotAllowed(request.method)
        # Without a length, Django reads no body, and the request would look
        # empty instead of being rejected.
        meta = request.META
        if "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower() and not meta.get(
            "CONTENT_LENGTH"
        ):
            raise LengthRequired()
        self._read_post_body(request)
        super().initial(request, *args, **kwargs)

    def _read_post_body(self, request: Request) -> None:
        """Read a POST body now, before the key is looked up.

        A client that stalls while sending its body then holds a worker
        thread, each wait bounded by PROXY_REQUEST_BODY_TIMEOUT, but no
        database connection. A body over the limit is left for the parser to
        reject without reading it. No GET view reads a body, so a GET's stays
        unread.
        """
        declared = request.META.get("CONTENT_LENGTH") or ""
        if not (
            request.method == "POST"
            and declared.isdigit()
            and 0 < int(declared) <= settings.PROXY_MAX_REQUEST_BYTES
        ):
            return
        body = request._request.body
        if len(body) < int(declared):
            # The client closed its side before sending Content-Length bytes.
            # The part that came may still parse as JSON.
            raise UnreadableRequestBody(
                f"The request body ended after {len(body)} of the {declared} "
                "bytes that Content-Length declared. Send the whole body."
            )

    def start(self, request: Request, endpoint: str) -> UsageTracker:
        api_key = request.auth
        tracker = UsageTracker(
            api_key=api_key,
            endpoint=endpoint,
            request_id=request._request.request_id,
        )
        self.tracker = tracker
        with tracker:
            try:
                usages = enforce_key_rates(request._request, api_key)
            except RateLimitExceeded as exc:
                # The refusal carries the windows' headers too, and the /v1/
                # views repeat them under OpenAI's names.
                self.rate_limit_headers = dict(exc.headers)
                raise
        self.rate_limit_headers = rate_limit_headers(usages)
        return tracker

    def finalize_response(self, request, response, *args, **kwargs):
        if response.status_code == 429:
            # Limit refusals are JSON even for a browser, so that no client
            # mistakes them for a page.
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        response = super().finalize_response(request, response, *args, **kwargs)
        for name, value in getattr(self, "rate_limit_headers", {}).items():
            response.headers.setdefault(name, value)
        return response


class GenerateTextView(KeyedAPIView):
    """Generate text for a prompt with the key's tier and the upstream model.

    Send the proxy API key in the `x-api-key` header and a JSON body such as
    `{"prompt": "Say hello"}`. Optional: `model`, `system`, `max_tokens`,
    `temperature`, and `stream` for server-sent events.
    """

    authentication_classes = [APIKeyAuthentication]
    renderer_classes = [JSONRenderer, KeyHeaderBrowsableAPIRenderer]

    def get_serializer(self, *args, **kwargs) -> GenerateTextSerializer:
        return GenerateTextSerializer(*args, **kwargs)

    @extend_schema(
        operation_id="generate_text",
        request=GenerateTextSerializer,
        responses={
            200: GENERATE_TEXT_RESPONSE,
            **error_responses(400, 403, 413, 415, 429, 502, 503, 504),
        },
        description="With `stream: true` the response is server-sent events: "
        '`{"text": ...}` per piece of text, then `{"model": ..., "usage": ...}`, '
        "then `[DONE]`.",
    )
    def post(self, request: Request) -> HttpResponseBase:
        # Order: rate limit, then input, then the tier's rules and quota.
        tracker = self.start(request, "generate-text")
        with tracker:
            data = validate_body(GenerateTextSerializer, request.data)
            result = generate_text(tracker=tracker, **data)
        if isinstance(result, ChatStreamRelay):
            return event_stream_response(result, self.rate_limit_headers)
        return Response(result)


@extend_schema(exclude=True)
@csrf_exempt
def healthz(request: HttpRequest) -> JsonResponse:
    """Report that the process is up; checks nothing else, needs no key."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, ["GET", "HEAD"])
    return JsonResponse({"status": "ok"})
