"""The admin's "Schedule this workflow" form: a django-celery-beat periodic task that starts runs."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse

from . import engine
from .models import WorkflowDefinition
from .schedules import NAME_MAX_LENGTH, ScheduleError, crontab_parse, workflow_schedule_create, workflow_schedule_list


class ScheduleForm(forms.Form):
    name = forms.CharField(
        max_length=NAME_MAX_LENGTH,
        help_text='Unique among periodic tasks; the runs it starts show source "schedule:<name>".',
    )
    every_seconds = forms.IntegerField(
        label="every (seconds)", min_value=1, required=False, help_text="Start a run every N seconds…"
    )
    crontab = forms.CharField(
        label="or crontab",
        required=False,
        max_length=200,
        help_text="…or on a cron expression, UTC: minute hour day-of-month month day-of-week, e.g. */15 * * * *.",
    )
    payload = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 60}),
        initial="{}",
        help_text="The run payload, a JSON object.",
    )
    enabled = forms.BooleanField(required=False, initial=True)

    def clean_payload(self) -> dict:
        try:
            payload = json.loads(self.cleaned_data["payload"] or "{}")
        except ValueError as exc:
            raise forms.ValidationError(f"not valid JSON: {exc}") from None
        try:
            return engine.run_payload_check(payload)
        except engine.EngineError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_crontab(self) -> str:
        expression = self.cleaned_data["crontab"].strip()
        if expression:
            try:
                crontab_parse(expression)
            except ScheduleError as exc:
                raise forms.ValidationError(str(exc)) from None
        return expression

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if bool(data.get("every_seconds")) == bool(data.get("crontab")) and not self.errors:
            raise forms.ValidationError("Give either an interval in seconds or a crontab expression.")
        return data


def schedule_view(model_admin: admin.ModelAdmin, request: HttpRequest, object_id: str) -> HttpResponse:
    """GET shows the form and the workflow's schedules; POST creates the periodic task."""
    workflow = get_object_or_404(WorkflowDefinition, pk=object_id)
    if not (
        model_admin.has_change_permission(request, workflow)
        and request.user.has_perm("django_celery_beat.add_periodictask")
    ):
        raise PermissionDenied
    form = ScheduleForm(request.POST or None, initial={"name": f"{workflow.name}-schedule"})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            task = workflow_schedule_create(
                workflow=workflow,
                name=data["name"],
                payload=data["payload"],
                every_seconds=data.get("every_seconds"),
                crontab=data.get("crontab", ""),
                enabled=data["enabled"],
            )
        except ScheduleError as exc:
            form.add_error(None, str(exc))
        else:
            model_admin.message_user(
                request, f"Schedule '{task.name}' created: {task.interval or task.crontab}.", messages.SUCCESS
            )
            return HttpResponseRedirect(request.path)
    context = {
        **model_admin.admin_site.each_context(request),
        "title": f"Schedule workflow {workflow.name}",
        "opts": model_admin.model._meta,
        "original": workflow,
        "form": form,
        "schedules": [
            (task, reverse("admin:django_celery_beat_periodictask_change", args=[task.pk]))
            for task in workflow_schedule_list(workflow=workflow)
        ],
    }
    return TemplateResponse(request, "admin/workflows_app/workflowdefinition/schedule.html", context)
