"""Delete old usage records in small batches."""

import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from generation.models import UsageRecord

DEFAULT_BATCH_SIZE = 1000
MAX_BATCH_SIZE = 10_000
# Ten years, so that an out-of-range number is an error rather than an overflow.
MAX_DAYS = 3650


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Delete usage records created more than --older-than days ago. Records "
        "are deleted in batches, each in its own short transaction, so the "
        "proxy keeps writing records meanwhile. Pending records (requests in "
        "flight or abandoned reservations) are kept unless --include-pending is "
        "given. Deleting a record does not change any token quota."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=int,
            required=True,
            metavar="DAYS",
            help=f"Delete records created more than this many days ago, 1 to "
            f"{MAX_DAYS}.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            metavar="N",
            help=f"Records deleted per transaction, 1 to {MAX_BATCH_SIZE} "
            f"(default: {DEFAULT_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--include-pending",
            action="store_true",
            help="Also delete old pending records. Their reserved tokens stay "
            "reserved in the quota counters.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count the records that would be deleted, and delete nothing.",
        )

    def handle(self, *args, **options) -> None:
        days, batch_size = options["older_than"], options["batch_size"]
        if not 1 <= days <= MAX_DAYS:
            raise CommandError(
                f"--older-than must be 1 to {MAX_DAYS} days, not {days}."
            )
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise CommandError(
                f"--batch-size must be 1 to {MAX_BATCH_SIZE}, not {batch_size}."
            )
        cutoff = timezone.now() - datetime.timedelta(days=days)
        old = UsageRecord.objects.filter(created_at__lt=cutoff).order_by()
        if not options["include_pending"]:
            old = old.exclude(status=UsageRecord.Status.PENDING)
        verbosity = options["verbosity"]
        when = f"created before {cutoff:%Y-%m-%d %H:%M} UTC"

        if options["dry_run"]:
            if verbosity >= 1:
                self.stdout.write(
                    f"Would delete {old.count()} usage record(s) {when}. "
                    "Nothing was deleted (dry run)."
                )
            return

        deleted = self._delete_in_batches(old, batch_size, verbosity)
        if verbosity >= 1:
            self.stdout.write(
                self.style.SUCCESS(f"Deleted {deleted} usage record(s) {when}.")
            )

    def _delete_in_batches(self, old: QuerySet, batch_size: int, verbosity: int) -> int:
        """Delete the records of `old` by id, one committed batch at a time.

        Each batch locks at most `batch_size` rows, and only for the length of
        its transaction. The loop ends because the cutoff is fixed, so new
        records never match.
        """
        deleted = 0
        while True:
            with transaction.atomic():
                ids = list(old.values_list("pk", flat=True)[:batch_size])
                if not ids:
                    return deleted
                count, _ = UsageRecord.objects.filter(pk__in=ids).delete()
            deleted += count
            if verbosity >= 2:
                self.stdout.write(f"Deleted a batch of {count}, {deleted} so far.")
