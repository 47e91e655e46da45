"""Admin for webhooks (checked as the API checks them; the secret shown once, on creation) and their
deliveries, with every attempt and a "send again" action."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import Delivery, DeliveryAttempt, Notification, Webhook
from .services import deliveries_resend, webhook_check


class WebhookForm(forms.ModelForm):
    url = forms.URLField(max_length=2000, assume_scheme="https", help_text="Where notifications are POSTed.")
    notifications = forms.MultipleChoiceField(choices=Notification.choices, widget=forms.CheckboxSelectMultiple)
    secret = forms.CharField(required=False, help_text="Leave empty to generate one; it is shown once, on saving.")

    class Meta:
        model = Webhook
        fields = ("url", "notifications", "secret", "description", "is_active")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        given = {k: data.get(k) for k in ("url", "notifications", "description", "is_active") if k in data}
        if data.get("secret"):
            given["secret"] = data["secret"]
        clean, errors = webhook_check(given, partial=self.instance.pk is not None)
        for name, error in errors.items():
            self.add_error(name if name in self.fields else None, error)
        data.update(clean)
        return data


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    form = WebhookForm
    list_display = ("url", "notifications", "is_active", "created_at")
    list_filter = ("is_active",)

    def get_fields(self, request: HttpRequest, obj: Webhook | None = None) -> tuple[str, ...]:
        # The secret is written once: afterwards the form shows no field for it.
        fields = ("url", "notifications", "description", "is_active")
        return (*fields[:2], "secret", *fields[2:]) if obj is None else fields

    def save_model(self, request: HttpRequest, obj: Webhook, form: forms.ModelForm, change: bool) -> None:
        if not change:
            obj.secret = form.cleaned_data["secret"]
        super().save_model(request, obj, form, change)
        if not change:
            messages.warning(request, f"Its secret, shown this once: {obj.secret}")


class DeliveryAttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    fields = readonly_fields = ("number", "at", "status_code", "error", "seconds")
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ("notification", "trace_id", "webhook", "state", "attempts", "created_at", "next_attempt_at")
    list_filter = ("state", "notification")
    search_fields = ("trace_id",)
    readonly_fields = ("id", "webhook", "notification", "trace_id", "data", "created_at", "state", "attempts")
    fields = (*readonly_fields, "next_attempt_at")
    inlines = [DeliveryAttemptInline]
    actions = ["send_again"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_resend_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("webhooks_app.change_delivery")

    @admin.action(description="Send again", permissions=["resend"])
    def send_again(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        count = deliveries_resend(queryset.values_list("pk", flat=True))
        self.message_user(request, f"{count} notification(s) will be sent again.")
