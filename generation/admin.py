"""Admin pages for usage records."""

from django.contrib import admin
from django.http import HttpRequest

from .models import UsageRecord


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = [
        "created_at",
        "api_key",
        "tier",
        "endpoint",
        "model",
        "status",
        "http_status",
        "reason",
        "prompt_tokens",
        "completion_tokens",
        "reserved_tokens",
        "upstream_latency_ms",
        "request_id",
    ]
    list_filter = [
        "status",
        "tier",
        "reason",
        "created_at",
        ("api_key", admin.RelatedOnlyFieldListFilter),
    ]
    list_select_related = ["api_key", "tier"]
    search_fields = ["request_id", "api_key__prefix", "api_key__name", "model"]
    date_hierarchy = "created_at"
    readonly_fields = [field.name for field in UsageRecord._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
