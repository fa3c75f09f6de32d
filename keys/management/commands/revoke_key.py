"""Revoke an API key by its prefix."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.services import revoke_key

from ._common import add_key_argument, get_key


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Revoke an API key, given its prefix or the whole key. Revocation is "
        "final, and the key is denied from the next request on."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_key_argument(parser)
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check that the key exists and is not revoked yet, without "
            "revoking it.",
        )

    def handle(self, *args, prefix: str, dry_run: bool, verbosity: int, **options):
        api_key = get_key(prefix)
        if api_key.is_revoked:
            raise CommandError(f"The API key {api_key.prefix} was already revoked.")

        if dry_run:
            if verbosity >= 1:
                self.stdout.write(
                    f"Dry run: would revoke API key {api_key.prefix} "
                    f"({api_key.name}). Nothing was changed."
                )
            return
        if not revoke_key(api_key=api_key):
            # Another process revoked it since it was read above.
            raise CommandError(f"The API key {api_key.prefix} was already revoked.")
        if verbosity >= 1:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Revoked API key {api_key.prefix} ({api_key.name})."
                )
            )
