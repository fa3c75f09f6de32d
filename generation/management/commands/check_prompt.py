"""Try a prompt against a tier's rules and limits without calling the upstream."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from generation.policy import Decision, evaluate_prompt, trial_arguments
from generation.serializers import GenerateTextSerializer
from keys.models import Tier


class Command(BaseCommand):
    requires_system_checks = []
    help = (
        "Decide a prompt as the API would for a key of the given tier: allowed "
        "models, prompt length, prompt rules and token caps. Nothing is sent "
        "upstream and nothing is counted. Exits with status 1 when the prompt "
        "would be refused."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("text", help="The prompt to try.")
        parser.add_argument("--tier", required=True, help="Name of the tier.")
        parser.add_argument("--system", help="System text sent with the prompt.")
        parser.add_argument("--model", help="Model to request (default: the tier's).")
        parser.add_argument(
            "--max-tokens",
            type=int,
            help="max_tokens to request (default: the tier's).",
        )

    def handle(self, *args, text: str, tier: str, **options) -> None:
        try:
            tier_obj = Tier.objects.get(name=tier)
        except Tier.DoesNotExist as exc:
            known = ", ".join(Tier.objects.values_list("name", flat=True)) or "none"
            raise CommandError(
                f"Tier {tier!r} not found. Known tiers: {known}."
            ) from exc
        if options["max_tokens"] is not None and options["max_tokens"] < 1:
            raise CommandError("--max-tokens must be 1 or more.")

        # The input is validated as the API validates it, so a prompt the API
        # would reject as invalid is not reported as allowed.
        data = {"prompt": text}
        for name in ("system", "model", "max_tokens"):
            if options[name] is not None:
                data[name] = options[name]
        serializer = GenerateTextSerializer(data=data)
        if not serializer.is_valid():
            field, errors = next(iter(serializer.errors.items()))
            self.stdout.write(self.style.ERROR("REFUSED (invalid_request)"))
            if options["verbosity"] >= 1:
                self.stdout.write(f"Client would see: {field}: {errors[0]}")
            raise CommandError("The prompt would be refused.", returncode=1)
        decision = evaluate_prompt(
            tier=tier_obj, **trial_arguments(serializer.validated_data)
        )
        self._write(decision, details=options["verbosity"] >= 1)
        if not decision.allowed:
            raise CommandError("The prompt would be refused.", returncode=1)

    def _write(self, decision: Decision, *, details: bool) -> None:
        """Write the verdict line, then, with `details`, what decided it."""
        if decision.allowed:
            self.stdout.write(self.style.SUCCESS("ALLOWED"))
        else:
            self.stdout.write(self.style.ERROR(f"REFUSED ({decision.code})"))
        if not details:
            return
        if not decision.allowed:
            self.stdout.write(f"Client would see: {decision.message}")
        self.stdout.write(f"Decided by: {decision.reason}")
        if decision.rule is not None:
            rule = decision.rule
            self.stdout.write(
                f"Rule: #{rule.pk} {rule.name} ({rule.kind}, {rule.action})"
            )
        chat = decision.chat
        if chat is not None:
            self.stdout.write(
                f"Model: {chat.model}; max_tokens sent: {chat.max_tokens}; "
                f"prompt tokens: {chat.prompt_tokens}; "
                f"worst case: {chat.worst_case_tokens}"
            )
        self.stdout.write("Limits: " + ("; ".join(decision.limits) or "none"))
