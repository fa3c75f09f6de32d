"""Admin pages for API keys: list, filters and the lifecycle actions.

The actions call the functions in keys.services that the management commands
call, so a key rotated, extended or revoked here behaves as one changed from
the shell.
"""

import datetime

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME, ActionForm
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html_join
from django.utils.safestring import mark_safe

from generation.charts import usage_chart
from generation.quotas import usage_summary

from .models import KEY_STATES, APIKey
from .services import (
    MAX_EXPIRY_DAYS,
    MAX_GRACE,
    KeyStateError,
    extend_expiry,
    issue_key,
    revoke_key,
    rotate_key,
)

DEFAULT_EXTENSION_DAYS = 30
MAX_GRACE_MINUTES = int(MAX_GRACE.total_seconds() // 60)


class KeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return [(state, state.capitalize()) for state in KEY_STATES]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in KEY_STATES:
            return queryset.in_state(self.value())
        return queryset


class LastUsedFilter(admin.SimpleListFilter):
    """Keys by their last use.

    "Not in the last 90 days" counts a never-used key from its creation, as
    the expire_stale_keys command does.
    """

    title = "last used"
    parameter_name = "last_used"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return [
            ("7d", "In the last 7 days"),
            ("30d", "In the last 30 days"),
            ("not-90d", "Not in the last 90 days"),
            ("never", "Never"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        if self.value() == "7d":
            return queryset.used_since(now - datetime.timedelta(days=7))
        if self.value() == "30d":
            return queryset.used_since(now - datetime.timedelta(days=30))
        if self.value() == "not-90d":
            return queryset.unused_since(now - datetime.timedelta(days=90))
        if self.value() == "never":
            return queryset.never_used()
        return queryset


class KeyActionForm(ActionForm):
    """The action bar, with the numbers the rotate and extend actions take.

    The numbers are read in the actions, not validated here: an invalid action
    form makes the admin report "No action selected", which would hide the
    real mistake.
    """

    days = forms.CharField(
        required=False,
        label="Days to extend:",
        widget=forms.TextInput(attrs={"size": 4}),
    )
    grace_minutes = forms.CharField(
        required=False,
        label="Grace minutes (rotate):",
        widget=forms.TextInput(attrs={"size": 4}),
    )


def _read_number(
    request: HttpRequest, field: str, *, default: int, low: int, high: int
) -> int:
    """Read a whole number from the action bar, or raise ValueError."""
    raw = request.POST.get(field, "").strip()
    if not raw:
        return default
    label = KeyActionForm.base_fields[field].label.rstrip(":")
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{label} must be a whole number, not {raw!r}.") from exc
    if not low <= value <= high:
        raise ValueError(f"{label} must be between {low} and {high}, not {value}.")
    return value


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
    list_filter = ["tier", KeyStateFilter, LastUsedFilter]
    list_select_related = ["tier"]
    search_fields = ["name", "prefix"]
    action_form = KeyActionForm
    actions = ["rotate_selected", "extend_selected", "revoke_selected"]

    _detail_fields = ["name", "tier", "prefix", "expires_at"]
    _history_fields = [
        "created_at",
        "last_used_at",
        "rotated_at",
        "previous_key_expires_at",
        "revoked_at",
    ]
    _override_fields = ["rate_limits", "tokens_per_day", "tokens_per_month"]

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [(None, {"fields": ["name", "tier", "expires_at"]})]
        return [
            (None, {"fields": self._detail_fields}),
            (
                "Limits",
                {
                    "fields": [*self._override_fields, "usage", usage_chart],
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
                usage_chart,
                *self._history_fields,
            ]
        return ["prefix", "usage", usage_chart, *self._history_fields]

    def has_delete_permission(self, request, obj=None) -> bool:
        # Deleting a key would cascade to its usage records and quota counters,
        # losing its billing history. Revoking is the way to retire a key.
        return False

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
            # Only the fields of the form are written, so that a rotation,
            # revocation or use of the key while the form was open is kept.
            obj.save(update_fields=form.changed_data)
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

    def _confirmation(
        self,
        request: HttpRequest,
        queryset: QuerySet,
        *,
        action: str,
        verb: str,
        consequence: str,
    ) -> TemplateResponse | None:
        """Return the confirmation page for the action, or None once confirmed.

        Revoking is final and rotating replaces the secret that clients hold,
        so neither runs on the first click.
        """
        if request.POST.get("confirm") == "yes":
            return None
        carried = [
            (name, request.POST[name])
            for name in ("grace_minutes", "days")
            if name in request.POST
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": f"{verb.capitalize()} API keys?",
            "opts": self.model._meta,
            "keys": list(queryset),
            "action": action,
            "verb": verb,
            "consequence": consequence,
            "carried_fields": carried,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(
            request, "admin/keys/apikey/confirm_action.html", context
        )

    @admin.action(description="Rotate selected API keys (new secret, shown once)")
    def rotate_selected(
        self, request: HttpRequest, queryset: QuerySet
    ) -> TemplateResponse | None:
        try:
            minutes = _read_number(
                request, "grace_minutes", default=0, low=0, high=MAX_GRACE_MINUTES
            )
        except ValueError as exc:
            self.message_user(request, str(exc), level=messages.ERROR)
            return None
        if minutes:
            old_keys = f"Their old secrets keep working for {minutes} minutes."
        else:
            old_keys = "Their old secrets stop working at once."
        page = self._confirmation(
            request,
            queryset,
            action="rotate_selected",
            verb="rotate",
            consequence="These API keys get new secrets, shown once on the next "
            f"page. {old_keys}",
        )
        if page is not None:
            return page
        grace = datetime.timedelta(minutes=minutes)
        for api_key in queryset:
            try:
                raw_key = rotate_key(api_key=api_key, grace=grace)
            except KeyStateError as exc:
                self.message_user(request, str(exc), level=messages.ERROR)
                continue
            self.message_user(
                request, _rotation_message(api_key, raw_key), level=messages.WARNING
            )
        return None

    @admin.action(
        description="Extend expiry of selected API keys (by the days given, default 30)"
    )
    def extend_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        try:
            days = _read_number(
                request,
                "days",
                default=DEFAULT_EXTENSION_DAYS,
                low=1,
                high=MAX_EXPIRY_DAYS,
            )
        except ValueError as exc:
            self.message_user(request, str(exc), level=messages.ERROR)
            return
        extended, without_expiry = 0, []
        for api_key in queryset:
            try:
                new_expiry = extend_expiry(
                    api_key=api_key, by=datetime.timedelta(days=days)
                )
            except (KeyStateError, ValueError) as exc:
                self.message_user(request, str(exc), level=messages.ERROR)
                continue
            if new_expiry is None:
                without_expiry.append(api_key.prefix)
            else:
                extended += 1
        message = (
            f"Extended the expiry of {extended} API key(s) by {days} days, "
            "counted from now for keys that had expired."
        )
        if without_expiry:
            unchanged = ", ".join(without_expiry)
            message += f" Unchanged because they do not expire: {unchanged}."
        self.message_user(request, message)

    @admin.action(description="Revoke selected API keys")
    def revoke_selected(
        self, request: HttpRequest, queryset: QuerySet
    ) -> TemplateResponse | None:
        page = self._confirmation(
            request,
            queryset,
            action="revoke_selected",
            verb="revoke",
            consequence="These API keys stop working at once. Revocation is "
            "final: a revoked key cannot be restored or rotated.",
        )
        if page is not None:
            return page
        revoked = sum(revoke_key(api_key=api_key) for api_key in queryset)
        self.message_user(request, f"Revoked {revoked} API key(s).")
        return None


def _rotation_message(api_key: APIKey, raw_key: str) -> str:
    if api_key.previous_key_expires_at is None:
        old_key = "The old key no longer works."
    else:
        until = f"{api_key.previous_key_expires_at:%Y-%m-%d %H:%M:%S} UTC"
        old_key = f"The old key works until {until}."
    return (
        f"The new key for {api_key.name!r} ({api_key.prefix}) is {raw_key} . "
        f"Copy it now: it is not stored and will not be shown again. {old_key}"
    )
