"""System checks for prompt rules stored in the database."""

import logging

from django.core import checks
from django.core.exceptions import ValidationError
from django.db import DatabaseError

from .models import PromptRule
from .rules import validate_pattern

logger = logging.getLogger(__name__)


@checks.register(checks.Tags.database)
def check_prompt_rule_patterns(app_configs, **kwargs) -> list[checks.CheckMessage]:
    """Report every enabled prompt rule whose pattern does not validate.

    Django's own database checks run only when `databases` is passed, as with
    `manage.py check --database default`. This one runs on every `manage.py
    check` and before runserver and migrate, because a rule saved without
    validation (through the ORM or SQL) fails closed: a block rule rejects every
    request of its tiers, and an allow rule never matches. Being an error, it
    stops runserver and migrate until the rule is corrected or disabled, or the
    command is run with --skip-checks.

    It reads the database that PromptRule is routed to, and reports nothing when
    that read fails, as it does before the first migrate.
    """
    try:
        rules = list(PromptRule.objects.filter(enabled=True).order_by("name"))
    except DatabaseError as exc:
        logger.debug("Prompt rules were not checked: %s", exc)
        return []

    errors = []
    for rule in rules:
        try:
            validate_pattern(kind=rule.kind, pattern=rule.pattern)
        except ValidationError as exc:
            errors.append(
                checks.Error(
                    f"Prompt rule {rule.name!r} has an invalid {rule.kind} pattern.",
                    hint=f"{' '.join(exc.messages)} Correct the pattern of this rule "
                    f"(pk {rule.pk}) in the admin, or disable it.",
                    obj=rule,
                    id="keys.E001",
                )
            )
    return errors
