"""Django admin for event types (live parallelism, with running and queued counts) and the events log."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from workflows_app import engine, selectors

from .models import Event, EventType


class EventTypeForm(forms.ModelForm):
    """The admission settings checked as the API and imports check them (`engine.event_type_settings_check`)."""

    class Meta:
        model = EventType
        fields = (
            "name",
            "concurrency",
            "rate_limit",
            "fairness_key",
            "per_key_concurrency",
            "queue_timeout",
            "description",
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        given = {name: data.get(name) for name in engine.ADMISSION_FIELDS if name in self.fields and name in data}
        clean, errors = engine.event_type_settings_check(given)
        for name, error in errors.items():
            self.add_error(name, error)
        data.update(clean)
        return data


@admin.register(EventType)
class EventTypeAdmin(admin.ModelAdmin):
    form = EventTypeForm
    list_display = (
        "name",
        "concurrency",
        "rate_limit",
        "per_key_concurrency",
        "queue_timeout",
        "running",
        "queued",
        "updated_at",
    )
    list_editable = ("concurrency", "rate_limit", "per_key_concurrency", "queue_timeout")
    search_fields = ("name", "description")
    fields = (
        "name",
        "concurrency",
        "rate_limit",
        "fairness_key",
        "per_key_concurrency",
        "queue_timeout",
        "running",
        "queued",
        "description",
        "created_at",
        "updated_at",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[EventType]:
        # The same counts as the API and the queues page, read from the partial indexes only.
        return selectors.event_type_queue_list()

    def get_readonly_fields(self, request: HttpRequest, obj: EventType | None = None) -> tuple[str, ...]:
        # The name is the primary key and the queue name: renaming would create a second type.
        base = ("running", "queued", "created_at", "updated_at")
        return ("name", *base) if obj is not None else base

    @admin.display(description="running", ordering="running")
    def running(self, obj: EventType) -> int:
        return getattr(obj, "running", 0)

    @admin.display(description="queued", ordering="queued")
    def queued(self, obj: EventType) -> int:
        return getattr(obj, "queued", 0)

    def save_model(self, request: HttpRequest, obj: EventType, form: forms.ModelForm, change: bool) -> None:
        if not change:
            super().save_model(request, obj, form, change)
            return
        # Only what the form changed is written: the row's count of held slots is admission's, kept
        # under the row's lock, and the copy this form was built from may be behind it by now.
        admission = [name for name in form.changed_data if name in engine.ADMISSION_FIELDS]
        obj.save(update_fields=[*(name for name in form.changed_data if name not in admission), "updated_at"])
        if admission:
            # As PATCH /api/event-types/{name}/ does: a raised limit hands waiting tasks to Celery now,
            # in the admin's transaction, and the messages leave on its commit.
            engine.event_type_update(name=obj.name, **{name: getattr(obj, name) for name in admission})


def _run_page(trace_id: Any) -> str:
    if not trace_id:
        return "-"
    url = reverse("workflows_app:run-detail", args=[trace_id])
    return format_html('<a href="{}">{}</a>', url, url)


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ("event_id", "trace_id", "event_type", "key", "task_name", "status", "timestamp", "page_link")
    list_filter = ("status", "event_type")
    search_fields = ("event_id", "trace_id", "key")
    date_hierarchy = "timestamp"
    fields = (
        "event_id",
        "trace_id",
        "page_link",
        "event_type",
        "key",
        "task_name",
        "status",
        "timestamp",
        "payload",
        "context",
        "result",
        "updated_at",
    )
    readonly_fields = fields

    @admin.display(description="status page")
    def page_link(self, obj: Event) -> str:
        return _run_page(obj.trace_id)

    # Events are written by the engine only: the admin shows them.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Event | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Event | None = None) -> bool:
        return False
