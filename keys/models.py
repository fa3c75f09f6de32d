"""Tiers and the API keys that belong to them."""

import datetime

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from .validators import (
    split_list,
    validate_model_list,
    validate_model_name,
    validate_no_control_characters,
    validate_rate_list,
)


class PromptRule(models.Model):
    """A pattern checked against all text a client sends, shared by tiers."""

    class Kind(models.TextChoices):
        KEYWORD = "keyword", "Keyword (case-insensitive, matches inside words too)"
        REGEX = "regex", "Regular expression (RE2 syntax, case-insensitive)"

    class Action(models.TextChoices):
        BLOCK = "block", "Block prompts that match"
        ALLOW = "allow", "Allow only prompts that match (one of the allow rules)"

    name = models.CharField(max_length=128, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.KEYWORD)
    pattern = models.TextField(
        help_text="The keyword or regular expression. Matched after Unicode "
        "normalisation, so look-alike and zero-width characters are folded."
    )
    action = models.CharField(
        max_length=16, choices=Action.choices, default=Action.BLOCK
    )
    message = models.CharField(
        max_length=500,
        help_text="Shown to the client whose prompt this rule rejects.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_action_display().split()[0].lower()})"

    def clean(self) -> None:
        from .rules import validate_pattern

        try:
            validate_pattern(kind=self.kind, pattern=self.pattern)
        except ValidationError as exc:
            # Shown under the pattern field in the admin form.
            raise ValidationError({"pattern": exc.messages}) from exc


class Tier(models.Model):
    """A class of API keys that share one set of limits and rules."""

    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    default_model = models.CharField(
        max_length=128,
        blank=True,
        help_text="Model used when a request names none. Empty: the proxy's default.",
    )
    allowed_models = models.TextField(
        blank=True,
        help_text="Model names this tier may use, separated by commas or new "
        "lines. Empty: any model.",
    )
    rate_limits = models.CharField(
        max_length=256,
        blank=True,
        validators=[validate_rate_list],
        help_text="Request rates in django-ratelimit notation, separated by "
        "commas, e.g. '60/m, 1000/d'. Every one applies. Empty: no rate limit.",
    )
    tokens_per_day = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Prompt plus completion tokens per key per UTC day. Empty: no cap.",
    )
    tokens_per_month = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Prompt plus completion tokens per key per UTC calendar month. "
        "Empty: no cap.",
    )
    max_prompt_chars = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Longest prompt, in characters, counting all text a request "
        "sends. Empty: no limit beyond the request size.",
    )
    max_tokens_cap = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Largest max_tokens a request may use; larger values are "
        "lowered to it. Empty: the proxy's PROXY_MAX_TOKENS_CAP.",
    )
    default_max_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="max_tokens sent when a request names none. Empty: the cap.",
    )
    max_choices = models.PositiveSmallIntegerField(
        default=1,
        # OpenAI's API takes n up to 128, and so does the chat endpoint.
        validators=[MinValueValidator(1), MaxValueValidator(128)],
        help_text="Largest n (completions per request); larger values are "
        "lowered to it.",
    )
    system_prompt = models.TextField(
        blank=True,
        help_text="Prepended as a system message to every request of this tier.",
    )
    store_prompts = models.BooleanField(
        default=False,
        help_text="Keep the prompt text in usage records. Off: only counts are kept.",
    )
    rules = models.ManyToManyField(
        PromptRule,
        blank=True,
        related_name="tiers",
        help_text="Prompt rules checked for every request of this tier.",
    )
    # Raised whenever a rule of the tier or the set of its rules changes, so
    # that workers know to read the rules again (see keys.rules.tier_rules).
    rules_version = models.PositiveBigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def allowed_model_list(self) -> list[str]:
        return split_list(self.allowed_models)

    def clean(self) -> None:
        try:
            validate_model_list(self.allowed_models)
        except ValidationError as exc:
            raise ValidationError({"allowed_models": exc.messages}) from exc
        if self.default_model:
            try:
                validate_model_name(self.default_model)
            except ValidationError as exc:
                raise ValidationError({"default_model": exc.messages}) from exc
        allowed = self.allowed_model_list
        if allowed and self.default_model and self.default_model not in allowed:
            raise ValidationError(
                {
                    "default_model": f"The default model {self.default_model!r} is "
                    "not in allowed_models, so every request that names no model "
                    "would be refused. Add it there or choose an allowed model."
                }
            )
        # Keep the list tidy, so that an empty-looking value means "any model".
        self.allowed_models = ", ".join(allowed)

    def save(self, *args, **kwargs) -> None:
        # Rates are checked on every save, not only in forms, so a tier changed
        # from the shell cannot hold a rate the limiter would fail on.
        validate_rate_list(self.rate_limits)
        if not self._state.adding and not args and kwargs.get("update_fields") is None:
            # keys.signals raises rules_version with an UPDATE. Saving a copy of
            # the tier read before that must not lower it again, or workers
            # would take an older rule list for the current one.
            kwargs["update_fields"] = [
                field.name
                for field in self._meta.concrete_fields
                if not field.primary_key and field.name != "rules_version"
            ]
        super().save(*args, **kwargs)


# The values of APIKey.state.
KEY_STATES = ("active", "expired", "revoked")


class APIKeyQuerySet(models.QuerySet):
    def usable(self) -> "APIKeyQuerySet":
        """Keys that are neither revoked nor expired."""
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )

    def expired(self) -> "APIKeyQuerySet":
        """Keys past their expiry time that were not revoked."""
        return self.filter(revoked_at__isnull=True, expires_at__lte=timezone.now())

    def revoked(self) -> "APIKeyQuerySet":
        return self.filter(revoked_at__isnull=False)

    def in_state(self, state: str) -> "APIKeyQuerySet":
        """Keys in `state`, one of KEY_STATES, as `APIKey.state` names it."""
        if state == "active":
            return self.usable()
        if state == "expired":
            return self.expired()
        if state == "revoked":
            return self.revoked()
        raise ValueError(f"Unknown key state {state!r}; expected one of {KEY_STATES}.")

    def used_since(self, cutoff: datetime.datetime) -> "APIKeyQuerySet":
        return self.filter(last_used_at__gte=cutoff)

    def never_used(self) -> "APIKeyQuerySet":
        return self.filter(last_used_at__isnull=True)

    def unused_since(self, cutoff: datetime.datetime) -> "APIKeyQuerySet":
        """Keys last used before `cutoff`, or never used and created before it."""
        return self.filter(
            models.Q(last_used_at__lt=cutoff)
            | models.Q(last_used_at__isnull=True, created_at__lt=cutoff)
        )


class APIKey(models.Model):
    """A client's key: a public prefix and the SHA-256 hash of the whole key.

    The plaintext key is shown once when it is issued or rotated and never
    stored. After a rotation with a grace period, the replaced key's hash is
    kept in `previous_hashed_key` and accepted until `previous_key_expires_at`.
    """

    name = models.CharField(max_length=128, help_text="Who or what the key is for.")
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="api_keys")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="Empty: the key does not expire."
    )
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    rotated_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Empty unless a rotation left the replaced key working for a grace period.
    previous_hashed_key = models.CharField(max_length=64, blank=True, editable=False)
    previous_key_expires_at = models.DateTimeField(
        "previous key works until", null=True, blank=True, editable=False
    )
    rate_limits = models.CharField(
        max_length=256,
        blank=True,
        validators=[validate_rate_list],
        help_text="Overrides the tier's request rates when set, e.g. '10/m'.",
    )
    tokens_per_day = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Overrides the tier's daily token cap."
    )
    tokens_per_month = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Overrides the tier's monthly token cap."
    )

    objects = APIKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now=None) -> bool:
        now = now or timezone.now()
        return self.expires_at is not None and self.expires_at <= now

    def accepts_previous_key(self, now: datetime.datetime) -> bool:
        """Return True while the key replaced by the last rotation still works."""
        return (
            bool(self.previous_hashed_key)
            and self.previous_key_expires_at is not None
            and now < self.previous_key_expires_at
        )

    @property
    def state(self) -> str:
        if self.is_revoked:
            return "revoked"
        if self.is_expired():
            return "expired"
        return "active"

    @property
    def effective_rate_limits(self) -> list[str]:
        return split_list(self.rate_limits or self.tier.rate_limits)

    @property
    def effective_tokens_per_day(self) -> int | None:
        if self.tokens_per_day is not None:
            return self.tokens_per_day
        return self.tier.tokens_per_day

    @property
    def effective_tokens_per_month(self) -> int | None:
        if self.tokens_per_month is not None:
            return self.tokens_per_month
        return self.tier.tokens_per_month

    def clean(self) -> None:
        try:
            validate_no_control_characters(self.name)
        except ValidationError as exc:
            raise ValidationError({"name": exc.messages}) from exc
        if self.expires_at is None or self.expires_at > timezone.now():
            return
        stored = None
        if self.pk is not None:
            stored = APIKey.objects.filter(pk=self.pk).values_list(
                "expires_at", flat=True
            )[0]
        if stored != self.expires_at:
            raise ValidationError(
                {"expires_at": "The expiry time is in the past. Choose a later one."}
            )

    def save(self, *args, **kwargs) -> None:
        # Checked on every save, not only in forms, so that no code path can
        # store a name that splits list_keys rows.
        validate_no_control_characters(self.name)
        validate_rate_list(self.rate_limits)
        # Revocation is one-way: a key that was revoked in the database stays so.
        if self.pk is not None and self.revoked_at is None:
            stored = APIKey.objects.filter(pk=self.pk, revoked_at__isnull=False)
            if stored.exists():
                raise ValidationError("A revoked API key cannot be reinstated.")
        super().save(*args, **kwargs)
