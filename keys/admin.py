"""Admin pages for tiers, prompt rules and API keys."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator

from generation.policy import evaluate_prompt
from generation.quotas import usage_summary

from .forms import TryPromptForm
from .models import APIKey, PromptRule, Tier
from .services import issue_key, revoke_key


@admin.register(PromptRule)
class PromptRuleAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "action", "enabled", "tier_count"]
    list_filter = ["kind", "action", "enabled"]
    search_fields = ["name", "pattern", "message"]
    # Set here because Meta.ordering does not apply to the annotated queryset.
    ordering = ["name"]
    fields = [
        "name",
        "kind",
        "pattern",
        "action",
        "message",
        "enabled",
        "tier_names",
        "created_at",
        "updated_at",
    ]
    readonly_fields = ["tier_names", "created_at", "updated_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request)
        return queryset.annotate(tier_count=Count("tiers"))

    @admin.display(description="tiers", ordering="tier_count")
    def tier_count(self, rule: PromptRule) -> int:
        return rule.tier_count

    @admin.display(description="used by tiers")
    def tier_names(self, rule: PromptRule) -> str | None:
        names = [tier.name for tier in rule.tiers.all()]
        return ", ".join(names) or None


class TierRuleInline(admin.TabularInline):
    """The tier's prompt rules, one row per attached rule.

    Rules are shared between tiers, so a row attaches or detaches a rule, and
    the rule's own fields are shown read-only. The pencil and plus icons next to
    the rule open its form in a pop-up, where it is edited or created with the
    same validation as on its own page.
    """

    model = Tier.rules.through
    extra = 0
    autocomplete_fields = ["promptrule"]
    fields = [
        "promptrule",
        "rule_kind",
        "rule_action",
        "rule_pattern",
        "rule_enabled",
        "rule_tier_count",
    ]
    readonly_fields = fields[1:]
    verbose_name = "prompt rule"
    verbose_name_plural = "prompt rules"

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "promptrule":
            kwargs["label"] = "Rule"
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request).select_related("promptrule")
        queryset = queryset.annotate(rule_tier_count=Count("promptrule__tiers"))
        return queryset.order_by("promptrule__name")

    @admin.display(description="kind")
    def rule_kind(self, link) -> str | None:
        if link.promptrule_id is None:
            return None
        return link.promptrule.kind

    @admin.display(description="action")
    def rule_action(self, link) -> str | None:
        if link.promptrule_id is None:
            return None
        return link.promptrule.action

    @admin.display(description="pattern")
    def rule_pattern(self, link) -> str | None:
        if link.promptrule_id is None:
            return None
        return Truncator(link.promptrule.pattern).chars(60)

    @admin.display(description="enabled", boolean=True)
    def rule_enabled(self, link) -> bool | None:
        if link.promptrule_id is None:
            return None
        return link.promptrule.enabled

    @admin.display(description="used by tiers")
    def rule_tier_count(self, link) -> int | None:
        return getattr(link, "rule_tier_count", None)


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ["name", "default_model", "key_count", "created_at"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "description",
                    "default_model",
                    "allowed_models",
                    "system_prompt",
                ]
            },
        ),
        (
            "Limits",
            {
                "fields": [
                    "rate_limits",
                    "tokens_per_day",
                    "tokens_per_month",
                    "max_prompt_chars",
                    "max_tokens_cap",
                    "default_max_tokens",
                    "max_choices",
                ]
            },
        ),
        ("Privacy", {"fields": ["store_prompts"]}),
        ("History", {"fields": ["created_at", "updated_at"], "classes": ["collapse"]}),
    ]
    inlines = [TierRuleInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(key_count=Count("api_keys"))

    @admin.display(description="keys", ordering="key_count")
    def key_count(self, tier: Tier) -> int:
        return tier.key_count

    def get_urls(self):
        try_prompt = path(
            "<path:object_id>/try-prompt/",
            self.admin_site.admin_view(self.try_prompt_view),
            name="keys_tier_try_prompt",
        )
        return [try_prompt, *super().get_urls()]

    def try_prompt_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Decide a prompt for this tier as the API would, without the upstream."""
        tier = self.get_object(request, object_id)
        if tier is None:
            raise Http404(f"No tier has the id {object_id!r}.")
        if not self.has_view_permission(request, tier):
            raise PermissionDenied
        form = TryPromptForm(request.POST or None)
        decision = None
        if request.method == "POST" and form.is_valid():
            decision = evaluate_prompt(tier=tier, **form.evaluate_arguments())
        context = {
            **self.admin_site.each_context(request),
            "title": f"Try a prompt on tier {tier.name}",
            "opts": self.model._meta,
            "original": tier,
            "form": form,
            "decision": decision,
        }
        return TemplateResponse(request, "admin/keys/tier/try_prompt.html", context)


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

    _detail_fields = ["name", "tier", "prefix", "expires_at"]
    _history_fields = ["created_at", "last_used_at", "revoked_at"]
    _override_fields = ["rate_limits", "tokens_per_day", "tokens_per_month"]

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [(None, {"fields": ["name", "tier", "expires_at"]})]
        return [
            (None, {"fields": self._detail_fields}),
            (
                "Limits",
                {
                    "fields": [*self._override_fields, "usage"],
                    "description": "Empty fields use the tier's value.",
                },
            ),
            ("History", {"fields": self._history_fields}),
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        if obj.is_revoked:
            return [
                *self._detail_fields,
                *self._override_fields,
                "usage",
                *self._history_fields,
            ]
        return ["prefix", "usage", *self._history_fields]

    @admin.display(description="usage")
    def usage(self, api_key: APIKey) -> str:
        lines = []
        for period in usage_summary(api_key):
            cap = period["cap"]
            line = f"{period['label']}: {period['used']} tokens"
            if cap is not None:
                line += f" of {cap}"
            if period["reserved"]:
                line += f" ({period['reserved']} reserved by requests in flight)"
            lines.append(line)
        return format_html_join(mark_safe("<br>"), "{}", ((line,) for line in lines))

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
