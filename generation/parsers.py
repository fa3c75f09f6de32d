"""A JSON parser that rejects bodies over the configured size."""

import io

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from proxy_site.errors import RequestTooLarge


class LimitedJSONParser(JSONParser):
    """Parse JSON, answering 413 for a body over `PROXY_MAX_REQUEST_BYTES`.

    DRF's parser reads the whole stream, and Django checks its own upload limit
    only on `request.body`, so without this a client could send any size.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.PROXY_MAX_REQUEST_BYTES
        request = (parser_context or {}).get("request")
        declared = request.META.get("CONTENT_LENGTH") if request is not None else None
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(
                f"The request body is {declared} bytes; the limit is {limit}."
            )
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise RequestTooLarge(f"The request body is over the {limit}-byte limit.")
        try:
            return super().parse(io.BytesIO(data), media_type, parser_context)
        except RecursionError as exc:
            raise ParseError(
                "JSON parse error - the JSON is nested too deeply."
            ) from exc
