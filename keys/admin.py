"""Admin pages for tiers and prompt rules. The API key admin is in keys.key_admin."""

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.text import Truncator

from generation.charts import usage_chart
from generation.policy import evaluate_prompt

# Registers the API key admin, kept in its own module.
from . import key_admin  # noqa: F401
from .forms import TryPromptForm
from .models import PromptRule, Tier
from .signals import touch_tiers


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
    readonly_fields = ["created_at", "updated_at", usage_chart]
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
        ("Usage", {"fields": [usage_chart]}),
        ("History", {"fields": ["created_at", "updated_at"], "classes": ["collapse"]}),
    ]
    inlines = [TierRuleInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(key_count=Count("api_keys"))

    def save_related(self, request, form, formsets, change) -> None:
        super().save_related(request, form, formsets, change)
        # The rules inline saves and deletes the tier's links to rules as rows
        # of the through model. Django sends no signal for those, so the
        # receivers in keys.signals do not raise the tier's rules version.
        if any(formset.has_changed() for formset in formsets):
            touch_tiers(Tier.objects.filter(pk=form.instance.pk))

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
