"""Revoke an API key by its prefix."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.models import APIKey
from keys.services import parse_prefix, revoke_key


class Command(BaseCommand):
    requires_system_checks = []
    help = "Revoke an API key, given its prefix or the whole key. Revocation is final."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "prefix", help="The key's 8-character prefix, as list_keys shows it."
        )

    def handle(self, *args, prefix: str, **options):
        prefix = parse_prefix(prefix) or prefix.removeprefix("sk-")
        try:
            api_key = APIKey.objects.get(prefix=prefix)
        except APIKey.DoesNotExist as exc:
            raise CommandError(f"No API key has the prefix {prefix!r}.") from exc
        if not revoke_key(api_key=api_key):
            raise CommandError(f"The API key {prefix} was already revoked.")
        self.stdout.write(
            self.style.SUCCESS(f"Revoked API key {prefix} ({api_key.name}).")
        )
