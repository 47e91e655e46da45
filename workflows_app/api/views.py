"""API views: one per operation, each a thin interface over the engine, definitions and selectors."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from django.db import transaction
from django.http import Http404
from django.urls import reverse
from django.utils import timezone
from django_celery_results.models import TaskResult
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.decorators import api_view
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse as api_reverse
from rest_framework.views import APIView

from events_app.models import Event, EventType
from workflows_app import bulk, engine, selectors
from workflows_app.definitions import definition_export, workflow_definition_create, workflow_definition_save
from workflows_app.engine import rules
from workflows_app.models import TaskRun, WorkflowDefinition, WorkflowRun

from .schema import (
    IDEMPOTENCY_KEY,
    PAGE,
    PUBLISH_EXAMPLE,
    READ,
    WRITE,
    DefinitionChangeSerializer,
    DefinitionSerializer,
    errors,
    paginated,
)
from .throttling import ScopedWindowThrottle


class ModelOutputSerializer(serializers.ModelSerializer):
    """A ModelSerializer that reads its model's fields once per class. DRF builds them again for
    every instance, which cost a trigger's answer as much as the rest of its serializing. Each
    instance still gets its own copies, since binding a field to its serializer sets attributes
    on it: a shallow copy of a plain field (binding only assigns its attributes), a deep one of a
    nested serializer (binding it binds its child too). DRF's deep copy builds every field anew.
    tests/test_library_pins.py fails if DRF's binding or get_fields stop allowing this."""

    def get_fields(self) -> dict[str, serializers.Field]:
        cls = type(self)
        built = cls.__dict__.get("_built_fields")  # this class's own, never a parent's
        if built is None:
            built = super().get_fields()
            cls._built_fields = built
        return {
            name: copy.deepcopy(field) if isinstance(field, serializers.BaseSerializer) else copy.copy(field)
            for name, field in built.items()
        }


class PagePagination(PageNumberPagination):
    """DRF's page numbers, with `page` as the schema documents it: a positive integer, anything else a 404."""

    last_page_strings = ()

    def get_page_number(self, request: Request, paginator: Any) -> str | int:
        raw = request.query_params.get(self.page_query_param)
        if raw is None:
            return 1
        if not re.fullmatch(r"[0-9]{1,9}", raw):
            raise NotFound("Invalid page.")
        return raw


def require(perm: str) -> type[BasePermission]:
    """A permission class asking for one Django model permission, e.g. 'workflows_app.add_workflowrun'."""

    class HasPerm(BasePermission):
        message = f"You need the '{perm}' permission."

        def has_permission(self, request: Request, view: Any) -> bool:
            # Token authentication has read the user's permissions already; otherwise ModelBackend does.
            return bool(request.user and request.user.is_authenticated and request.user.has_perm(perm))

    HasPerm.__name__ = f"Has_{perm.replace('.', '_')}"
    return HasPerm


def _reject_unknown(data: Any, allowed: set[str]) -> dict:
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": ["the body must be a JSON object"]})
    unknown = set(data) - allowed
    if unknown:
        raise ValidationError({name: ["unknown field"] for name in sorted(unknown)})
    return data


def _storable(value: str) -> bool:
    """PostgreSQL can hold it: no NUL character, no lone surrogate."""
    return not any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in value)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and len(key) > 200:
        raise ValidationError({"Idempotency-Key": ["at most 200 characters"]})
    if key is not None and not _storable(key):
        raise ValidationError({"Idempotency-Key": ["must not contain NUL or lone surrogate characters"]})
    return key


@extend_schema_field({"type": "object", "additionalProperties": {}})
class PayloadField(serializers.Field):
    """A run's payload as the body gives it: the engine checks it (`engine.run_payload_check`), as it
    does for every way a run starts, and the API answers its refusal (400, or 413 when too large)."""

    def to_internal_value(self, data: Any) -> Any:
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class StrictRegexField(serializers.RegexField):
    """A RegexField that refuses numbers instead of turning them into strings, as the schema says."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into strings, as the schema says."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """An IntegerField that refuses strings, floats and booleans, as the schema says."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


def _workflow_or_404(name: str) -> WorkflowDefinition:
    workflow = selectors.workflow_get(name=name)
    if workflow is None:
        raise Http404(f"workflow '{name}' not found")
    return workflow


def _run_or_404(trace_id: str) -> WorkflowRun:
    run = selectors.run_get(trace_id=trace_id)
    if run is None:
        raise Http404(f"run '{trace_id}' not found")
    return run


@extend_schema(exclude=True)
@api_view(["GET"])
def api_root(request: Request) -> Response:
    """The entry points of the API, so a browser or client can find its way from /api/."""
    names = ("workflow-list", "run-list", "event-type-list", "event-publish", "schema", "docs")
    return Response({name: api_reverse(f"api-{name}", request=request) for name in names})


# --------------------------------------------------------------------------- workflows


class WorkflowOutputSerializer(serializers.Serializer):
    """A definition in the export shape, plus its live version number."""

    def to_representation(self, instance: WorkflowDefinition) -> dict:
        return {**definition_export(instance), "version": instance.version}


class WorkflowListCreateApi(APIView):
    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "POST":
            return [require("workflows_app.add_workflowdefinition")()]
        return [IsAuthenticated()]

    @extend_schema(
        summary="List workflow definitions",
        operation_id="workflows_list",
        parameters=[PAGE],
        responses={200: paginated("PaginatedWorkflowDefinitionList", DefinitionSerializer(many=True)), **errors(*READ)},
    )
    def get(self, request: Request) -> Response:
        paginator = PagePagination()
        page = paginator.paginate_queryset(selectors.workflow_list(), request, view=self)
        return paginator.get_paginated_response(WorkflowOutputSerializer(page, many=True).data)

    @extend_schema(
        summary="Create a workflow definition",
        description=(
            "The import/export shape. An invalid DAG (cycle, unknown task, bad edge) is a 400 naming it, and so "
            "is a name already taken (PATCH /api/workflows/{name}/ changes a definition)."
        ),
        request=DefinitionSerializer,
        responses={201: DefinitionSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request) -> Response:
        workflow = workflow_definition_create(data=request.data)
        return Response(WorkflowOutputSerializer(workflow).data, status=status.HTTP_201_CREATED)


class WorkflowDetailApi(APIView):
    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "PATCH":
            return [require("workflows_app.change_workflowdefinition")()]
        return [IsAuthenticated()]

    @extend_schema(summary="Get a workflow definition", responses={200: DefinitionSerializer, **errors(*READ)})
    def get(self, request: Request, name: str) -> Response:
        return Response(WorkflowOutputSerializer(_workflow_or_404(name)).data)

    @extend_schema(
        summary="Change or deactivate a workflow definition",
        description="Fields given replace the stored ones; runs already started keep their version.",
        request=DefinitionChangeSerializer,
        responses={200: DefinitionSerializer, **errors(*WRITE, 404)},
    )
    def patch(self, request: Request, name: str) -> Response:
        workflow = _workflow_or_404(name)
        changes = _reject_unknown(
            request.data, {"description", "is_active", "trigger_event_types", "event_types", "nodes", "edges"}
        )
        with transaction.atomic():
            merged = {**definition_export(workflow), **changes, "name": workflow.name}
            workflow = workflow_definition_save(data=merged)
        return Response(WorkflowOutputSerializer(workflow).data)


# --------------------------------------------------------------------------- runs


class TaskRunOutputSerializer(ModelOutputSerializer):
    node = serializers.CharField(source="node_key")
    map_index = serializers.IntegerField(
        read_only=True,
        allow_null=True,
        help_text="Which instance of a mapped node this is (0..n-1); null for a node's own row.",
    )
    event_type = serializers.CharField(source="event_type_id")
    event_id = serializers.UUIDField(
        source="current_event_id",
        allow_null=True,
        read_only=True,
        help_text="The latest attempt's Event id, which is also its Celery task id (null before it is queued).",
    )
    result_url = serializers.SerializerMethodField(
        help_text="The Celery result stored for the latest attempt (django-celery-results), null before it is queued."
    )

    class Meta:
        model = TaskRun
        fields = [
            "node",
            "map_index",
            "event_type",
            "task_name",
            "status",
            "attempts",
            "queued_at",
            "dispatched_at",
            "started_at",
            "finished_at",
            "result",
            "error",
            "event_id",
            "result_url",
        ]

    def get_result_url(self, task: TaskRun) -> str | None:
        if task.current_event_id is None:
            return None
        path = reverse("api-task-result", args=[task.current_event_id])
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path


class RunOutputSerializer(ModelOutputSerializer):
    workflow = serializers.CharField(source="workflow.name")
    url = serializers.SerializerMethodField()
    status_page = serializers.SerializerMethodField()

    class Meta:
        model = WorkflowRun
        fields = [
            "trace_id",
            "workflow",
            "workflow_version",
            "status",
            "payload",
            "priority",
            "source",
            "created_at",
            "finished_at",
            "url",
            "status_page",
        ]

    def _absolute(self, path: str) -> str:
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path

    def get_url(self, run: WorkflowRun) -> str:
        return self._absolute(reverse("api-run-detail", args=[run.trace_id]))

    def get_status_page(self, run: WorkflowRun) -> str:
        return self._absolute(reverse("workflows_app:run-detail", args=[run.trace_id]))


class RunDetailOutputSerializer(RunOutputSerializer):
    tasks = TaskRunOutputSerializer(many=True, source="tasks.all")

    class Meta(RunOutputSerializer.Meta):
        fields = [*RunOutputSerializer.Meta.fields, "tasks"]


class RunTriggerApi(APIView):
    permission_classes = [require("workflows_app.add_workflowrun")]
    throttle_classes = [ScopedWindowThrottle]
    throttle_scope = "trigger"

    class InputSerializer(serializers.Serializer):
        payload = PayloadField(required=False, default=dict, help_text="The run's input, a JSON object.")
        priority = StrictIntegerField(
            required=False,
            min_value=0,
            max_value=9,
            help_text="0 to 9, default 5: its tasks go before those of runs with a lower one in every line.",
        )

        class Meta:
            ref_name = "RunTriggerInput"

    @extend_schema(
        summary="Start a run",
        request=InputSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            201: OpenApiResponse(RunOutputSerializer, description="Started."),
            200: OpenApiResponse(RunOutputSerializer, description="The run this Idempotency-Key already started."),
            **errors(*WRITE, 404, 409, 429),
        },
    )
    def post(self, request: Request, name: str) -> Response:
        workflow = _workflow_or_404(name)
        body = _reject_unknown(request.data, {"payload", "priority"})
        key = _idempotency_key(request)
        if "priority" in body:
            serializer = self.InputSerializer(data={"priority": body["priority"]})
            serializer.is_valid(raise_exception=True)
        run, created = engine.workflow_run_start(
            workflow=workflow,
            payload=body.get("payload", {}),
            idempotency_key=key,
            user=request.user,
            source="api",
            priority=body.get("priority"),
        )
        return Response(
            RunOutputSerializer(run, context={"request": request}).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


RUN_STATUS_FILTER = [*WorkflowRun.Status.values, *(v.lower() for v in WorkflowRun.Status.values)]


def _run_filters(data: Any, *, trace_ids: bool) -> selectors.RunFilter:
    """The run filters of a query string or a JSON body; a 400 naming each wrong field."""
    if trace_ids:
        data = _reject_unknown(data, {"workflow", "status", "since", "until", "payload", "trace_ids"})
    else:
        data = {name: data.get(name) for name in ("workflow", "status", "since", "until", "payload")}
    try:
        return selectors.run_filter_parse(data)
    except selectors.FilterError as exc:
        raise ValidationError({name: [error] for name, error in exc.errors.items()}) from None


SINCE = OpenApiParameter(
    "since",
    str,
    required=False,
    description="Runs created at or after: an ISO 8601 date or date-time (UTC when naive), or a span back from now "
    "such as 15m, 24h, 7d.",
)
UNTIL = OpenApiParameter(
    "until",
    str,
    required=False,
    description="Runs created before: an ISO 8601 date-time, or a date (its whole day included). After since.",
)
PAYLOAD_FILTER = OpenApiParameter(
    "payload",
    str,
    required=False,
    description='A JSON object: runs whose payload contains it (JSON containment, e.g. {"sku": "A-1"}), read from a '
    "GIN index.",
)


class RunListApi(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("workflow", str, required=False),
            OpenApiParameter("status", str, required=False, enum=RUN_STATUS_FILTER, description="Upper or lower case."),
            SINCE,
            UNTIL,
            PAYLOAD_FILTER,
            PAGE,
        ],
        summary="List runs, newest first",
        operation_id="runs_list",
        responses={200: paginated("PaginatedRunList", RunOutputSerializer(many=True)), **errors(400, *READ)},
    )
    def get(self, request: Request) -> Response:
        wanted = request.query_params.get("status")
        if wanted is not None and wanted not in RUN_STATUS_FILTER:
            raise ValidationError({"status": [f"one of {', '.join(WorkflowRun.Status.values)}"]})
        runs = selectors.run_list(filters=_run_filters(request.query_params, trace_ids=False))
        paginator = PagePagination()
        page = paginator.paginate_queryset(runs, request, view=self)
        return paginator.get_paginated_response(RunOutputSerializer(page, many=True, context={"request": request}).data)


class BulkInputSerializer(serializers.Serializer):
    """For the schema only: `_run_filters` reads the body, with the run list's own rules, where a filter
    given empty or null is a filter not given (as an empty query parameter is)."""

    workflow = serializers.CharField(required=False, allow_blank=True, allow_null=True)
    status = serializers.ChoiceField(choices=RUN_STATUS_FILTER, required=False, allow_blank=True, allow_null=True)
    since = serializers.CharField(
        required=False, allow_blank=True, allow_null=True, help_text="As the run list's `since`."
    )
    until = serializers.CharField(
        required=False, allow_blank=True, allow_null=True, help_text="As the run list's `until`; after since."
    )
    payload = serializers.JSONField(
        required=False, allow_null=True, help_text="A JSON object (or its text): runs whose payload contains it."
    )
    trace_ids = serializers.ListField(
        child=serializers.UUIDField(),
        required=False,
        allow_null=True,
        allow_empty=False,
        max_length=selectors.TRACE_IDS_MAX,
        help_text="Runs by id.",
    )

    class Meta:
        ref_name = "BulkRunsInput"


class BulkOutputSerializer(serializers.Serializer):
    matched = serializers.IntegerField(help_text="Runs the filter matched when the call began.")
    changed = serializers.IntegerField(help_text="Runs it canceled (or restarted); the others were left as they were.")

    class Meta:
        ref_name = "BulkRunsResult"


NAME_THE_RUNS = "name the runs: trace_ids, or a filter (workflow, status, since, until, payload)"


class RunsCancelBulkApi(APIView):
    """Cancel every run a filter matches, or those named."""

    permission_classes = [require("workflows_app.change_workflowrun")]
    action = "cancel"

    @extend_schema(
        summary="Cancel many runs",
        operation_id="runs_bulk_cancel",
        description=(
            "The run list's filters (`workflow`, `status`, `since`, `until`, `payload`) and/or `trace_ids`; at least "
            "one, since an empty filter would match every run. Runs are changed one by one, each in its own short "
            "transaction, read in batches; runs created after the call began are left alone. A run already final "
            "counts as matched, not changed: the same call again changes 0."
        ),
        request=BulkInputSerializer,
        responses={200: BulkOutputSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request) -> Response:
        filters = _run_filters(request.data, trace_ids=True)
        if filters.is_empty():
            raise ValidationError(
                {
                    "non_field_errors": [
                        "name the runs: trace_ids, or a filter (workflow, status, since, until, payload)"
                    ]
                }
            )
        service = bulk.workflow_runs_cancel if self.action == "cancel" else bulk.workflow_runs_retry
        return Response(service(filters=filters).as_dict())


class RunsRetryBulkApi(RunsCancelBulkApi):
    """Retry every failed or canceled run a filter matches, or those named."""

    action = "retry"

    @extend_schema(
        summary="Retry many runs",
        operation_id="runs_bulk_retry",
        description=(
            "As bulk cancel, for failed and canceled runs: their failed, upstream-failed and revoked tasks run again. "
            "A run that is not failed or canceled counts as matched, not changed."
        ),
        request=BulkInputSerializer,
        responses={200: BulkOutputSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request) -> Response:
        return super().post(request)


class RunDetailApi(APIView):
    @extend_schema(
        summary="Get a run with its tasks",
        description=(
            "`tasks` holds every node's row (`map_index` null) and, for a mapped node, one row per instance "
            "after it, by `map_index`; nodes in the order the definition lists them."
        ),
        responses={200: RunDetailOutputSerializer, **errors(*READ)},
    )
    def get(self, request: Request, trace_id: str) -> Response:
        return Response(RunDetailOutputSerializer(_run_or_404(trace_id), context={"request": request}).data)


class EventOutputSerializer(ModelOutputSerializer):
    class Meta:
        model = Event
        fields = [
            "event_id",
            "trace_id",
            "event_type",
            "task_name",
            "payload",
            "result",
            "context",
            "status",
            "timestamp",
        ]


class RunEventsApi(APIView):
    @extend_schema(
        summary="List a run's events",
        operation_id="runs_events_list",
        description="The published event that started the run comes first (when one did), then every attempt's.",
        parameters=[PAGE],
        responses={200: paginated("PaginatedEventList", EventOutputSerializer(many=True)), **errors(*READ)},
    )
    def get(self, request: Request, trace_id: str) -> Response:
        _run_or_404(trace_id)
        paginator = PagePagination()
        page = paginator.paginate_queryset(selectors.run_events(trace_id=trace_id), request, view=self)
        return paginator.get_paginated_response(EventOutputSerializer(page, many=True).data)


class RunCancelApi(APIView):
    permission_classes = [require("workflows_app.change_workflowrun")]

    @extend_schema(
        summary="Cancel a run",
        description="Every unfinished task ends REVOKED. Cancelling a finished run changes nothing.",
        request=None,
        responses={200: RunOutputSerializer, **errors(401, 403, 404)},
    )
    def post(self, request: Request, trace_id: str) -> Response:
        _run_or_404(trace_id)
        run = engine.workflow_run_cancel(trace_id=trace_id)
        return Response(RunOutputSerializer(run, context={"request": request}).data)


class RunRetryApi(APIView):
    permission_classes = [require("workflows_app.change_workflowrun")]

    @extend_schema(
        summary="Retry a failed or canceled run",
        description="Failed, upstream-failed and revoked tasks run again; successes and their results stay.",
        request=None,
        responses={200: RunOutputSerializer, **errors(401, 403, 404, 409)},
    )
    def post(self, request: Request, trace_id: str) -> Response:
        _run_or_404(trace_id)
        run = engine.workflow_run_retry(trace_id=trace_id)
        return Response(RunOutputSerializer(run, context={"request": request}).data)


class NodeDecideApi(APIView):
    """Approve or reject a run's waiting approval node."""

    permission_classes = [require("workflows_app.approve_workflowrun")]
    approve = True

    class InputSerializer(serializers.Serializer):
        comment = StrictCharField(required=False, allow_blank=True, default="", max_length=2000)

        class Meta:
            ref_name = "DecisionInput"

    @extend_schema(
        summary="Approve or reject a waiting approval",
        description=(
            "Approve: the node ends SUCCESS with {approved, by, comment, at}. Reject: it ends FAILURE with the "
            "user and the comment in its error. A node that is not a waiting approval answers 409."
        ),
        request=InputSerializer,
        responses={200: RunOutputSerializer, **errors(400, 401, 403, 404, 409, 413)},
    )
    def post(self, request: Request, trace_id: str, key: str) -> Response:
        _run_or_404(trace_id)
        serializer = self.InputSerializer(data=_reject_unknown(request.data, {"comment"}))
        serializer.is_valid(raise_exception=True)
        engine.task_run_decide(
            trace_id=str(trace_id),
            node=key,
            approve=self.approve,
            user=request.user,
            comment=serializer.validated_data["comment"],
        )
        run = _run_or_404(trace_id)
        return Response(RunOutputSerializer(run, context={"request": request}).data)


class NodeRejectApi(NodeDecideApi):
    approve = False


# --------------------------------------------------------------------------- events and event types


class ResumedSerializer(serializers.Serializer):
    trace_id = serializers.UUIDField()
    node = serializers.CharField()


class EventPublishApi(APIView):
    permission_classes = [require("workflows_app.add_workflowrun")]
    throttle_classes = [ScopedWindowThrottle]
    throttle_scope = "trigger"

    class InputSerializer(serializers.Serializer):
        event_type = StrictRegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
        payload = PayloadField(required=False, default=dict, help_text="Any JSON object.")
        key = StrictCharField(
            required=False,
            allow_null=True,
            max_length=200,
            help_text="Resumes the wait_event nodes waiting for this event type with this key.",
        )

        class Meta:
            ref_name = "EventPublishInput"

    class OutputSerializer(serializers.Serializer):
        event_id = serializers.UUIDField(help_text="The stored event.")
        trace_ids = serializers.ListField(
            child=serializers.UUIDField(), help_text="The runs it started, by workflow name; empty when none listens."
        )
        resumed = ResumedSerializer(many=True, help_text="The waiting nodes it resumed.")

        class Meta:
            ref_name = "Published"

    @extend_schema(
        summary="Publish an event",
        description=(
            "Stores the event and starts every active workflow whose trigger_event_types contains its type. "
            "The same Idempotency-Key for the same event type returns the first answer with 200 and writes nothing."
        ),
        request=InputSerializer,
        parameters=[IDEMPOTENCY_KEY],
        examples=[PUBLISH_EXAMPLE],
        responses={
            201: OpenApiResponse(OutputSerializer, description="Stored; the subscribed workflows started."),
            200: OpenApiResponse(OutputSerializer, description="The event this Idempotency-Key already published."),
            **errors(*WRITE, 429),
        },
    )
    def post(self, request: Request) -> Response:
        body = _reject_unknown(request.data, {"event_type", "payload", "key"})
        serializer = self.InputSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        event, runs, created = engine.event_publish(
            event_type=serializer.validated_data["event_type"],
            payload=serializer.validated_data["payload"],
            user=request.user,
            idempotency_key=_idempotency_key(request),
            key=serializer.validated_data.get("key"),
        )
        body = {
            "event_id": str(event.event_id),
            "trace_ids": [str(r.trace_id) for r in runs],
            "resumed": getattr(event, "resumed", []),  # an event published before resumed then
        }
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class EventTypeOutputSerializer(ModelOutputSerializer):
    running = serializers.IntegerField(read_only=True, help_text="Tasks holding a slot: sent and not finished.")
    queued = serializers.IntegerField(read_only=True, help_text="Ready tasks waiting for a slot.")
    oldest_queued_at = serializers.DateTimeField(read_only=True, allow_null=True)
    oldest_wait_seconds = serializers.SerializerMethodField()
    rate_window = serializers.SerializerMethodField(
        help_text="With a rate limit: dispatches its current window counts, and when its next slot opens if full."
    )
    next = serializers.SerializerMethodField(
        help_text=(
            "The next tasks admission hands out, in order, each with its place and why it still waits: `reason` is "
            "`key_share` (its fairness key runs its share), `concurrency` (every slot taken), `rate_window` (the "
            "window is full until `rate_window.next_slot_at`) or `place` (others go first)."
        )
    )

    class Meta:
        model = EventType
        fields = [
            "name",
            "concurrency",
            "rate_limit",
            "fairness_key",
            "per_key_concurrency",
            "queue_timeout",
            "description",
            "running",
            "queued",
            "oldest_queued_at",
            "oldest_wait_seconds",
            "rate_window",
            "next",
        ]

    def _admission(self, event_type: EventType) -> dict:
        # The list view reads every type's at once (`admission` in the context); a single type, its own.
        known = self.context.get("admission") or {}
        if event_type.name not in known:
            known.update(selectors.event_types_admission([event_type]))
        return known[event_type.name]

    def get_oldest_wait_seconds(self, event_type: EventType) -> float | None:
        oldest = getattr(event_type, "oldest_queued_at", None)
        return round((timezone.now() - oldest).total_seconds(), 3) if oldest else None

    @extend_schema_field(
        {
            "type": "object",
            "nullable": True,
            "properties": {
                "used": {"type": "integer"},
                "limit": {"type": "integer"},
                "next_slot_at": {"type": "string", "format": "date-time", "nullable": True},
            },
        }
    )
    def get_rate_window(self, event_type: EventType) -> dict | None:
        return self._admission(event_type)["rate_window"]

    @extend_schema_field(
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "trace_id": {"type": "string", "format": "uuid"},
                    "node": {"type": "string"},
                    "map_index": {"type": "integer", "nullable": True},
                    "key": {"type": "string"},
                    "priority": {"type": "integer"},
                    "place": {"type": "integer"},
                    "reason": {"type": "string", "enum": ["key_share", "concurrency", "rate_window", "place"]},
                    "why": {"type": "string"},
                },
            },
        }
    )
    def get_next(self, event_type: EventType) -> list[dict]:
        return self._admission(event_type)["next"]


class EventTypeListApi(APIView):
    @extend_schema(
        summary="List event types with their queues",
        operation_id="event_types_list",
        parameters=[PAGE],
        responses={200: paginated("PaginatedEventTypeList", EventTypeOutputSerializer(many=True)), **errors(*READ)},
    )
    def get(self, request: Request) -> Response:
        paginator = PagePagination()
        page = paginator.paginate_queryset(selectors.event_type_queue_list(), request, view=self)
        admission = selectors.event_types_admission(list(page))
        data = EventTypeOutputSerializer(page, many=True, context={"admission": admission}).data
        return paginator.get_paginated_response(data)


class EventTypeDetailApi(APIView):
    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "PATCH":
            return [require("events_app.change_eventtype")()]
        return [IsAuthenticated()]

    class InputSerializer(serializers.Serializer):
        concurrency = StrictIntegerField(min_value=1, max_value=100000)
        rate_limit = serializers.RegexField(
            f"{rules.RATE_PATTERN}|^$",
            allow_null=True,
            allow_blank=True,
            help_text='"N/second", "N/minute" or "N/hour"; null or "" for none.',
        )
        fairness_key = serializers.CharField(
            allow_null=True, allow_blank=True, help_text='A CEL expression on the run; null or "" for none.'
        )
        per_key_concurrency = StrictIntegerField(min_value=1, max_value=100000, allow_null=True)
        queue_timeout = StrictIntegerField(
            min_value=1, max_value=30 * 86400, allow_null=True, help_text="Seconds, or null."
        )

        class Meta:
            ref_name = "EventTypeInput"

    def _get(self, name: str) -> EventType:
        event_type = selectors.event_type_queue_list().filter(name=name).first() if _storable(name) else None
        if event_type is None:
            raise Http404(f"event type '{name}' not found")
        return event_type

    @extend_schema(summary="Get an event type", responses={200: EventTypeOutputSerializer, **errors(*READ)})
    def get(self, request: Request, name: str) -> Response:
        return Response(EventTypeOutputSerializer(self._get(name)).data)

    @extend_schema(
        summary="Change an event type's admission settings, live",
        description=(
            "Any of concurrency, rate_limit, fairness_key, per_key_concurrency and queue_timeout. Raising a limit "
            "sends waiting tasks at once; lowering it lets running tasks finish. A wrong field is a 400 naming it, "
            "and nothing changes."
        ),
        request=InputSerializer,
        responses={200: EventTypeOutputSerializer, **errors(*WRITE, 404)},
    )
    def patch(self, request: Request, name: str) -> Response:
        self._get(name)
        # A partial update, as PATCH means: an empty body changes nothing and answers the type as it is.
        body = _reject_unknown(request.data, set(engine.ADMISSION_FIELDS))
        clean, wrong = engine.event_type_settings_check(body)
        if wrong:
            raise ValidationError({field: [error] for field, error in wrong.items()})
        if clean:
            engine.event_type_update(name=name, **clean)
        return Response(EventTypeOutputSerializer(self._get(name)).data)


# --------------------------------------------------------------------------- Celery results


class TaskResultOutputSerializer(ModelOutputSerializer):
    result = serializers.SerializerMethodField(help_text="The task's return value, or the exception for a failure.")

    class Meta:
        model = TaskResult
        fields = ["task_id", "task_name", "status", "result", "traceback", "worker", "date_created", "date_done"]

    def get_result(self, row: TaskResult) -> Any:
        try:
            return json.loads(row.result) if row.result else None
        except ValueError:
            return row.result


class TaskResultApi(APIView):
    @extend_schema(
        summary="Get the Celery result of one attempt",
        description=(
            "The result django-celery-results stored for a Celery task id. Every attempt's Event id is its task "
            "id: see `event_id` on a run's tasks and on its events. Results expire after CELERY_RESULT_EXPIRES."
        ),
        responses={200: TaskResultOutputSerializer, **errors(*READ)},
    )
    def get(self, request: Request, task_id: str) -> Response:
        row = TaskResult.objects.filter(task_id=str(task_id)).first()
        if row is None:
            raise Http404(f"no stored result for task '{task_id}'")
        return Response(TaskResultOutputSerializer(row).data)
