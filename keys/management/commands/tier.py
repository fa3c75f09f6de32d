"""Create, change and show tiers from the shell."""

import argparse

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.models import Tier

from ._common import get_tier, iso_time, write_json

# Tier fields the command sets, with their option help. Options are the field
# names with dashes, e.g. --rate-limits.
TEXT_FIELDS = {
    "description": "Free text for operators.",
    "default_model": "Model used when a request names none. Empty: the proxy's "
    "default.",
    "allowed_models": "Model names the tier may use, separated by commas. Empty: "
    "any model.",
    "rate_limits": "Request rates, comma-separated, e.g. '60/m, 1000/d'. Empty: "
    "no rate limit.",
    "system_prompt": "Sent as the first system message of every request. Empty: none.",
}
# Each help text ends with what 'none' (no value) means for that field.
NULLABLE_NUMBER_FIELDS = {
    "tokens_per_day": "Prompt plus completion tokens per key per UTC day. "
    "'none': no daily cap.",
    "tokens_per_month": "Prompt plus completion tokens per key per calendar "
    "month. 'none': no monthly cap.",
    "max_prompt_chars": "Longest prompt in characters, counting all text sent. "
    "'none': no limit.",
    "max_tokens_cap": "Largest max_tokens a request may use. 'none': the "
    "proxy's PROXY_MAX_TOKENS_CAP applies.",
    "default_max_tokens": "max_tokens sent when a request names none. 'none': "
    "the cap is sent.",
}
SETTABLE_FIELDS = [
    *TEXT_FIELDS,
    *NULLABLE_NUMBER_FIELDS,
    "max_choices",
    "store_prompts",
]


def optional_number(value: str) -> int | None:
    """Parse a whole number, or 'none' (or nothing) for no limit."""
    if value.strip().lower() in ("", "none"):
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a whole number or 'none', not {value!r}"
        ) from exc


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_field_options(parser: CommandParser) -> None:
    # Options left out stay out of the parsed options, so that giving "" or
    # "none" (which clear a field) differs from not giving the option.
    for field, help_text in TEXT_FIELDS.items():
        parser.add_argument(_option(field), default=argparse.SUPPRESS, help=help_text)
    for field, help_text in NULLABLE_NUMBER_FIELDS.items():
        parser.add_argument(
            _option(field),
            type=optional_number,
            default=argparse.SUPPRESS,
            help=help_text,
        )
    parser.add_argument(
        "--max-choices",
        type=int,
        default=argparse.SUPPRESS,
        help="Largest n (completions per request), at least 1.",
    )
    parser.add_argument(
        "--store-prompts",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="Keep prompt text in usage records (--no-store-prompts: keep only "
        "counts).",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Validate the tier and show the changes, without saving them.",
    )


def _add_common_options(parser: CommandParser) -> None:
    """Accept Django's common options after the action too (`tier show x -v 0`).

    Django adds them to the command's own parser only, so argparse would reject
    them after the action. SUPPRESS keeps a value given before the action,
    or the default, when the option is not repeated after it.
    """
    parser.add_argument(
        "-v",
        "--verbosity",
        type=int,
        choices=[0, 1, 2, 3],
        default=argparse.SUPPRESS,
        help="Verbosity level. 0 prints only the output that scripts read, and 1 "
        "(the default) to 3 print the normal output.",
    )
    parser.add_argument(
        "--settings",
        default=argparse.SUPPRESS,
        help="The Python path of a settings module, such as proxy_site.settings.",
    )
    parser.add_argument(
        "--pythonpath",
        default=argparse.SUPPRESS,
        help="A directory to add to the Python path.",
    )
    for option, help_text in [
        ("--traceback", "Raise on CommandError instead of printing the message."),
        ("--no-color", "Do not colour the output."),
        ("--force-color", "Colour the output even when it is not a terminal."),
    ]:
        parser.add_argument(
            option, action="store_true", default=argparse.SUPPRESS, help=help_text
        )


def _describe_errors(error: ValidationError) -> str:
    lines = []
    for field, messages in error.message_dict.items():
        label = "NAME" if field == "name" else _option(field)
        lines.extend(f"{label}: {message}" for message in messages)
    return "The tier is not valid.\n" + "\n".join(lines)


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Create, change or show a tier. 'tier create NAME' and 'tier update NAME' "
        "take the same options, one per tier field, and validate the tier as the "
        "admin does; 'tier show NAME' prints it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(
            dest="action", required=True, metavar="{create,update,show}"
        )
        create = actions.add_parser(
            "create", help="Create a tier. Fields not given get their defaults."
        )
        create.add_argument("name", help="The tier's name: letters, digits, - and _.")
        _add_field_options(create)
        update = actions.add_parser(
            "update", help="Change a tier. Fields not given keep their values."
        )
        update.add_argument("name", help="The name of the tier to change.")
        _add_field_options(update)
        show = actions.add_parser("show", help="Print a tier's fields.")
        show.add_argument("name", help="The name of the tier to show.")
        show.add_argument("--json", action="store_true", help="Print one JSON object.")
        for action in (create, update, show):
            _add_common_options(action)

    def handle(self, *args, action: str, name: str, **options) -> None:
        if action == "show":
            self._show(get_tier(name), as_json=options["json"])
            return
        if action == "create":
            if Tier.objects.filter(name=name).exists():
                raise CommandError(
                    f"Tier {name!r} already exists. Change it with: "
                    f"manage.py tier update {name}"
                )
            tier = Tier(name=name)
        else:
            tier = get_tier(name)
        changes = self._apply(tier, options)
        self._validate(tier)
        if not options["dry_run"]:
            self._save(tier, action, changes)
        if options["verbosity"] >= 1:
            self._report(tier, action, changes, dry_run=options["dry_run"])

    def _apply(self, tier: Tier, options: dict) -> dict[str, tuple]:
        """Set the given fields on `tier` and return each change as (old, new)."""
        if options.get("default_model", "").strip().lower() == "none":
            # 'none' clears numeric fields only, and is not a model name.
            raise CommandError(
                "--default-model: 'none' is not a model name. To use the "
                "proxy's default model, give an empty value: --default-model ''"
            )
        changes = {}
        for field in SETTABLE_FIELDS:
            if field not in options:
                continue
            old, new = getattr(tier, field), options[field]
            setattr(tier, field, new)
            if old != new:
                changes[field] = (old, new)
        return changes

    def _validate(self, tier: Tier) -> None:
        try:
            tier.full_clean()
        except ValidationError as exc:
            raise CommandError(_describe_errors(exc)) from exc

    def _save(self, tier: Tier, action: str, changes: dict[str, tuple]) -> None:
        if action == "create":
            tier.save()
        elif changes:
            # Only the changed fields are written, so that a concurrent change
            # to other fields, such as an edit in the admin, is kept.
            tier.save(update_fields=[*changes, "updated_at"])

    def _report(
        self, tier: Tier, action: str, changes: dict[str, tuple], *, dry_run: bool
    ) -> None:
        if action == "update" and not changes:
            self.stdout.write(f"No field of tier {tier.name!r} changed.")
            return
        if dry_run:
            summary = f"Dry run: would {action} tier {tier.name!r}. Nothing was saved."
            self.stdout.write(summary)
        else:
            self.stdout.write(
                self.style.SUCCESS(f"{action.title()}d tier {tier.name!r}.")
            )
        for field, (old, new) in changes.items():
            if action == "create":
                self.stdout.write(f"  {field}: {new!r}")
            else:
                self.stdout.write(f"  {field}: {old!r} -> {new!r}")

    def _show(self, tier: Tier, *, as_json: bool) -> None:
        record = {field: getattr(tier, field) for field in ["name", *SETTABLE_FIELDS]}
        record["rules"] = [rule.name for rule in tier.rules.all()]
        record["created_at"] = iso_time(tier.created_at)
        record["updated_at"] = iso_time(tier.updated_at)
        if as_json:
            write_json(self.stdout, record)
            return
        width = max(len(field) for field in record)
        for field, value in record.items():
            if value is None:
                text = "none"
            elif isinstance(value, list):
                text = ", ".join(value)
            else:
                text = str(value)
            if not text.isprintable():
                # A newline would break the layout, and an escape sequence
                # would reach the operator's terminal.
                text = repr(text)
            self.stdout.write(f"{field.ljust(width)}  {text}".rstrip())
