"""Tiers and the API keys that belong to them."""

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone


class Tier(models.Model):
    """A class of API keys that share one set of limits and rules."""

    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    default_model = models.CharField(
        max_length=128,
        blank=True,
        help_text="Model used when a request names none. Empty: the proxy's default.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class APIKeyQuerySet(models.QuerySet):
    def usable(self) -> "APIKeyQuerySet":
        """Keys that are neither revoked nor expired."""
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class APIKey(models.Model):
    """A client's key: a public prefix and the SHA-256 hash of the whole key.

    The plaintext key is shown once when it is issued and never stored.
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

    @property
    def state(self) -> str:
        if self.is_revoked:
            return "revoked"
        if self.is_expired():
            return "expired"
        return "active"

    def save(self, *args, **kwargs) -> None:
        # Revocation is one-way: a key that was revoked in the database stays so.
        if self.pk is not None and self.revoked_at is None:
            stored = APIKey.objects.filter(pk=self.pk, revoked_at__isnull=False)
            if stored.exists():
                raise ValidationError("A revoked API key cannot be reinstated.")
        super().save(*args, **kwargs)
