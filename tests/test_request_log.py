"""The access log: one line per request, its fields, JSON mode, and no secrets.

The tests read what the configured console handler writes, through its own
formatter and filters, by pointing the handler at a StringIO.
"""

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.utils.module_loading import import_string

from keys.models import PromptRule
from tests.factories import make_key, make_tier
from tests.fake_upstream import Behaviour
from tests.servers import run_in_project

pytestmark = pytest.mark.django_db

# A plain line: time, level, logger, [request id], message, then key=value fields.
_PLAIN_LINE = re.compile(
    r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+) \[(?P<request_id>[^\]]*)\] "
    r"(?P<rest>.*)$"
)
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Send the console handler's output to a StringIO for the test."""
    handler = next(h for h in logging.getLogger().handlers if h.name == "console")
    output = io.StringIO()
    previous = handler.setStream(output)
    yield output
    handler.setStream(previous)


@pytest.fixture
def json_log_output(log_output) -> Iterator[io.StringIO]:
    """Like log_output, with the formatter that LOG_FORMAT=json selects."""
    handler = next(h for h in logging.getLogger().handlers if h.name == "console")
    formatter_class = import_string(settings.LOGGING["formatters"]["json"]["class"])
    previous = handler.formatter
    handler.setFormatter(formatter_class())
    yield log_output
    handler.setFormatter(previous)


def parse_plain(output: io.StringIO) -> list[dict]:
    """Return each plain line as a dict: level, logger, request_id, message, fields."""
    lines = []
    for line in output.getvalue().splitlines():
        match = _PLAIN_LINE.match(line)
        assert match, f"not a log line: {line!r}"
        rest = match["rest"]
        first_field = _FIELD.search(rest)
        message = rest[: first_field.start()].strip() if first_field else rest
        fields = {key: value for key, value in _FIELD.findall(rest)}
        lines.append({**match.groupdict(), "message": message, "fields": fields})
    return lines


def access_lines(lines: list[dict], message: str = "request") -> list[dict]:
    return [
        line
        for line in lines
        if line["logger"] == "proxy.access" and line["message"] == message
    ]


def post(client, path: str, body: dict, headers: dict[str, str]):
    return client.post(
        path, json.dumps(body), content_type="application/json", headers=headers
    )


class TestAccessLine:
    def test_one_line_with_every_field(self, api_client, upstream, log_output):
        api_key, raw_key = make_key(tier=make_tier("log-fields"))
        response = post(
            api_client, "/generate-text/", {"prompt": "hi"}, {"x-api-key": raw_key}
        )
        usage = response.json()["usage"]
        [line] = access_lines(parse_plain(log_output))
        fields = line["fields"]
        assert line["request_id"] == response["X-Request-ID"]
        assert line["level"] == "INFO"
        assert fields["method"] == "POST"
        assert fields["path"] == "/generate-text/"
        assert fields["route"] == "generate-text"
        assert fields["status"] == "200"
        assert float(fields["latency_ms"]) > 0
        assert fields["key"] == api_key.prefix
        assert fields["tier"] == "log-fields"
        assert fields["model"] == "gpt-4o-mini"
        assert fields["prompt_tokens"] == str(usage["prompt_tokens"])
        assert fields["completion_tokens"] == str(usage["completion_tokens"])
        assert fields["reason"] == "-"

    def test_invalid_key_line_has_reason_and_no_key(self, api_client, log_output):
        post(
            api_client,
            "/generate-text/",
            {"prompt": "hi"},
            {"x-api-key": "sk-AAAAAAAA-" + "B" * 40},
        )
        [line] = access_lines(parse_plain(log_output))
        assert line["fields"]["status"] == "403"
        assert line["fields"]["reason"] == "invalid_api_key"
        assert line["fields"]["key"] == "-"
        assert line["fields"]["tier"] == "-"

    def test_rate_limited_line_has_key_and_reason(
        self, api_client, upstream, log_output
    ):
        api_key, raw_key = make_key(tier=make_tier("log-rate", rate_limits="1/m"))
        headers = {"x-api-key": raw_key}
        for _ in range(2):
            response = post(api_client, "/generate-text/", {"prompt": "hi"}, headers)
        lines = access_lines(parse_plain(log_output))
        [refused] = [line for line in lines if line["fields"]["status"] == "429"]
        assert response.status_code == 429
        assert len(lines) == 2
        assert refused["fields"]["key"] == api_key.prefix
        assert refused["fields"]["tier"] == "log-rate"
        assert refused["fields"]["reason"] == "rate_limit_exceeded"
        assert refused["fields"]["prompt_tokens"] == "0"

    def test_too_large_line_has_reason(self, api_client, log_output):
        _, raw_key = make_key()
        api_client.post(
            "/generate-text/",
            json.dumps({"prompt": "hi"}),
            content_type="application/json",
            headers={"x-api-key": raw_key},
            CONTENT_LENGTH="99999999",
        )
        [line] = access_lines(parse_plain(log_output))
        assert line["fields"]["status"] == "413"
        assert line["fields"]["reason"] == "request_too_large"

    def test_unknown_path_is_quoted_on_one_line(self, api_client, log_output):
        api_client.get("/v1/x%0Aforged=1 y")
        lines = log_output.getvalue().splitlines()
        [line] = access_lines(parse_plain(log_output))
        assert len(lines) == 1
        assert line["fields"]["path"] == '"/v1/x\\nforged=1 y"'
        assert line["fields"]["route"] == "unmatched"
        assert "forged" not in line["fields"]

    def test_trailing_newline_path_is_quoted(self, api_client, log_output):
        api_client.get("/v1/models%0A")
        lines = log_output.getvalue().splitlines()
        [line] = access_lines(parse_plain(log_output))
        assert len(lines) == 1
        assert line["fields"]["path"] == '"/v1/models\\n"'
        assert line["fields"]["status"] == "404"


class TestStreamLines:
    def test_start_line_then_final_line(self, api_client, upstream, log_output):
        _, raw_key = make_key(tier=make_tier("log-stream"))
        response = post(
            api_client,
            "/generate-text/",
            {"prompt": "one two three", "stream": True},
            {"x-api-key": raw_key},
        )
        started = access_lines(parse_plain(log_output), "stream started")
        finished_early = access_lines(parse_plain(log_output))
        events = b"".join(response.streaming_content).decode().split("\n\n")
        usage = json.loads(events[-3].removeprefix("data: "))["usage"]
        [line] = access_lines(parse_plain(log_output))

        assert len(started) == 1
        assert finished_early == []
        assert started[0]["fields"]["prompt_tokens"] == "-"
        assert started[0]["request_id"] == response["X-Request-ID"]
        assert line["request_id"] == response["X-Request-ID"]
        assert line["fields"]["status"] == "200"
        assert line["fields"]["prompt_tokens"] == str(usage["prompt_tokens"])
        assert line["fields"]["completion_tokens"] == str(usage["completion_tokens"])
        assert line["fields"]["reason"] == "-"

    def test_lines_during_stream_carry_request_id(
        self, api_client, upstream, log_output
    ):
        _, raw_key = make_key(tier=make_tier("log-stream-fail"))
        upstream.queue(Behaviour(drop_after_chunks=1))
        response = post(
            api_client,
            "/generate-text/",
            {"prompt": "one two three", "stream": True},
            {"x-api-key": raw_key},
        )
        b"".join(response.streaming_content)
        lines = parse_plain(log_output)
        warnings = [line for line in lines if line["level"] == "WARNING"]
        [final] = access_lines(lines)
        assert warnings
        assert {line["request_id"] for line in warnings} == {response["X-Request-ID"]}
        assert final["fields"]["reason"] == "upstream_error"


class TestJSONFormat:
    def test_every_line_is_one_json_object(self, api_client, upstream, json_log_output):
        api_key, raw_key = make_key(tier=make_tier("log-json"))
        response = post(
            api_client, "/generate-text/", {"prompt": "hi"}, {"x-api-key": raw_key}
        )
        try:
            raise ValueError("first line\nsecond line")
        except ValueError:
            logging.getLogger("generation.test").exception("Caught for the test.")
        entries = [json.loads(line) for line in json_log_output.getvalue().splitlines()]
        [access] = [entry for entry in entries if entry["logger"] == "proxy.access"]
        [caught] = [entry for entry in entries if entry["logger"] == "generation.test"]
        assert len(entries) == 2
        assert access["message"] == "request"
        assert access["request_id"] == response["X-Request-ID"]
        assert access["status"] == 200
        assert access["key"] == api_key.prefix
        assert access["tier"] == "log-json"
        assert access["reason"] is None
        assert access["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
        assert caught["level"] == "ERROR"
        assert caught["request_id"] is None
        assert caught["key"] is None
        assert "ValueError: first line\nsecond line" in caught["exception"]

    def test_upstream_warning_has_request_id_and_key(
        self, api_client, upstream, json_log_output
    ):
        api_key, raw_key = make_key(tier=make_tier("log-json-warning"))
        upstream.queue(Behaviour(status=500))
        response = post(
            api_client, "/generate-text/", {"prompt": "hi"}, {"x-api-key": raw_key}
        )
        entries = [json.loads(line) for line in json_log_output.getvalue().splitlines()]
        [warning] = [entry for entry in entries if entry["level"] == "WARNING"]
        assert response.status_code == 502
        assert warning["logger"] == "generation.upstream"
        assert warning["request_id"] == response["X-Request-ID"]
        assert warning["key"] == api_key.prefix

    def test_log_format_json_applies_to_every_logger(self):
        script = (
            "import django, logging\n"
            "django.setup()\n"
            "logging.getLogger('django.request').error('from django.request')\n"
            "logging.getLogger('django.server').warning('from django.server')\n"
            "logging.getLogger('generation.views').info('from the proxy')\n"
        )
        result = run_in_project(["-c", script], LOG_FORMAT="json")
        entries = [json.loads(line) for line in result.stderr.splitlines()]
        assert result.returncode == 0, result.stderr
        assert [entry["message"] for entry in entries] == [
            "from django.request",
            "from django.server",
            "from the proxy",
        ]


def test_bad_log_format_stops_start():
    result = run_in_project(["-c", "import django; django.setup()"], LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "LOG_FORMAT is 'xml'" in result.stderr


MARKER = "prompt-marker-5e1f0c"
WRONG_KEY = "sk-ZZZZZZZZ-wrongsecret0123456789abcdefghijklmnop"


def _send_every_kind_of_request(client, upstream, raw_key: str) -> int:
    """Send requests that succeed, stream, fail and are refused; return the count."""
    x_api_key = {"x-api-key": raw_key}
    bearer = {"Authorization": f"Bearer {raw_key}"}
    prompt = f"say {MARKER} back"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    responses = [
        post(client, "/generate-text/", {"prompt": prompt}, x_api_key),
        post(client, "/v1/chat/completions", chat, bearer),
        post(client, "/v1/chat/completions", {**chat, "stream": True}, bearer),
        post(client, "/v1/embeddings", {"input": prompt}, bearer),
        post(client, "/generate-text/", {"prompt": f"forbidden {MARKER}"}, x_api_key),
        post(client, "/generate-text/", {"prompt": prompt}, {"x-api-key": WRONG_KEY}),
    ]
    for status in (401, 400, 500):
        upstream.queue(Behaviour(status=status))
        responses.append(post(client, "/v1/chat/completions", chat, bearer))
    for response in responses:
        if response.streaming:
            b"".join(response.streaming_content)
    return len(responses)


def test_logs_hold_no_key_hash_header_or_prompt(
    api_client, upstream, log_output, caplog
):
    tier = make_tier("log-secrets", store_prompts=True)
    tier.rules.add(
        PromptRule.objects.create(name="forbidden", pattern="forbidden", message="No.")
    )
    api_key, raw_key = make_key(tier=tier)
    with caplog.at_level(logging.DEBUG):
        sent = _send_every_kind_of_request(api_client, upstream, raw_key)
    output = log_output.getvalue()

    assert len(access_lines(parse_plain(log_output))) == sent
    assert raw_key not in output
    assert api_key.hashed_key not in output
    assert WRONG_KEY not in output
    assert settings.OPENAI_API_KEY not in output
    assert "Bearer" not in output
    assert MARKER not in output
