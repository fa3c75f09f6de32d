"""Admin pages for usage records."""

from django.contrib import admin
from django.db.models import Count, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from .models import UsageRecord


def usage_totals(records: QuerySet) -> list[dict]:
    """Count requests and sum tokens per status, with a last row for all statuses.

    One grouped query. Every status has a row, with zeros when it has no records.
    """
    per_status = {
        values["status"]: values
        for values in records.order_by()
        .values("status")
        .annotate(
            requests=Count("pk"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        )
    }
    rows = []
    for status, label in UsageRecord.Status.choices:
        values = per_status.get(status, {})
        rows.append(
            {
                "status": status,
                "label": label,
                "requests": values.get("requests", 0),
                "prompt_tokens": values.get("prompt_tokens", 0),
                "completion_tokens": values.get("completion_tokens", 0),
            }
        )
    total = {"status": "", "label": "All"}
    for column in ("requests", "prompt_tokens", "completion_tokens"):
        total[column] = sum(row[column] for row in rows)
    return [*rows, total]


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

    def changelist_view(
        self, request: HttpRequest, extra_context: dict | None = None
    ) -> HttpResponse:
        """Show the list with totals of every record that the filters select.

        The totals cover all pages of the list, not only the page shown.
        """
        response = super().changelist_view(request, extra_context)
        # A redirect (for example after an invalid filter) has no change list.
        context = getattr(response, "context_data", None)
        if isinstance(response, TemplateResponse) and context and "cl" in context:
            context["usage_totals"] = usage_totals(context["cl"].queryset)
        return response

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
