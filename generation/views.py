"""HTTP endpoints: text generation and liveness."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe
from rest_framework import exceptions
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from keys.authentication import APIKeyAuthentication, HasAPIKey

from .parsers import LimitedJSONParser
from .serializers import GenerateTextSerializer
from .services import generate_text


class KeyHeaderBrowsableAPIRenderer(BrowsableAPIRenderer):
    """Show the request form even before the browser has sent a key.

    The key travels in a header that a browser form cannot set, so DRF's usual
    rule of showing forms only to permitted users would hide them from everyone.
    """

    def show_form_for_method(self, view, method, request, instance) -> bool:
        return method in view.allowed_methods


class GenerateTextView(APIView):
    """Generate text for a prompt with the key's tier and the upstream model.

    Send the proxy API key in the `x-api-key` header and a JSON body such as
    `{"prompt": "Say hello"}`. Optional: `model`, `system`, `max_tokens`,
    `temperature`.
    """

    authentication_classes = [APIKeyAuthentication]
    permission_classes = [HasAPIKey]
    parser_classes = [LimitedJSONParser]
    renderer_classes = [JSONRenderer, KeyHeaderBrowsableAPIRenderer]

    def initial(self, request: Request, *args, **kwargs) -> None:
        # Answer a wrong method with 405 before asking for a key. The format is
        # set first so that the error is rendered in the negotiated format.
        self.format_kwarg = self.get_format_suffix(**kwargs)
        if request.method.lower() not in self.http_method_names or not hasattr(
            self, request.method.lower()
        ):
            raise exceptions.MethodNotAllowed(request.method)
        super().initial(request, *args, **kwargs)

    def get_serializer(self, *args, **kwargs) -> GenerateTextSerializer:
        return GenerateTextSerializer(*args, **kwargs)

    def post(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        result = generate_text(api_key=request.auth, **serializer.validated_data)
        return Response(result)


@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    """Report that the process is up; checks nothing else, needs no key."""
    return JsonResponse({"status": "ok"})
