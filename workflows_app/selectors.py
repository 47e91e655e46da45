"""Reads for the API and the pages, each with the prefetching it needs and a constant query count."""

from __future__ import annotations

from django.db.models import (
    Case,
    Count,
    F,
    Func,
    IntegerField,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    When,
)

from events_app.models import Event, EventType

from .models import Edge, Node, TaskRun, WorkflowDefinition, WorkflowRun, WorkflowVersion


def workflow_list() -> QuerySet[WorkflowDefinition]:
    return WorkflowDefinition.objects.order_by("name")


def workflow_get(*, name: str) -> WorkflowDefinition | None:
    return WorkflowDefinition.objects.filter(name=name).first()


def run_list(*, workflow: str | None = None, status: str | None = None) -> QuerySet[WorkflowRun]:
    runs = WorkflowRun.objects.select_related("workflow").order_by("-created_at", "trace_id")
    if workflow:
        runs = runs.filter(workflow__name=workflow)
    if status:
        runs = runs.filter(status=status.upper())
    return runs


def run_get(*, trace_id: str) -> WorkflowRun | None:
    """The run with its tasks (ordered as the definition lists its nodes) prefetched."""
    return (
        WorkflowRun.objects.select_related("workflow", "version")
        .prefetch_related("tasks")
        .filter(trace_id=trace_id)
        .first()
    )


def run_tasks(*, run: WorkflowRun) -> list[TaskRun]:
    return list(run.tasks.all())


def run_events(*, trace_id: str) -> QuerySet[Event]:
    return Event.objects.filter(trace_id=trace_id).order_by("timestamp", "event_id")


def run_status_counts(*, workflow: str | None = None) -> dict[str, int]:
    """Runs per status (every status present, zeros included) for the run list's workflow filter; one query."""
    runs = WorkflowRun.objects.all()
    if workflow:
        runs = runs.filter(workflow__name=workflow)
    return runs.aggregate(
        **{status: Count("trace_id", filter=Q(status=status)) for status in WorkflowRun.Status.values}
    )


def _line_position() -> Case:
    """1-based place of a waiting task in its event type's FIFO line, NULL for tasks not waiting.

    Counts the tasks ahead of it in the order admission uses (queued_at, id); the partial index
    on that line makes each count a short index range scan.
    """
    ahead = (
        TaskRun.objects.filter(
            event_type_id=OuterRef("event_type_id"),
            status=TaskRun.Status.QUEUED,
            holds_slot=False,
        )
        .filter(Q(queued_at__lt=OuterRef("queued_at")) | Q(queued_at=OuterRef("queued_at"), id__lt=OuterRef("id")))
        .order_by()
        # COUNT as a plain function keeps GROUP BY out of the subquery, so no match still gives 0.
        .annotate(n=Func(F("id"), function="COUNT"))
        .values("n")
    )
    return Case(
        When(
            status=TaskRun.Status.QUEUED,
            holds_slot=False,
            then=Subquery(ahead, output_field=IntegerField()) + 1,
        ),
        default=None,
        output_field=IntegerField(),
    )


def run_page_get(*, trace_id: str) -> WorkflowRun | None:
    """The run with its version's spec, and its tasks (definition order) each annotated `line_position`."""
    tasks = TaskRun.objects.order_by("id").annotate(line_position=_line_position())
    return (
        WorkflowRun.objects.select_related("workflow", "version")
        .prefetch_related(Prefetch("tasks", queryset=tasks))
        .filter(trace_id=trace_id)
        .first()
    )


def workflow_page_get(*, name: str) -> WorkflowDefinition | None:
    """The definition with its nodes (and their event types), edges, and versions with their run counts."""
    return (
        WorkflowDefinition.objects.filter(name=name)
        .prefetch_related(
            Prefetch("nodes", queryset=Node.objects.select_related("event_type").order_by("id")),
            Prefetch("edges", queryset=Edge.objects.order_by("id")),
            Prefetch(
                "versions",
                queryset=WorkflowVersion.objects.defer("spec").annotate(run_count=Count("runs")).order_by("-version"),
            ),
        )
        .first()
    )


def workflow_recent_runs(*, workflow: WorkflowDefinition, limit: int = 20) -> list[WorkflowRun]:
    return list(WorkflowRun.objects.filter(workflow=workflow).order_by("-created_at", "trace_id")[:limit])


def event_type_queue_list() -> QuerySet[EventType]:
    """Every event type with `running`, `queued` and `oldest_queued_at`, in one query.

    Correlated subqueries rather than a join over all task rows: each one reads only the partial
    index of occupied slots or of the waiting line, so finished history does not slow the page.
    """
    slots = TaskRun.objects.filter(event_type_id=OuterRef("name"), holds_slot=True).order_by()
    line = TaskRun.objects.filter(event_type_id=OuterRef("name"), status=TaskRun.Status.QUEUED, holds_slot=False)
    return EventType.objects.order_by("name").annotate(
        running=Subquery(slots.annotate(n=Func(F("id"), function="COUNT")).values("n"), output_field=IntegerField()),
        queued=Subquery(
            line.order_by().annotate(n=Func(F("id"), function="COUNT")).values("n"), output_field=IntegerField()
        ),
        oldest_queued_at=Subquery(line.order_by("queued_at", "id").values("queued_at")[:1]),
    )
