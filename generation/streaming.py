"""Relay an upstream chat completion stream to the client as it arrives.

Each upstream server-sent event is forwarded as soon as it is read. The relay
watches the events for usage, so that the quota is settled when the stream
ends, however it ends: completed, failed upstream, or abandoned by the client.
"""

import json
import logging
import re
import time
from collections.abc import Callable, Iterator

import httpx2
from django.conf import settings
from django.http import StreamingHttpResponse

from proxy_site.errors import (
    DATABASE_OUTAGES,
    DatabaseUnavailable,
    ProxyError,
    StreamTimeLimitExceeded,
    UpstreamError,
    UpstreamTimeout,
    error_body,
)

from .models import UsageRecord
from .policy import PreparedChat
from .replies import MalformedReply, check_chunk, generated_texts
from .tokens import count_text_tokens, reported_tokens
from .usage import UsageTracker

logger = logging.getLogger(__name__)

Status = UsageRecord.Status
CLIENT_DISCONNECTED = "client_disconnected"
# Renders an upstream event that check_chunk accepted, with its raw JSON text,
# as bytes for the client, or None to drop it.
EventRenderer = Callable[[dict, str], bytes | None]
# Limits on reading the upstream body after its [DONE], which normally contains
# only the chunked body's last bytes. Past either, the connection is closed.
CHARACTERS_AFTER_DONE = 64 * 1024
SECONDS_AFTER_DONE = 1.0
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def error_event(exc: ProxyError) -> bytes:
    body = error_body(str(exc.detail), code=exc.default_code, error_type=exc.error_type)
    return sse(json.dumps(body))


class ChatStreamRelay:
    """Iterate over the client's stream of server-sent events, settling at the end.

    `upstream` is the openai client's streaming response, already opened with
    a success status. `usage_requested` is true when the client requested the
    usage-only final event. The proxy always requests it upstream, and drops
    it when the client did not.
    """

    def __init__(
        self,
        *,
        tracker: UsageTracker,
        chat: PreparedChat,
        upstream,
        usage_requested: bool,
        render: EventRenderer,
        finish: Callable[[dict], bytes | None] | None = None,
    ) -> None:
        self.tracker = tracker
        self.chat = chat
        self.upstream = upstream
        self.usage_requested = usage_requested
        self.render = render
        self.finish = finish
        self.usage: dict | None = None
        self.completion_text: list[str] = []
        # Events accepted from the upstream. Error events and malformed
        # events are not counted.
        self.received_events = 0
        # The indexes of the choices whose finish_reason has arrived.
        self.finished_choices: set[int] = set()
        self.settled = False
        # The failure that ended the stream, which close() records if the
        # database could not record it when it happened.
        self.failure: ProxyError | None = None
        self._text = upstream.iter_text()
        deadline = time.monotonic() + settings.PROXY_MAX_STREAM_SECONDS
        self._lines = split_lines(_text_until(deadline, self._text))
        # True once the upstream sent [DONE] and the relay yielded its own.
        self.completed = False
        self._events = self._generate()

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        """Called by Django when the response ends, also when the client left
        before the first event was read."""
        try:
            self._events.close()
            if not self.settled:
                self._settle_at_close()
            elif self.completed:
                # The server has sent the client the whole response by now,
                # so reading the upstream's last bytes delays no one.
                self._read_past_done()
        finally:
            self.upstream.close()
            self.tracker.end_upstream_stream()

    def _settle_at_close(self) -> None:
        """Settle a stream that lost its client, or whose failure is unrecorded.

        A failure is unrecorded when the database was unreachable as the
        stream failed. The client has its error event by now, so trying
        again here delays no one.
        """
        failure = self.failure
        if failure is None:
            status_code, code = 499, CLIENT_DISCONNECTED
        else:
            status_code, code = failure.status_code, failure.default_code
        self._try_settle_failed(
            status_code, code, unrecorded="its reserved tokens stay reserved"
        )

    def _generate(self) -> Iterator[bytes]:
        try:
            yield from self._relay_events()
        except GeneratorExit:
            if self.settled:
                raise
            # The client went away: stop reading upstream (closing the
            # response ends the upstream request) and charge what it generated.
            self._try_settle_failed(
                499, CLIENT_DISCONNECTED, unrecorded="closing the response tries again"
            )
            logger.info("Client disconnected from a stream; upstream request closed.")
            raise
        except ProxyError as exc:
            yield self._fail(exc)
        except DATABASE_OUTAGES:
            # Settling the finished stream failed. Trying again at once would
            # keep the client waiting as long again, so close() tries again
            # after the client has its error event.
            logger.exception(
                "Recording the stream's usage failed, so closing the response "
                "tries again."
            )
            self.failure = DatabaseUnavailable()
            yield error_event(self.failure)
        except Exception:
            # A fault in the proxy itself: the response has started, so it
            # cannot become a 500. The stream ends with an internal_error event,
            # and the record and quota are settled like any other failure.
            logger.exception("Stream relay failed.")
            yield self._fail(ProxyError())
        finally:
            if not self.completed:
                self.upstream.close()
            self.tracker.end_upstream_stream()

    def _fail(self, failure: ProxyError) -> bytes:
        """Settle the stream as failed and return the error event that ends it.

        The event goes out even when the database cannot record the failure.
        """
        self.failure = failure
        if not self.settled:
            self._try_settle_failed(
                failure.status_code,
                failure.default_code,
                unrecorded="closing the response tries again",
            )
        return error_event(failure)

    def _try_settle_failed(
        self, status_code: int, code: str, *, unrecorded: str
    ) -> None:
        """Settle the stream as failed, logging instead of raising a database outage.

        `unrecorded` describes what happens to the usage when the database fails.
        """
        try:
            self._settle(Status.FAILED, status_code, code)
        except DATABASE_OUTAGES:
            logger.exception("Recording the stream's usage failed, so %s.", unrecorded)

    def _relay_events(self) -> Iterator[bytes]:
        for data in self._upstream_data():
            if data == "[DONE]":
                break
            event = self._parse(data)
            self._observe(event)
            is_usage_only = not event.get("choices") and event.get("usage")
            if is_usage_only and not self.usage_requested:
                continue
            rendered = self.render(event, data)
            if rendered is not None:
                yield rendered
        if not self.finished:
            logger.warning(
                "Upstream stream ended with %d of %d choices finished.",
                len(self.finished_choices),
                self.chat.choices,
            )
            raise UpstreamError()
        usage = self._settle(Status.SUCCEEDED, 200, "")
        if self.finish is not None:
            closing = self.finish(usage)
            if closing is not None:
                yield closing
        self.completed = True
        yield sse("[DONE]")

    def _upstream_data(self) -> Iterator[str]:
        """Yield the data of each upstream event, mapping read failures."""
        while True:
            try:
                line = next(self._lines)
            except StopIteration:
                return
            except httpx2.TimeoutException as exc:
                logger.warning("Upstream stream stalled past the timeout.")
                raise UpstreamTimeout() from exc
            except httpx2.HTTPError as exc:
                logger.warning("Upstream stream failed: %s", type(exc).__name__)
                raise UpstreamError() from exc
            if line.startswith("data:"):
                yield line[len("data:") :].strip()

    def _read_past_done(self) -> None:
        """Read the end of the upstream response, normally only its last bytes.

        The openai client closes a response that was not read to the end, and
        the connection with it. Read to the end, the connection goes back to
        the client's pool for the next call. An upstream that sends more
        than CHARACTERS_AFTER_DONE, or sends for longer than
        SECONDS_AFTER_DONE, loses its connection. One that stalls keeps the
        worker thread waiting until the read timeout (PROXY_UPSTREAM_TIMEOUT).
        """
        deadline = time.monotonic() + SECONDS_AFTER_DONE
        left = CHARACTERS_AFTER_DONE
        try:
            for text in self._text:
                left -= len(text)
                if left < 0 or time.monotonic() > deadline:
                    logger.info(
                        "Upstream sent more than the limit after [DONE], so its "
                        "connection is closed."
                    )
                    return
        except (httpx2.HTTPError, httpx2.StreamError) as exc:
            # The completion is whole. Only the connection is not reused.
            logger.info("Upstream stream failed after [DONE]: %s", type(exc).__name__)

    def _parse(self, data: str) -> dict:
        try:
            event = json.loads(data)
        except (ValueError, RecursionError) as exc:
            # json raises RecursionError for nesting deeper than Python's
            # recursion limit.
            logger.warning("Upstream sent an event that is not JSON.")
            raise UpstreamError() from exc
        if not isinstance(event, dict):
            logger.warning("Upstream sent an event that is not a JSON object.")
            raise UpstreamError()
        if "error" in event:
            logger.warning("Upstream ended the stream with an error event.")
            raise UpstreamError()
        try:
            check_chunk(event)
        except MalformedReply as exc:
            logger.warning("Upstream sent a malformed stream event: %s.", exc)
            raise UpstreamError() from exc
        return event

    def _observe(self, event: dict) -> None:
        self.received_events += 1
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta")
            if delta:
                self.completion_text.extend(generated_texts(delta))
            index = choice.get("index", 0)
            if choice.get("finish_reason") and isinstance(index, int):
                self.finished_choices.add(index)

    @property
    def finished(self) -> bool:
        """Return whether every requested choice has its finish_reason."""
        return len(self.finished_choices) >= self.chat.choices

    def _used_tokens(self) -> tuple[int, int]:
        """Return the upstream's usage, or the proxy's own count without it."""
        usage = self.usage or {}
        prompt_tokens = reported_tokens(usage.get("prompt_tokens"))
        completion_tokens = reported_tokens(usage.get("completion_tokens"))
        if prompt_tokens is None:
            prompt_tokens = self.chat.prompt_tokens
        if completion_tokens is None:
            text = "".join(self.completion_text)
            completion_tokens = count_text_tokens(self.chat.model, text)
        return prompt_tokens, completion_tokens

    def _settle(self, status: str, http_status: int, reason: str) -> dict:
        """Charge what the stream used, and close the record.

        A stream that ends before the upstream's first valid event is charged
        nothing, like a call that fails before the stream starts.
        """
        if self.received_events:
            prompt_tokens, completion_tokens = self._used_tokens()
        else:
            prompt_tokens = completion_tokens = 0
        self.tracker.settle(
            status=status,
            http_status=http_status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            reason=reason,
        )
        # Set only once the record is written: when writing it fails, the
        # error path settles again and saves the record as failed.
        self.settled = True
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


def event_stream_response(
    events: Iterator[bytes], headers: dict
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    # Tells nginx not to buffer the stream.
    response["X-Accel-Buffering"] = "no"
    for name, value in headers.items():
        response[name] = value
    return response


def _text_until(deadline: float, chunks: Iterator[str]) -> Iterator[str]:
    """Yield the chunks, raising StreamTimeLimitExceeded for one read past `deadline`.

    `deadline` is a time.monotonic() value. A read that is waiting when the
    deadline passes ends with its chunk or at the read timeout.
    """
    for chunk in chunks:
        if time.monotonic() > deadline:
            logger.warning(
                "Upstream stream lasted longer than PROXY_MAX_STREAM_SECONDS "
                "(%s s), so it is ended.",
                settings.PROXY_MAX_STREAM_SECONDS,
            )
            raise StreamTimeLimitExceeded()
        yield chunk


def split_lines(chunks: Iterator[str]) -> Iterator[str]:
    """Yield the lines of a text stream, split at CRLF, LF or CR as in SSE.

    A CRLF split between two chunks gives one extra empty line, which an
    event stream ignores.
    """
    pending = ""
    for chunk in chunks:
        parts = _LINE_BREAK.split(chunk)
        if len(parts) == 1:
            pending += chunk
            continue
        parts[0] = pending + parts[0]
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending
