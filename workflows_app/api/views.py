"""API views: one per operation, each a thin interface over the engine, definitions and selectors."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import Http404
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.decorators import api_view
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse as api_reverse
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from events_app.models import Event, EventType
from workflows_app import engine, selectors
from workflows_app.definitions import definition_export, workflow_definition_save
from workflows_app.models import TaskRun, WorkflowDefinition, WorkflowRun

from .errors import PayloadTooLarge


def require(perm: str) -> type[BasePermission]:
    """A permission class asking for one Django model permission, e.g. 'workflows_app.add_workflowrun'."""

    class HasPerm(BasePermission):
        message = f"You need the '{perm}' permission."

        def has_permission(self, request: Request, view: Any) -> bool:
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


def _check_payload(payload: Any) -> dict:
    if not isinstance(payload, dict):
        raise ValidationError({"payload": ["must be a JSON object"]})
    limit = settings.EVENTFLOW["MAX_PAYLOAD_BYTES"]
    if len(json.dumps(payload)) > limit:
        raise PayloadTooLarge(f"payload is larger than {limit} bytes")
    return payload


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
    names = ("workflow-list", "run-list", "event-type-list", "event-publish", "schema")
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

    @extend_schema(responses=WorkflowOutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        from rest_framework.settings import api_settings

        paginator = api_settings.DEFAULT_PAGINATION_CLASS()
        page = paginator.paginate_queryset(selectors.workflow_list(), request, view=self)
        return paginator.get_paginated_response(WorkflowOutputSerializer(page, many=True).data)

    @extend_schema(request=WorkflowOutputSerializer, responses={201: WorkflowOutputSerializer})
    def post(self, request: Request) -> Response:
        data = request.data
        if isinstance(data, dict) and WorkflowDefinition.objects.filter(name=data.get("name")).exists():
            return Response(
                {"detail": f"workflow '{data['name']}' already exists; PATCH it to change it"},
                status=status.HTTP_409_CONFLICT,
            )
        workflow = workflow_definition_save(data=data)
        return Response(WorkflowOutputSerializer(workflow).data, status=status.HTTP_201_CREATED)


class WorkflowDetailApi(APIView):
    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "PATCH":
            return [require("workflows_app.change_workflowdefinition")()]
        return [IsAuthenticated()]

    @extend_schema(responses=WorkflowOutputSerializer)
    def get(self, request: Request, name: str) -> Response:
        return Response(WorkflowOutputSerializer(_workflow_or_404(name)).data)

    @extend_schema(request=WorkflowOutputSerializer, responses=WorkflowOutputSerializer)
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


class TaskRunOutputSerializer(serializers.ModelSerializer):
    node = serializers.CharField(source="node_key")
    event_type = serializers.CharField(source="event_type_id")

    class Meta:
        model = TaskRun
        fields = [
            "node",
            "event_type",
            "task_name",
            "status",
            "attempts",
            "queued_at",
            "started_at",
            "finished_at",
            "result",
            "error",
        ]


class RunOutputSerializer(serializers.ModelSerializer):
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
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "trigger"

    class InputSerializer(serializers.Serializer):
        payload = serializers.JSONField(required=False, default=dict)

        class Meta:
            ref_name = "RunTriggerInput"

    @extend_schema(
        request=InputSerializer,
        parameters=[OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER, required=False)],
        responses={
            201: RunOutputSerializer,
            200: RunOutputSerializer,
            400: inline_serializer("Error", {"detail": serializers.CharField()}),
            404: inline_serializer("NotFound", {"detail": serializers.CharField()}),
            409: inline_serializer("Conflict", {"detail": serializers.CharField()}),
            413: inline_serializer("TooLarge", {"detail": serializers.CharField()}),
        },
    )
    def post(self, request: Request, name: str) -> Response:
        workflow = _workflow_or_404(name)
        body = _reject_unknown(request.data, {"payload"})
        payload = _check_payload(body.get("payload", {}))
        key = request.headers.get("Idempotency-Key") or None
        if key is not None and len(key) > 200:
            raise ValidationError({"Idempotency-Key": ["at most 200 characters"]})
        run, created = engine.workflow_run_start(
            workflow=workflow, payload=payload, idempotency_key=key, user=request.user, source="api"
        )
        return Response(
            RunOutputSerializer(run, context={"request": request}).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


class RunListApi(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("workflow", str, required=False),
            OpenApiParameter("status", str, required=False, enum=WorkflowRun.Status.values),
        ],
        responses=RunOutputSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        from rest_framework.settings import api_settings

        wanted = request.query_params.get("status")
        if wanted and wanted.upper() not in WorkflowRun.Status.values:
            raise ValidationError({"status": [f"one of {', '.join(WorkflowRun.Status.values)}"]})
        runs = selectors.run_list(workflow=request.query_params.get("workflow"), status=wanted)
        paginator = api_settings.DEFAULT_PAGINATION_CLASS()
        page = paginator.paginate_queryset(runs, request, view=self)
        return paginator.get_paginated_response(RunOutputSerializer(page, many=True, context={"request": request}).data)


class RunDetailApi(APIView):
    @extend_schema(responses=RunDetailOutputSerializer)
    def get(self, request: Request, trace_id: str) -> Response:
        return Response(RunDetailOutputSerializer(_run_or_404(trace_id), context={"request": request}).data)


class EventOutputSerializer(serializers.ModelSerializer):
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
    @extend_schema(responses=EventOutputSerializer(many=True))
    def get(self, request: Request, trace_id: str) -> Response:
        from rest_framework.settings import api_settings

        _run_or_404(trace_id)
        paginator = api_settings.DEFAULT_PAGINATION_CLASS()
        page = paginator.paginate_queryset(selectors.run_events(trace_id=trace_id), request, view=self)
        return paginator.get_paginated_response(EventOutputSerializer(page, many=True).data)


class RunCancelApi(APIView):
    permission_classes = [require("workflows_app.change_workflowrun")]

    @extend_schema(request=None, responses=RunOutputSerializer)
    def post(self, request: Request, trace_id: str) -> Response:
        _run_or_404(trace_id)
        run = engine.workflow_run_cancel(trace_id=trace_id)
        return Response(RunOutputSerializer(run, context={"request": request}).data)


class RunRetryApi(APIView):
    permission_classes = [require("workflows_app.change_workflowrun")]

    @extend_schema(request=None, responses=RunOutputSerializer)
    def post(self, request: Request, trace_id: str) -> Response:
        _run_or_404(trace_id)
        run = engine.workflow_run_retry(trace_id=trace_id)
        return Response(RunOutputSerializer(run, context={"request": request}).data)


# --------------------------------------------------------------------------- events and event types


class EventPublishApi(APIView):
    permission_classes = [require("workflows_app.add_workflowrun")]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "trigger"

    class InputSerializer(serializers.Serializer):
        event_type = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
        payload = serializers.JSONField(required=False, default=dict)

        class Meta:
            ref_name = "EventPublishInput"

    @extend_schema(
        request=InputSerializer,
        responses={
            201: inline_serializer(
                "Published", {"event_id": serializers.UUIDField(), "trace_ids": serializers.ListField()}
            )
        },
    )
    def post(self, request: Request) -> Response:
        body = _reject_unknown(request.data, {"event_type", "payload"})
        serializer = self.InputSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        payload = _check_payload(serializer.validated_data["payload"])
        event, runs = engine.event_publish(
            event_type=serializer.validated_data["event_type"], payload=payload, user=request.user
        )
        return Response(
            {"event_id": str(event.event_id), "trace_ids": [str(r.trace_id) for r in runs]},
            status=status.HTTP_201_CREATED,
        )


class EventTypeOutputSerializer(serializers.ModelSerializer):
    running = serializers.IntegerField(read_only=True, help_text="Tasks holding a slot: sent and not finished.")
    queued = serializers.IntegerField(read_only=True, help_text="Ready tasks waiting for a slot.")
    oldest_queued_at = serializers.DateTimeField(read_only=True, allow_null=True)
    oldest_wait_seconds = serializers.SerializerMethodField()

    class Meta:
        model = EventType
        fields = ["name", "concurrency", "description", "running", "queued", "oldest_queued_at", "oldest_wait_seconds"]

    def get_oldest_wait_seconds(self, event_type: EventType) -> float | None:
        oldest = getattr(event_type, "oldest_queued_at", None)
        return round((timezone.now() - oldest).total_seconds(), 3) if oldest else None


class EventTypeListApi(APIView):
    @extend_schema(responses=EventTypeOutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        from rest_framework.settings import api_settings

        paginator = api_settings.DEFAULT_PAGINATION_CLASS()
        page = paginator.paginate_queryset(selectors.event_type_queue_list(), request, view=self)
        return paginator.get_paginated_response(EventTypeOutputSerializer(page, many=True).data)


class EventTypeDetailApi(APIView):
    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "PATCH":
            return [require("events_app.change_eventtype")()]
        return [IsAuthenticated()]

    class InputSerializer(serializers.Serializer):
        concurrency = serializers.IntegerField(min_value=1, max_value=100000)

        class Meta:
            ref_name = "EventTypeInput"

    def _get(self, name: str) -> EventType:
        event_type = selectors.event_type_queue_list().filter(name=name).first()
        if event_type is None:
            raise Http404(f"event type '{name}' not found")
        return event_type

    @extend_schema(responses=EventTypeOutputSerializer)
    def get(self, request: Request, name: str) -> Response:
        return Response(EventTypeOutputSerializer(self._get(name)).data)

    @extend_schema(request=InputSerializer, responses=EventTypeOutputSerializer)
    def patch(self, request: Request, name: str) -> Response:
        self._get(name)
        serializer = self.InputSerializer(data=_reject_unknown(request.data, {"concurrency"}))
        serializer.is_valid(raise_exception=True)
        engine.event_type_set_concurrency(name=name, concurrency=serializer.validated_data["concurrency"])
        return Response(EventTypeOutputSerializer(self._get(name)).data)
