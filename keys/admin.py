"""Admin pages for tiers and API keys."""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from .models import APIKey, Tier
from .services import issue_key, revoke_key


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ["name", "default_model", "key_count", "created_at"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at", "updated_at"]

    @admin.display(description="keys")
    def key_count(self, tier: Tier) -> int:
        return tier.api_keys.count()


class KeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        if self.value() == "active":
            return queryset.usable()
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin):
    list_display = [
        "prefix",
        "name",
        "tier",
        "created_at",
        "last_used_at",
        "expires_at",
        "state",
    ]
    list_filter = ["tier", KeyStateFilter]
    list_select_related = ["tier"]
    search_fields = ["name", "prefix"]
    actions = ["revoke_selected"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "tier", "expires_at"]
        return [
            "name",
            "tier",
            "prefix",
            "expires_at",
            "created_at",
            "last_used_at",
            "revoked_at",
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        if obj.is_revoked:
            return [
                "name",
                "tier",
                "prefix",
                "expires_at",
                "created_at",
                "last_used_at",
                "revoked_at",
            ]
        return ["prefix", "created_at", "last_used_at", "revoked_at"]

    @admin.display(description="state")
    def state(self, api_key: APIKey) -> str:
        return api_key.state

    def save_model(self, request, obj: APIKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # A new key goes through the same code as the command, and its
        # plaintext is shown this once.
        created, raw_key = issue_key(
            name=obj.name, tier=obj.tier, expires_at=obj.expires_at
        )
        obj.pk = created.pk
        obj.prefix = created.prefix
        obj.created_at = created.created_at
        self.message_user(
            request,
            f"The new API key is {raw_key} . Copy it now: it is not stored "
            "and will not be shown again.",
            level=messages.WARNING,
        )

    @admin.action(description="Revoke selected API keys")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        revoked = sum(revoke_key(api_key=api_key) for api_key in queryset)
        self.message_user(request, f"Revoked {revoked} API key(s).")
