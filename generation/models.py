"""Token quota counters and usage records."""

from django.db import models
from django.utils import timezone

from keys.models import APIKey, PromptRule, Tier


class QuotaCounter(models.Model):
    """Tokens a key used and has reserved in one day or month.

    A request is admitted only if its worst case fits under the cap beside
    `used + reserved`. When the call ends its reservation is replaced by the
    tokens the upstream reported. That can pass the cap only when the upstream
    reports more than the worst case (for example, a server that ignores
    max_tokens), and then no further request is admitted in the period.
    """

    class Period(models.TextChoices):
        DAY = "day", "Day"
        MONTH = "month", "Month"

    api_key = models.ForeignKey(APIKey, on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=8, choices=Period.choices)
    # The first day of the period, in UTC.
    period_start = models.DateField()
    used = models.BigIntegerField(default=0)
    reserved = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["api_key", "period", "period_start"],
                name="one_quota_counter_per_period",
            )
        ]

    def __str__(self) -> str:
        return f"{self.api_key_id} {self.period} {self.period_start}"


class UsageRecord(models.Model):
    """One authenticated request: what it asked for, what decided it, what it cost."""

    class Status(models.TextChoices):
        PENDING = "pending", "In flight (tokens reserved)"
        SUCCEEDED = "succeeded", "Succeeded"
        REFUSED = "refused", "Refused by a limit or rule"
        FAILED = "failed", "Failed upstream, or abandoned"

    api_key = models.ForeignKey(APIKey, on_delete=models.CASCADE, related_name="usage")
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="usage")
    endpoint = models.CharField(max_length=64)
    model = models.CharField(max_length=128, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    # The error code of a refusal or failure, e.g. "rate_limit_exceeded".
    reason = models.CharField(max_length=64, blank=True)
    rule = models.ForeignKey(
        PromptRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reserved_tokens = models.PositiveIntegerField(default=0)
    # The periods whose quota counters contain reserved_tokens, such as
    # "day,month". Empty when the key had no cap.
    reserved_periods = models.CharField(max_length=16, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    upstream_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    request_id = models.CharField(max_length=128, db_index=True)
    prompt_text = models.TextField(blank=True)
    # Set when the request starts, not when the record is inserted. The quota
    # reservation picks its day and month from this instant, so that the
    # record names the counter rows that its reserved tokens are in.
    created_at = models.DateTimeField(
        default=timezone.now, editable=False, db_index=True
    )
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["api_key", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} {self.status}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
