"""Django admin for authoring workflows (nodes and edges inline, validated as a DAG) and viewing runs."""

from __future__ import annotations

from functools import cached_property, partial
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Count, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html

from . import graph_svg
from .admin_schedule import schedule_view
from .definitions import DefinitionError, definition_validate, registered_task_names, workflow_version_sync
from .engine import kinds
from .engine.graph import edge_spec
from .models import Edge, Node, TaskRun, Worker, WorkflowDefinition, WorkflowRun

SMALL_JSON = {"widget": forms.Textarea(attrs={"rows": 2, "cols": 30})}


def _choices_read_once(field: forms.Field | None) -> forms.Field | None:
    """Evaluate a select's queryset once per page instead of once per inline row."""
    if isinstance(field, forms.ModelChoiceField):
        field.choices = list(field.choices)
    return field


def task_choices() -> list[tuple[str, str]]:
    """The registered Celery task names, sorted, for the node task select."""
    return [("", "---------")] + [(name, name) for name in sorted(registered_task_names())]


# --------------------------------------------------------------------------- definition check


class DefinitionCheck:
    """The definition one submit would save, built from the node and edge formsets and validated once.

    Both inline formsets share one instance: the node formset reports the node problems, the edge
    formset the edge and cycle problems, so each message shows next to the rows it is about.
    """

    def __init__(self, *, workflow: WorkflowDefinition, nodes: BaseInlineFormSet, edges: BaseInlineFormSet | None):
        self.workflow = workflow
        self.nodes = nodes
        self.edges = edges

    @staticmethod
    def _rows(formset: BaseInlineFormSet | None) -> tuple[list[forms.Form], list[forms.Form]] | None:
        """(kept, deleted) forms with data, or None when a kept form has field errors of its own."""
        kept: list[forms.Form] = []
        deleted: list[forms.Form] = []
        for form in formset.forms if formset is not None else []:
            valid = form.is_valid()
            data = getattr(form, "cleaned_data", {})
            if data.get("DELETE") and formset.can_delete:
                deleted.append(form)
            elif not valid:
                return None
            elif data:  # an untouched extra row has no data and is not saved
                kept.append(form)
        return kept, deleted

    @staticmethod
    def _pk(value: Any) -> Any:
        return getattr(value, "pk", value)

    def definition(self) -> dict | None:
        """The would-be definition in the export shape, or None while some row has field errors."""
        node_rows, edge_rows = self._rows(self.nodes), self._rows(self.edges)
        if node_rows is None or edge_rows is None:
            return None
        kept_nodes, deleted_nodes = node_rows
        # Edges point at node rows; a key may be renamed in this very submit, so the keys come from
        # the submitted node rows, not from the database.
        labels: dict[Any, str] = {}
        for form in deleted_nodes:
            if form.instance.pk is not None:
                labels[form.instance.pk] = f"{form.initial.get('key', form.instance.pk)} (deleted)"
        nodes = []
        for form in kept_nodes:
            data = form.cleaned_data
            if form.instance.pk is not None:
                labels[form.instance.pk] = data["key"]
            nodes.append(
                {
                    "key": data["key"],
                    "kind": data.get("kind") or "task",
                    "task": data["task"],
                    "event_type": self._pk(data["event_type"]),
                    "params": data.get("params"),
                    "max_retries": data["max_retries"],
                    "retry_delay": data["retry_delay"],
                    "timeout": data.get("timeout"),
                    "trigger_rule": data["trigger_rule"],
                    **(data.get("options") or {}),
                }
            )

        def label(node: Any) -> str:
            pk = self._pk(node)
            return labels.get(pk) or f"{getattr(node, 'key', pk)} (not a node of this workflow)"

        kept_edges, _ = edge_rows
        edges = [
            edge_spec(
                label(f.cleaned_data["source"]), label(f.cleaned_data["target"]), f.cleaned_data.get("when") or ""
            )
            for f in kept_edges
        ]
        workflow = self.workflow
        return {
            # The main form checks the name itself; a placeholder keeps a blank one from being reported twice.
            "name": workflow.name or "new-workflow",
            "description": workflow.description or "",
            "is_active": bool(workflow.is_active),
            # As submitted, null included: definition_validate refuses what the column cannot hold.
            "trigger_event_types": workflow.trigger_event_types,
            "nodes": nodes,
            "edges": edges,
        }

    @cached_property
    def errors(self) -> list[str]:
        data = self.definition()
        if data is None:
            return []
        try:
            definition_validate(data)
        except DefinitionError as exc:
            return list(exc.errors)
        return []

    @cached_property
    def edge_errors(self) -> list[str]:
        return [e for e in self.errors if e.startswith(("edge", "cycle"))]

    @cached_property
    def node_errors(self) -> list[str]:
        return [e for e in self.errors if e not in self.edge_errors]


class _CheckedFormSet(BaseInlineFormSet):
    """An inline formset whose rows are judged by `definition_validate` across the whole form."""

    definition_check: DefinitionCheck | None = None
    errors_attr = ""  # which of the check's error lists belongs to this formset

    def clean(self) -> None:
        if self.definition_check is None:
            super().clean()
        # Duplicate keys and edges are reported by definition_validate, by name, instead of
        # Django's generic "duplicate data" message; the database constraints still back them.
        elif errors := getattr(self.definition_check, self.errors_attr):
            raise ValidationError(errors)


class NodeFormSet(_CheckedFormSet):
    errors_attr = "node_errors"


class EdgeFormSet(_CheckedFormSet):
    errors_attr = "edge_errors"


class NodeForm(forms.ModelForm):
    map_over = forms.CharField(
        label="map over",
        required=False,
        strip=True,
        widget=forms.TextInput(attrs={"size": 24, "placeholder": "upstream.list.images"}),
        help_text="A CEL expression giving a list: one instance of the task per element. Empty: not mapped.",
    )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # `map_over` is kept in `options` with the kind's other settings, but edited in a field of its own.
        options = dict(self.instance.options or {})
        if "map_over" in self.fields and "options" in self.fields:
            self.initial["map_over"] = options.pop("map_over", "")
            self.initial["options"] = options
        task = self.fields.get("task")
        if task is None:
            return
        # Keep a name that is no longer registered visible, so definition_validate can name it.
        known = {value for value, _ in task.widget.choices}
        shown = {self.instance.task, self.data.get(self.add_prefix("task"), "") if self.is_bound else ""}
        extra = [(name, f"{name} (not registered)") for name in sorted(shown - known - {"", None})]
        if extra:
            task.widget.choices = list(task.widget.choices) + extra

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if "map_over" not in self.fields or "options" not in self.fields:
            return data
        options = data.get("options")
        if options is None and "options" in self.errors:
            return data
        if not isinstance(options or {}, dict):
            self.add_error("options", "Options must be an object of settings.")
            return data
        options = dict(options or {})
        if "map_over" in options:
            self.add_error("options", "Set map_over in its own field, not in options.")
            return data
        if data.get("map_over"):
            options["map_over"] = data["map_over"]
        data["options"] = options
        return data


class EdgeForm(forms.ModelForm):
    def _get_validation_exclusions(self) -> set[str]:
        # The graph rules on source and target (no self-edge, no duplicate) are checked for the whole
        # submitted definition by definition_validate, whose messages name the edge; the model
        # constraints would only repeat them as "Constraint ... is violated".
        return super()._get_validation_exclusions() | {"source", "target"}


class NodeInline(admin.TabularInline):
    model = Node
    form = NodeForm
    formset = NodeFormSet
    extra = 1
    fields = (
        "key",
        "kind",
        "task",
        "event_type",
        "params",
        "max_retries",
        "retry_delay",
        "timeout",
        "trigger_rule",
        "map_over",
        "options",
    )
    formfield_overrides = {models.JSONField: SMALL_JSON}

    def get_formset(self, request: HttpRequest, obj: WorkflowDefinition | None = None, **kwargs: Any) -> type:
        # One registry lookup per page, shared by every row's select.
        kwargs["formfield_callback"] = partial(self.formfield_for_dbfield, request=request, tasks=task_choices())
        return super().get_formset(request, obj, **kwargs)

    def formfield_for_dbfield(
        self, db_field: models.Field, request: HttpRequest, tasks: list | None = None, **kwargs: Any
    ) -> forms.Field | None:
        if db_field.name == "kind":
            return forms.CharField(
                label=db_field.verbose_name,
                max_length=db_field.max_length,
                help_text=db_field.help_text,
                initial=db_field.default,
                required=False,
                empty_value=db_field.default,
                widget=forms.Select(choices=[(name, name) for name in kinds.names()]),
            )
        if db_field.name == "task":
            # A free-text field behind a select: a value outside the list reaches definition_validate,
            # which names it, instead of Django's anonymous "Select a valid choice".
            return forms.CharField(
                label=db_field.verbose_name,
                max_length=db_field.max_length,
                help_text=db_field.help_text,
                widget=forms.Select(choices=tasks if tasks is not None else task_choices()),
            )
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def formfield_for_foreignkey(
        self, db_field: models.ForeignKey, request: HttpRequest, **kwargs: Any
    ) -> forms.Field | None:
        return _choices_read_once(super().formfield_for_foreignkey(db_field, request, **kwargs))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Node]:
        return super().get_queryset(request).select_related("event_type")


class EdgeInline(admin.TabularInline):
    model = Edge
    form = EdgeForm
    formset = EdgeFormSet
    extra = 1
    fields = ("source", "target", "when")
    formfield_overrides = {models.TextField: {"widget": forms.TextInput(attrs={"size": 40})}}

    def get_formset(self, request: HttpRequest, obj: WorkflowDefinition | None = None, **kwargs: Any) -> type:
        kwargs["formfield_callback"] = partial(self.formfield_for_dbfield, request=request, workflow=obj)
        return super().get_formset(request, obj, **kwargs)

    def formfield_for_dbfield(
        self, db_field: models.Field, request: HttpRequest, workflow: WorkflowDefinition | None = None, **kwargs: Any
    ) -> forms.Field | None:
        if isinstance(db_field, models.ForeignKey):
            kwargs["workflow"] = workflow
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def formfield_for_foreignkey(
        self,
        db_field: models.ForeignKey,
        request: HttpRequest,
        workflow: WorkflowDefinition | None = None,
        **kwargs: Any,
    ) -> forms.Field | None:
        if db_field.name in ("source", "target"):
            # Only nodes already saved in this workflow: new nodes are saved first, then linked.
            saved = workflow is not None and workflow.pk is not None
            kwargs["queryset"] = (
                Node.objects.filter(workflow=workflow).order_by("key") if saved else Node.objects.none()
            )
        return _choices_read_once(super().formfield_for_foreignkey(db_field, request, **kwargs))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Edge]:
        return super().get_queryset(request).select_related("source", "target")


@admin.register(WorkflowDefinition)
class WorkflowDefinitionAdmin(admin.ModelAdmin):
    inlines = [NodeInline, EdgeInline]
    list_display = ("name", "version", "is_active", "node_count", "updated_at", "page_link")
    list_filter = ("is_active",)
    search_fields = ("name", "description")
    fields = (
        "name",
        "description",
        "is_active",
        "trigger_event_types",
        "version",
        "page_link",
        "updated_at",
        "graph_preview",
    )
    readonly_fields = ("version", "page_link", "updated_at", "graph_preview")
    actions = ("activate", "deactivate", "schedule")
    formfield_overrides = {models.JSONField: {"widget": forms.Textarea(attrs={"rows": 2, "cols": 60})}}

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowDefinition]:
        return super().get_queryset(request).annotate(node_count=Count("nodes"))

    @admin.display(description="nodes", ordering="node_count")
    def node_count(self, obj: WorkflowDefinition) -> int:
        return obj.node_count

    @admin.display(description="page")
    def page_link(self, obj: WorkflowDefinition) -> str:
        if obj.pk is None:
            return "-"
        url = reverse("workflows_app:workflow-detail", args=[obj.name])
        return format_html('<a href="{}">{}</a>', url, url)

    @admin.display(description="graph (as saved)")
    def graph_preview(self, obj: WorkflowDefinition) -> str:
        """The drawing of the workflow page, each node linking to its row there."""
        if obj.pk is None:
            return "-"
        nodes = list(obj.nodes.select_related("event_type").order_by("id"))
        key_of = {node.id: node.key for node in nodes}
        rows = list(obj.edges.order_by("id"))
        edges = [(key_of[e.source_id], key_of[e.target_id]) for e in rows]
        conditions = {(key_of[e.source_id], key_of[e.target_id]): e.when for e in rows if e.when}
        if not nodes:
            return "no nodes yet"
        url = reverse("workflows_app:workflow-detail", args=[obj.name])
        svg = graph_svg.workflow_svg(
            nodes,
            edges,
            label=f"{obj.name} definition",
            href=lambda key: f"{url}#node-{key}",
            conditions=conditions,
        )
        # The admin's form rows grow with their content: a bounded, scrolling box keeps the form in view.
        return format_html('<div class="graph" style="overflow:auto;max-width:min(1100px,70vw)">{}</div>', svg)

    def get_inline_instances(self, request: HttpRequest, obj: WorkflowDefinition | None = None) -> list:
        # Edges link saved nodes, so a new workflow gets its nodes first and its edges on the next save.
        inlines = super().get_inline_instances(request, obj)
        return inlines if obj is not None else [i for i in inlines if not isinstance(i, EdgeInline)]

    def _create_formsets(self, request: HttpRequest, obj: WorkflowDefinition, change: bool) -> tuple[list, list]:
        formsets, inline_instances = super()._create_formsets(request, obj, change)
        nodes = next((f for f in formsets if isinstance(f, NodeFormSet)), None)
        edges = next((f for f in formsets if isinstance(f, EdgeFormSet)), None)
        if nodes is not None and nodes.is_bound:
            # Django validates the main form before the inlines, so by the time the formsets are
            # cleaned `obj` carries the submitted name and trigger event types.
            check = DefinitionCheck(workflow=obj, nodes=nodes, edges=edges)
            nodes.definition_check = check
            if edges is not None:
                edges.definition_check = check
        return formsets, inline_instances

    def save_related(self, request: HttpRequest, form: forms.ModelForm, formsets: list, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        # Runs point at a version snapshot, so the edit reaches new runs only. The admin saves in one
        # transaction and save_model's UPDATE already holds the definition's row lock, so two
        # concurrent edits cannot take the same version number.
        workflow_version_sync(workflow=form.instance)

    @admin.action(description="Activate selected workflows", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[WorkflowDefinition]) -> None:
        count = queryset.update(is_active=True)
        self.message_user(request, f"{count} workflow(s) activated.", messages.SUCCESS)

    @admin.action(description="Deactivate selected workflows", permissions=["change"])
    def deactivate(self, request: HttpRequest, queryset: QuerySet[WorkflowDefinition]) -> None:
        count = queryset.update(is_active=False)
        self.message_user(request, f"{count} workflow(s) deactivated.", messages.SUCCESS)

    @admin.action(description="Schedule this workflow", permissions=["change"])
    def schedule(self, request: HttpRequest, queryset: QuerySet[WorkflowDefinition]) -> HttpResponseRedirect | None:
        workflows = list(queryset[:2])
        if len(workflows) != 1:
            self.message_user(request, "Select exactly one workflow to schedule.", messages.WARNING)
            return None
        return HttpResponseRedirect(reverse("admin:workflows_app_workflowdefinition_schedule", args=[workflows[0].pk]))

    def get_urls(self) -> list:
        schedule = path(
            "<path:object_id>/schedule/",
            self.admin_site.admin_view(self.schedule_view),
            name="workflows_app_workflowdefinition_schedule",
        )
        return [schedule, *super().get_urls()]

    def schedule_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return schedule_view(self, request, object_id)


# --------------------------------------------------------------------------- runs (view only)


class ReadOnlyMixin:
    """View only: runs and tasks change through the engine, never by hand."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _run_page(trace_id: Any) -> str:
    url = reverse("workflows_app:run-detail", args=[trace_id])
    return format_html('<a href="{}">{}</a>', url, url)


class TaskRunInline(ReadOnlyMixin, admin.TabularInline):
    """A run's nodes, one row each: a mapped node's instances, which may be thousands, are in the task
    run list (search by trace id) and on the node's status page."""

    model = TaskRun
    extra = 0
    can_delete = False
    show_change_link = True
    fields = (
        "node_key",
        "map_index",
        "event_type",
        "task_name",
        "status",
        "attempts",
        "queued_at",
        "started_at",
        "finished_at",
        "duration",
        "worker",
        "error",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskRun]:
        return super().get_queryset(request).filter(map_index__isnull=True).select_related("event_type")


@admin.register(WorkflowRun)
class WorkflowRunAdmin(ReadOnlyMixin, admin.ModelAdmin):
    inlines = [TaskRunInline]
    list_display = (
        "trace_id",
        "workflow",
        "workflow_version",
        "status",
        "source",
        "created_by",
        "created_at",
        "finished_at",
        "page_link",
    )
    list_filter = ("status", "workflow", "source", "created_at")
    list_select_related = ("workflow", "created_by")
    search_fields = ("trace_id", "idempotency_key")
    date_hierarchy = "created_at"
    fields = (
        "trace_id",
        "page_link",
        "workflow",
        "workflow_version",
        "status",
        "source",
        "payload",
        "idempotency_key",
        "created_by",
        "created_at",
        "finished_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowRun]:
        return super().get_queryset(request).select_related("workflow", "created_by")

    @admin.display(description="status page")
    def page_link(self, obj: WorkflowRun) -> str:
        return _run_page(obj.trace_id)


@admin.register(TaskRun)
class TaskRunAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "run",
        "workflow",
        "node_key",
        "map_index",
        "event_type",
        "task_name",
        "status",
        "attempts",
        "queued_at",
        "started_at",
        "finished_at",
        "duration",
    )
    list_filter = ("status", "event_type", "run__workflow", "queued_at")
    list_select_related = ("run__workflow", "event_type")
    search_fields = ("run__trace_id", "node_key", "task_name")
    fields = (
        "run",
        "page_link",
        "node_key",
        "map_index",
        "event_type",
        "task_name",
        "status",
        "attempts",
        "holds_slot",
        "current_event",
        "queued_at",
        "started_at",
        "finished_at",
        "duration",
        "worker",
        "result",
        "error",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskRun]:
        return super().get_queryset(request).select_related("run__workflow", "event_type", "current_event")

    @admin.display(description="workflow", ordering="run__workflow__name")
    def workflow(self, obj: TaskRun) -> str:
        return obj.run.workflow.name

    @admin.display(description="duration (s)")
    def duration(self, obj: TaskRun) -> float | None:
        return obj.duration

    @admin.display(description="status page")
    def page_link(self, obj: TaskRun) -> str:
        return _run_page(obj.run_id)


@admin.register(Worker)
class WorkerAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """View only: each worker writes its own row with its heartbeat; /workers/ shows what it runs."""

    list_display = ("name", "hostname", "pid", "pool_size", "started_at", "last_seen")
    search_fields = ("name", "hostname")
    ordering = ("-last_seen",)
    fields = ("name", "hostname", "queues", "pool_size", "pid", "started_at", "last_seen", "attempts")
    readonly_fields = fields

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Forgetting a worker that is gone for good is harmless: a live one writes its row again.
        return bool(request.user.has_perm("workflows_app.delete_worker"))
