"""A JSON parser that rejects bodies over the configured size or nesting depth."""

import codecs
import io
import re
import sys

from django.conf import settings
from rest_framework.exceptions import ParseError, UnsupportedMediaType
from rest_framework.parsers import JSONParser

from proxy_site.errors import RequestTooLarge

# Deepest nesting of arrays and objects accepted in a request body. Chat
# messages, tool definitions and JSON schemas need far less. Code that later
# walks the body recursively (DRF's JSONField, json.dumps, the openai client)
# would hit Python's recursion limit, 1000 frames by default, on a body
# nested a few hundred levels deep.
MAX_JSON_DEPTH = 100


class LimitedJSONParser(JSONParser):
    """Parse JSON, raising RequestTooLarge (413) for a body over the limit.

    The limit is `PROXY_MAX_REQUEST_BYTES`. DRF 3.18 first reads the body
    through `request.body`, where Django applies DATA_UPLOAD_MAX_MEMORY_SIZE
    (set to the same value). This check keeps the limit when a test or a
    later DRF passes the stream instead. It also rejects lone surrogates and
    nesting deeper than MAX_JSON_DEPTH, with ParseError (400 invalid_json),
    and a compressed body (see reject_content_encoding).
    """

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.PROXY_MAX_REQUEST_BYTES
        request = (parser_context or {}).get("request")
        if request is not None:
            reject_content_encoding(request.META.get("HTTP_CONTENT_ENCODING", ""))
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
        except ParseError as exc:
            raise _plain_parse_error(exc, parser_context) from exc
        # Each level of nesting takes one bracket, so a body with few brackets
        # (in strings or not) needs no walk.
        brackets = data.count(b"[") + data.count(b"{")
        if brackets > MAX_JSON_DEPTH and exceeds_depth(parsed, MAX_JSON_DEPTH):
            raise ParseError(
                f"JSON parse error - arrays and objects may nest at most "
                f"{MAX_JSON_DEPTH} levels deep."
            )
        # SURROGATE_ESCAPE matches the escape's bytes in UTF-8 (and ASCII)
        # only, so a body in another charset is always walked.
        encoding = (parser_context or {}).get("encoding") or "utf-8"
        maybe_surrogate = (
            SURROGATE_ESCAPE.search(data) or codecs.lookup(encoding).name != "utf-8"
        )
        if maybe_surrogate and has_lone_surrogate(parsed):
            raise ParseError(
                "JSON parse error - a string contains an unpaired UTF-16 "
                "surrogate escape (from \\ud800 to \\udfff), which is not text."
            )
        return parsed


def _plain_parse_error(error: ParseError, parser_context: dict | None) -> ParseError:
    """Return `error`, or a clearer one where Python's message names its internals.

    DRF puts the decoder's message in the detail. For a body that is not
    valid in its charset, one that starts with a byte order mark, and a
    number too long to convert, that message is about Python's codecs,
    utf-8-sig or sys.set_int_max_str_digits(), which a client cannot act on.
    """
    cause = error.__context__
    if isinstance(cause, UnicodeDecodeError):
        encoding = (parser_context or {}).get("encoding") or "utf-8"
        return ParseError(
            f"JSON parse error - the body is not valid {encoding}: byte "
            f"0x{cause.object[cause.start]:02x} at position {cause.start}. "
            "Send the body as UTF-8."
        )
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return ParseError(
            "JSON parse error - a number has more than "
            f"{sys.get_int_max_str_digits()} digits."
        )
    if isinstance(cause, ValueError) and str(cause).startswith("Unexpected UTF-8 BOM"):
        return ParseError(
            "JSON parse error - the body starts with a UTF-8 byte order mark. "
            "Send the JSON without it."
        )
    if type(cause) is UnicodeError:
        # The UTF-16 and UTF-32 codecs raise plain UnicodeError for a body
        # without a byte order mark.
        encoding = (parser_context or {}).get("encoding") or "utf-8"
        return ParseError(
            f"JSON parse error - the body is not valid {encoding}. Send the "
            "body as UTF-8."
        )
    return error


def reject_content_encoding(encoding: str) -> None:
    """Raise UnsupportedMediaType (415) for a body sent with a content coding.

    The proxy does not decompress bodies, and would otherwise report a
    compressed body as malformed JSON.
    """
    if encoding.strip().lower() in ("", "identity"):
        return
    raise UnsupportedMediaType(
        encoding,
        detail=f"The request body has Content-Encoding {encoding!r}, which the "
        "proxy does not accept. Send the JSON body uncompressed.",
    )


# JSON decodes a surrogate pair escape into one character, but leaves a lone
# surrogate in the string, and such a string cannot be encoded to send upstream.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def exceeds_depth(value: object, limit: int) -> bool:
    """Return whether lists and dicts in `value` nest more than `limit` deep.

    The walk goes one level at a time, without recursion, so any depth works.
    """
    if not isinstance(value, dict | list):
        return False
    level = [value]
    depth = 1
    while level:
        if depth > limit:
            return True
        inner = []
        for container in level:
            children = container.values() if isinstance(container, dict) else container
            inner.extend(child for child in children if isinstance(child, dict | list))
        level = inner
        depth += 1
    return False


def has_lone_surrogate(value: object) -> bool:
    """Return whether any string in `value`, dict keys included, contains a
    lone surrogate. The walk uses a list as its stack, so any depth works."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not _is_encodable(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
