"""Log formatters: `key=value` lines for people, one JSON object per line for machines.

A log call may pass structured fields as `extra={"fields": {...}}`. The plain
formatter appends them to the message as `key=value` pairs, and the JSON
formatter writes them as keys of the line's object.
"""

import datetime
import json
import logging
import re

# Values made only of these characters are written without quotes. Any other
# value is quoted and escaped as a JSON string, so that a space, a quote or a
# newline in a path cannot split a line or forge a field. The whole value
# must match (fullmatch), because `$` would also accept a trailing newline.
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:/@+-]+")
# Keys of the JSON object that every line has. Fields cannot replace them.
_BASE_KEYS = ("time", "level", "logger", "request_id", "key", "message")


def logfmt_value(value: object) -> str:
    """Render one field value for a `key=value` line, with None as `-`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    return json.dumps(text)


def logfmt(fields: dict) -> str:
    """Render fields as space-separated `key=value` pairs, in the dict's order."""
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())


def _known(value: str | None) -> str | None:
    """Return None for the `-` that the log filter sets when a value is unknown."""
    return None if value in (None, "-") else value


class PlainFormatter(logging.Formatter):
    """logging.Formatter that appends a record's `fields` as `key=value` pairs."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            message = f"{message} {logfmt(fields)}"
        return message


class JSONFormatter(logging.Formatter):
    """Write each record as one JSON object on one line.

    Keys: `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`,
    `request_id` and `key` (the key's prefix), both null when unknown,
    `message`, then the record's `fields`, then `exception` and `stack` when
    the record has them. Newlines inside values are escaped, so a traceback
    stays on its line.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self._timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": _known(getattr(record, "request_id", None)),
            "key": _known(getattr(record, "key_prefix", None)),
            "message": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            if key not in _BASE_KEYS:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)

    @staticmethod
    def _timestamp(record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
