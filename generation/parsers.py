"""A JSON parser that rejects bodies over the configured size."""

import io
import re

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from proxy_site.errors import RequestTooLarge


class LimitedJSONParser(JSONParser):
    """Parse JSON, raising RequestTooLarge (413) for a body over the limit.

    The limit is `PROXY_MAX_REQUEST_BYTES`. DRF 3.18 first reads the body
    through `request.body`, where Django applies DATA_UPLOAD_MAX_MEMORY_SIZE
    (set to the same value). This check keeps the limit when a test or a
    later DRF passes the stream instead. It also rejects lone surrogates.
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
            parsed = super().parse(io.BytesIO(data), media_type, parser_context)
        except RecursionError as exc:
            raise ParseError(
                "JSON parse error - the JSON is nested too deeply."
            ) from exc
        if SURROGATE_ESCAPE.search(data) and has_lone_surrogate(parsed):
            raise ParseError(
                "JSON parse error - a string contains an unpaired UTF-16 "
                "surrogate escape (from \\ud800 to \\udfff), which is not text."
            )
        return parsed


# JSON decodes a surrogate pair escape into one character, but leaves a lone
# surrogate in the string, and such a string cannot be encoded to send upstream.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(
            has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return any(has_lone_surrogate(item) for item in value)
    return False
