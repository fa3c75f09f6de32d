"""Release the token reservations of requests that a dead process left pending."""

import datetime
import logging
import math

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from generation.abandoned import (
    ReleaseSummary,
    count_abandoned,
    key_prefixes,
    min_release_age,
    release_abandoned,
)

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Close usage records left pending by a request whose worker process "
        "died (killed, out of memory, timed out), and release the tokens they "
        "reserved in the daily and monthly quota counters. Such records are "
        "marked failed with the reason 'abandoned'. Only records older than "
        "the longest a request can run, derived from PROXY_UPSTREAM_TIMEOUT, "
        "PROXY_UPSTREAM_MAX_RETRIES and PROXY_MAX_STREAM_SECONDS, are taken, "
        "so that no running request is released. Run it with the same "
        "settings as the proxy."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=int,
            metavar="MINUTES",
            help="Release pending records created more than this many minutes "
            "ago. It must be at least the minimum that the settings give "
            "(the default).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            metavar="N",
            help=f"Records closed per transaction, 1 to {MAX_BATCH_SIZE} "
            f"(default: {DEFAULT_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count the records and tokens that would be released, and "
            "change nothing.",
        )

    def handle(self, *args, **options) -> None:
        cutoff = self._cutoff(options["older_than"])
        batch_size = options["batch_size"]
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise CommandError(
                f"--batch-size must be 1 to {MAX_BATCH_SIZE}, not {batch_size}."
            )
        when = f"created before {cutoff:%Y-%m-%d %H:%M:%S} UTC"

        if options["dry_run"]:
            summary = count_abandoned(cutoff)
            self._report(summary, options["verbosity"])
            if options["verbosity"] >= 1:
                self.stdout.write(
                    f"Would release {summary.tokens} token(s) of "
                    f"{summary.records} pending usage record(s) {when}. "
                    "Nothing was changed (dry run)."
                )
            return

        summary = release_abandoned(cutoff, batch_size=batch_size)
        logger.info(
            "Released %s token(s) of %s abandoned usage record(s) %s.",
            summary.tokens,
            summary.records,
            when,
        )
        self._report(summary, options["verbosity"])
        if options["verbosity"] >= 1:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Released {summary.tokens} token(s) of {summary.records} "
                    f"abandoned usage record(s) {when}."
                )
            )

    def _cutoff(self, minutes: int | None) -> datetime.datetime:
        """Return the time before which pending records are released."""
        age = self._release_minutes(minutes)
        try:
            return timezone.now() - datetime.timedelta(minutes=age)
        except OverflowError as exc:
            if minutes is None:
                fix = (
                    "Lower PROXY_MAX_STREAM_SECONDS, PROXY_UPSTREAM_TIMEOUT or "
                    "PROXY_UPSTREAM_MAX_RETRIES, from which the minimum comes."
                )
            else:
                fix = "Use a smaller --older-than."
            raise CommandError(
                f"A cutoff {age} minutes ago is before the year 1, so no "
                f"usage record can be that old. {fix}"
            ) from exc

    def _release_minutes(self, minutes: int | None) -> int:
        """Return the age to release at, in minutes, rejecting one below the minimum."""
        minimum = min_release_age()
        minimum_minutes = math.ceil(minimum.total_seconds() / 60)
        if minutes is None:
            return minimum_minutes
        if minutes < minimum_minutes:
            raise CommandError(
                f"--older-than must be at least {minimum_minutes} minutes, not "
                f"{minutes}. A request can run that long with the current "
                "PROXY_UPSTREAM_TIMEOUT, PROXY_UPSTREAM_MAX_RETRIES and "
                "PROXY_MAX_STREAM_SECONDS, and releasing a running request's "
                "tokens would release them twice. Omit --older-than to use "
                "the minimum."
            )
        return minutes

    def _report(self, summary: ReleaseSummary, verbosity: int) -> None:
        """Write the records and tokens per key prefix, at verbosity 2 or more."""
        if verbosity < 2 or not summary.records:
            return
        prefixes = key_prefixes(summary.records_by_key)
        for api_key_id in sorted(summary.records_by_key):
            prefix = prefixes.get(api_key_id, f"id {api_key_id}")
            records = summary.records_by_key[api_key_id]
            tokens = summary.tokens_by_key[api_key_id]
            self.stdout.write(f"Key {prefix}: {records} record(s), {tokens} token(s).")
