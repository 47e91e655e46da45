"""Reads for the API and the pages, each with the prefetching it needs and a constant query count."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connections
from django.db.models import (
    BooleanField,
    Case,
    Count,
    F,
    Func,
    IntegerField,
    Min,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
    When,
    Window,
)
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from events_app.models import Event, EventType, EventTypeKey

from . import pgsql
from .engine import graph_for_version, rules
from .models import Edge, Node, TaskRun, Worker, WorkflowDefinition, WorkflowRun, WorkflowVersion


def workflow_list() -> QuerySet[WorkflowDefinition]:
    return WorkflowDefinition.objects.order_by("name")


WORKFLOW_BY_NAME = (
    f"SELECT {pgsql.columns(WorkflowDefinition)} FROM {WorkflowDefinition._meta.db_table} WHERE name = %s"
)


def workflow_get(*, name: str) -> WorkflowDefinition | None:
    # Every trigger reads it: a prepared statement, not the ORM's query built anew.
    found = pgsql.fetch_rows(WORKFLOW_BY_NAME, [name], WorkflowDefinition)
    return found[0][0] if found else None


# --------------------------------------------------------------------------- run filters

RELATIVE_SINCE = re.compile(r"^(\d{1,4})([mhd])$")
RELATIVE_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
# A payload filter is a small JSON object: anything longer is not a search an operator types.
PAYLOAD_FILTER_MAX_CHARS = 2000
PAYLOAD_FILTER_MAX_DEPTH = 8
# The most runs one bulk call may name by trace id.
TRACE_IDS_MAX = 10_000


def moment_parse(text: str, *, end: bool = False, now: datetime | None = None) -> datetime | None:
    """A time filter: ISO date or date-time (UTC when naive), or a span back from now such as 15m, 24h, 7d.

    A bare date given as an end (`end=True`) means the end of that day. None for anything else.
    """
    text = (text or "").strip()
    if not text:
        return None
    relative = RELATIVE_SINCE.match(text)
    if relative:
        amount, unit = relative.groups()
        return (now or timezone.now()) - timedelta(**{RELATIVE_UNITS[unit]: int(amount)})
    try:
        # A bare date first: parse_datetime would read it as midnight, losing "end of that day".
        day = parse_date(text) if len(text) == 10 else None
        moment = parse_datetime(text) if day is None else None
    except ValueError:
        return None
    if day is not None:
        moment = datetime(day.year, day.month, day.day) + (timedelta(days=1) if end else timedelta())
    if moment is None:
        return None
    return timezone.make_aware(moment, timezone.get_current_timezone()) if timezone.is_naive(moment) else moment


class FilterError(ValueError):
    """A run filter that cannot be applied: `errors` maps each wrong field to why."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class RunFilter:
    """The run list's filters, as the API, the run list page and the bulk actions all read them."""

    workflow: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    payload: dict | None = None
    trace_ids: tuple[str, ...] | None = None
    # The text each was given as, for links and forms that carry the filter on.
    given: dict[str, str] = field(default_factory=dict, compare=False)

    def is_empty(self) -> bool:
        """True when it names no run and filters nothing: it would match every run."""
        return not (self.workflow or self.status or self.since or self.until or self.payload or self.trace_ids)


def _depth(value: Any, level: int = 1) -> int:
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _storable(text: str) -> bool:
    """PostgreSQL can hold it: no NUL character, no lone surrogate."""
    return not any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in text)


def _uuid_or_none(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def payload_filter_parse(value: Any) -> dict:
    """A payload filter: a JSON object, given as one or as its text. Raises ValueError saying what is wrong.

    Checked here rather than left to PostgreSQL: a NUL character or a lone surrogate is refused by jsonb with a
    database error, and deep nesting by Python's JSON parser with a RecursionError, neither a clear 400."""
    if isinstance(value, str):
        if len(value) > PAYLOAD_FILTER_MAX_CHARS:
            raise ValueError(f"at most {PAYLOAD_FILTER_MAX_CHARS} characters")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError('not JSON: give a JSON object such as {"sku": "A-1"}') from None
    if not isinstance(value, dict) or not value:
        raise ValueError('must be a non-empty JSON object, such as {"sku": "A-1"}')
    if _depth(value) > PAYLOAD_FILTER_MAX_DEPTH:
        raise ValueError(f"nested deeper than {PAYLOAD_FILTER_MAX_DEPTH} levels")
    try:
        # Python reads 1e400 as inf and NaN as nan, which JSON, hence jsonb, has no way to write.
        text = json.dumps(value, allow_nan=False)
    except ValueError:
        raise ValueError("numbers must be finite") from None
    if len(text) > PAYLOAD_FILTER_MAX_CHARS:
        raise ValueError(f"at most {PAYLOAD_FILTER_MAX_CHARS} characters")
    if not all(_storable(text) for text in _strings(value)):
        raise ValueError("must not contain NUL or lone surrogate characters")
    return value


def _strings(value: Any) -> list[str]:
    """Every key and string in a JSON value (JSON's own text escapes a NUL, so the text cannot be searched)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value, *(s for v in value.values() for s in _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def run_filter_parse(data: Mapping[str, Any], *, now: datetime | None = None) -> RunFilter:
    """The run filters in `data` (query parameters or a JSON body): `workflow`, `status`, `since`, `until`,
    `payload` and `trace_ids`. Raises FilterError naming every wrong field; nothing is guessed, since a
    filter read wrongly by a bulk action would act on the wrong runs."""
    errors: dict[str, str] = {}
    given: dict[str, str] = {}

    def text(name: str) -> str | None:
        value = data.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            errors[name] = "must be a string"
            return None
        if not _storable(value):
            errors[name] = "must not contain NUL or lone surrogate characters"
            return None
        given[name] = value.strip()
        return value.strip() or None

    workflow = text("workflow")
    status = text("status")
    if status is not None:
        status = status.upper()
        if status not in WorkflowRun.Status.values:
            errors["status"] = f"one of {', '.join(WorkflowRun.Status.values)}"
            status = None
    now = now or timezone.now()
    moments = {}
    for name, end in (("since", False), ("until", True)):
        raw = text(name)
        moments[name] = moment_parse(raw, end=end, now=now) if raw else None
        if raw and moments[name] is None:
            errors[name] = "not a date, a date and time (ISO 8601), or a span back from now such as 15m, 24h, 7d"
    if moments["since"] and moments["until"] and moments["since"] >= moments["until"]:
        errors["until"] = "must be after since"
    payload = None
    raw_payload = data.get("payload")
    if raw_payload not in (None, ""):
        try:
            payload = payload_filter_parse(raw_payload)
            given["payload"] = raw_payload if isinstance(raw_payload, str) else json.dumps(raw_payload)
        except ValueError as exc:
            errors["payload"] = str(exc)
    trace_ids = None
    raw_ids = data.get("trace_ids")
    if raw_ids is not None:
        if not isinstance(raw_ids, list) or not raw_ids:
            errors["trace_ids"] = "must be a non-empty list of trace ids"
        elif len(raw_ids) > TRACE_IDS_MAX:
            errors["trace_ids"] = f"at most {TRACE_IDS_MAX:,} trace ids in one call"
        else:
            parsed = [_uuid_or_none(t) for t in raw_ids]
            if None in parsed:
                errors["trace_ids"] = "every element must be a trace id (a UUID string)"
            else:
                trace_ids = tuple(dict.fromkeys(parsed))
    if errors:
        raise FilterError(errors)
    return RunFilter(
        workflow=workflow,
        status=status,
        since=moments["since"],
        until=moments["until"],
        payload=payload,
        trace_ids=trace_ids,
        given=given,
    )


def runs_matching(filters: RunFilter) -> QuerySet[WorkflowRun]:
    """Every run the filters match, unordered. The payload filter is JSON containment (`payload @> ...`), which
    the GIN index `run_payload_gin_idx` (jsonb_path_ops) answers, so finding one run by a payload value reads
    a few index entries, not the table."""
    runs = _runs_filtered(workflow=filters.workflow, since=filters.since, until=filters.until, payload=filters.payload)
    if filters.status:
        runs = runs.filter(status=filters.status)
    if filters.trace_ids:
        runs = runs.filter(trace_id__in=filters.trace_ids)
    return runs


def run_list(
    *,
    workflow: str | None = None,
    status: str | None = None,
    filters: RunFilter | None = None,
) -> QuerySet[WorkflowRun]:
    runs = runs_matching(filters or RunFilter(workflow=workflow, status=status.upper() if status else None))
    return runs.select_related("workflow").order_by("-created_at", "trace_id")


def run_match_batch(filters: RunFilter, *, before: tuple[datetime, str], limit: int) -> list[tuple[datetime, str, str]]:
    """The next `limit` runs the filters match, newest first, strictly older than the keyset `before`
    (created_at, trace_id): (created_at, trace_id, status) each. What a bulk action walks, a batch at a time,
    each batch a range scan that starts where the last one ended."""
    moment, trace_id = before
    runs = (
        runs_matching(filters)
        .filter(created_at__lte=moment)
        .exclude(created_at=moment, trace_id__lte=trace_id)
        .order_by("-created_at", "trace_id")
    )
    return [(c, str(t), s) for c, t, s in runs.values_list("created_at", "trace_id", "status")[:limit]]


def run_match_counts(filters: RunFilter) -> dict[str, int]:
    """How many runs the filters match, per status (every status, zeros included); one query. What a bulk
    action's confirmation shows before anything changes."""
    return runs_matching(filters).aggregate(
        **{status: Count("trace_id", filter=Q(status=status)) for status in WorkflowRun.Status.values}
    )


def _tasks_by_node() -> QuerySet[TaskRun]:
    """A run's task rows node by node, as the definition lists its nodes, each node's row before its
    instances (by map index). A node's row is created with the run, before any instance, so the lowest
    id among a node's rows places the node: one sort in the query, however many instances there are."""
    node_order = Window(Min("id"), partition_by=[F("run_id"), F("node_key")])
    return TaskRun.objects.annotate(node_order=node_order).order_by("node_order", F("map_index").asc(nulls_first=True))


def run_get(*, trace_id: str) -> WorkflowRun | None:
    """The run with its tasks prefetched: node rows and instance rows, node by node."""
    return (
        WorkflowRun.objects.select_related("workflow", "version")
        .prefetch_related(Prefetch("tasks", queryset=_tasks_by_node()))
        .filter(trace_id=trace_id)
        .first()
    )


def run_tasks(*, run: WorkflowRun) -> list[TaskRun]:
    return list(run.tasks.all())


def run_events(*, trace_id: str, instances: bool = True) -> QuerySet[Event]:
    """The run's events: the published event that started it first (when one did), then every attempt's.

    Without `instances`, the attempts of a mapped node's instances (their context has a `map_index`) are
    left out: the run page lists those in each node's detail, so its size does not follow a map's.

    The trigger event carries no trace_id (one event may start many runs), so it is found through
    the run's `trigger_event`; both halves are index lookups.
    """
    trigger = WorkflowRun.objects.filter(trace_id=trace_id).values("trigger_event_id")[:1]
    events = Event.objects.filter(Q(trace_id=trace_id) | Q(event_id=Subquery(trigger)))
    if not instances:
        events = events.filter(Q(context__map_index__isnull=True) | Q(context__map_index=None))
    return events.annotate(
        is_attempt=Case(When(trace_id=trace_id, then=1), default=0, output_field=IntegerField())
    ).order_by("is_attempt", "timestamp", "event_id")


def _runs_filtered(
    *,
    workflow: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    payload: dict | None = None,
) -> QuerySet[WorkflowRun]:
    runs = WorkflowRun.objects.all()
    if workflow:
        runs = runs.filter(workflow__name=workflow)
    if since:
        runs = runs.filter(created_at__gte=since)
    if until:
        runs = runs.filter(created_at__lt=until)
    if payload:
        runs = runs.filter(_payload_contains(payload))
    return runs


def _payload_contains(payload: dict) -> RawSQL:
    """`payload @> '<the filter>'`, what the GIN index (jsonb_path_ops) answers, with the filter written into the
    statement rather than bound as a parameter.

    Why: with a parameter, a statement run often on one connection is planned once for any value (a generic
    plan, see EVENTFLOW_PREPARED_STATEMENTS), and PostgreSQL then guesses that 1% of the runs match: it walks
    the created_at index and filters, reading all 100,000 rows to find one SKU (80 ms, bench/pages.py). Given
    the value, it knows one SKU is rare (GIN bitmap, 1 ms) and one shop common (the created_at index, which
    meets 50 matches at once). The text is dollar-quoted with a tag it does not contain, so nothing in it can
    end the literal; it holds no NUL (`payload_filter_parse`); `%` is doubled for the driver's placeholders.
    """
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).replace("%", "%%")
    tag = "$q$"
    while tag in text:
        tag = f"$q{uuid.uuid4().hex[:8]}$"
    column = f'"{WorkflowRun._meta.db_table}"."payload"'
    return RawSQL(f"{column} @> {tag}{text}{tag}::jsonb", (), output_field=BooleanField())


def run_status_counts(
    *,
    workflow: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    payload: dict | None = None,
    cap: int | None = None,
) -> dict[str, int]:
    """Runs per status (every status present, zeros included) for the run list's filters; one query.

    With `cap`, each status is counted up to `cap + 1` only: a count past `cap` means "more than
    cap". Each capped count is a LIMITed range scan of the (status, created_at) index, so the cost
    stops growing with the table, where an exact count has to visit every matching row.
    """
    runs = _runs_filtered(workflow=workflow, since=since, until=until, payload=payload)
    if cap is None:
        return runs.aggregate(
            **{status: Count("trace_id", filter=Q(status=status)) for status in WorkflowRun.Status.values}
        )
    parts, params = [], []
    for status in WorkflowRun.Status.values:
        sql, sql_params = runs.filter(status=status).order_by().values("pk")[: cap + 1].query.sql_with_params()
        parts.append(f"(SELECT COUNT(*) FROM ({sql}) AS capped)")
        params.extend(sql_params)
    with connections[runs.db].cursor() as cursor:
        cursor.execute("SELECT " + ", ".join(parts), params)
        row = cursor.fetchone()
    return dict(zip(WorkflowRun.Status.values, row, strict=True))


def run_page_list(
    *,
    workflow: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    payload: dict | None = None,
    older_than: tuple[datetime, str] | None = None,
    newer_than: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> tuple[list[WorkflowRun], bool]:
    """One page of runs, newest first, by keyset: (runs, more) where `more` says a further page exists.

    The cursor is a (created_at, trace_id) pair: `older_than` pages towards older runs, `newer_than`
    back towards newer ones (`more` then tells whether newer runs remain). Each page is a range scan of
    a created_at index, however deep it is, where OFFSET would read and drop every row before it.
    """
    runs = _runs_filtered(workflow=workflow, since=since, until=until, payload=payload).select_related("workflow")
    if status:
        runs = runs.filter(status=status)
    if newer_than is not None:
        moment, trace_id = newer_than
        runs = (
            runs.filter(created_at__gte=moment)
            .exclude(created_at=moment, trace_id__gte=trace_id)
            .order_by("created_at", "-trace_id")
        )
        page = list(runs[: limit + 1])
        return page[:limit][::-1], len(page) > limit
    if older_than is not None:
        moment, trace_id = older_than
        runs = runs.filter(created_at__lte=moment).exclude(created_at=moment, trace_id__lte=trace_id)
    page = list(runs.order_by("-created_at", "trace_id")[: limit + 1])
    return page[:limit], len(page) > limit


_TASK = TaskRun._meta.db_table
# Tasks ahead of a waiting one in its key's line (`rules.line_order`): those of a higher priority, then
# those of its own priority before it. Two range scans of the key's line index: the cost follows its
# place, not the line's length.
_AHEAD = f"""
CASE WHEN {_TASK}.status = 'QUEUED' AND NOT {_TASK}.holds_slot THEN 1
    + (SELECT count(*) FROM {_TASK} AS a
       WHERE a.event_type_id = {_TASK}.event_type_id AND a.fair_key = {_TASK}.fair_key AND a.status = 'QUEUED'
         AND NOT a.holds_slot AND a.priority > {_TASK}.priority)
    + (SELECT count(*) FROM {_TASK} AS a
       WHERE a.event_type_id = {_TASK}.event_type_id AND a.fair_key = {_TASK}.fair_key AND a.status = 'QUEUED'
         AND NOT a.holds_slot AND a.priority = {_TASK}.priority
         AND (a.run_created_at, a.queued_at, a.id) < ({_TASK}.run_created_at, {_TASK}.queued_at, {_TASK}.id))
END
"""


def _line_position() -> RawSQL:
    """1-based place of a waiting task in its key's line (its event type's, without a fairness key), in
    admission's order; NULL for tasks not waiting."""
    return RawSQL(_AHEAD, (), output_field=IntegerField())


def run_page_get(*, trace_id: str) -> WorkflowRun | None:
    """The run with its version's spec, and its nodes' own rows (definition order, no instance of a mapped
    node: `run_instance_counts` sums those up) each annotated `line_position`."""
    # Results are shown in a node's detail only; the run page never reads them.
    tasks = (
        TaskRun.objects.filter(map_index__isnull=True)
        .order_by("id")
        .defer("result")
        .annotate(line_position=_line_position())
    )
    return (
        WorkflowRun.objects.select_related("workflow", "version")
        .prefetch_related(Prefetch("tasks", queryset=tasks))
        .filter(trace_id=trace_id)
        .first()
    )


def run_instance_counts(*, trace_id: str, node: str | None = None) -> dict[str, dict[str, int]]:
    """For each mapped node of the run (or only `node`): its instances per status, and their attempts in
    all under the key "attempts"; one aggregate, whatever the number of instances."""
    rows = TaskRun.objects.filter(run_id=trace_id, map_index__isnull=False)
    if node is not None:
        rows = rows.filter(node_key=node)
    counts: dict[str, dict[str, int]] = {}
    for key, status, n, attempts in (
        rows.order_by().values_list("node_key", "status").annotate(n=Count("id"), tries=Sum("attempts"))
    ):
        per_node = counts.setdefault(key, {"attempts": 0})
        per_node[status] = n
        per_node["attempts"] += attempts or 0
    return counts


def node_instance_page(
    *, trace_id: str, node: str, status: str | None = None, offset: int = 0, limit: int = 50
) -> list[TaskRun]:
    """One page of a mapped node's instances by map index (only those in `status`, when given); a range
    scan of the (run, node, map_index) index."""
    rows = TaskRun.objects.filter(run_id=trace_id, node_key=node, map_index__isnull=False)
    if status:
        rows = rows.filter(status=status)
    return list(rows.defer("result").order_by("map_index")[offset : offset + limit])


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


def task_page_get(*, trace_id: str, node: str) -> TaskRun | None:
    """One task of a run, for its detail: with its run, the run's version spec, its event type and
    its latest Event, annotated `line_position`."""
    return (
        TaskRun.objects.select_related("run__workflow", "run__version", "event_type", "current_event")
        .annotate(line_position=_line_position())
        .filter(run_id=trace_id, node_key=node, map_index__isnull=True)
        .first()
    )


def approval_page_list() -> list[TaskRun]:
    """Every waiting approval, newest first (by when it was reached), with its run and workflow.

    One query, on the partial index of waiting nodes: an approval waits with no event type, as a delay
    does, and its run's version graph (parsed once per process and version) tells the two apart.
    """
    rows = (
        TaskRun.objects.filter(status=TaskRun.Status.DEFERRED, wait_type="", map_index__isnull=True)
        .select_related("run__workflow")
        .only(
            "node_key",
            "status",
            "queued_at",
            "due_at",
            "run__trace_id",
            "run__status",
            "run__created_at",
            "run__version_id",
            "run__workflow_version",
            "run__workflow__name",
        )
        .order_by("-queued_at", "-id")
    )
    return [
        row
        for row in rows
        if getattr(graph_for_version(row.run.version_id).nodes.get(row.node_key), "kind", "") == "approval"
    ]


def task_neighbour_statuses(*, trace_id: str, nodes: list[str]) -> dict[str, str]:
    """Status of each named task of the run (a node's predecessors and successors); one query."""
    if not nodes:
        return {}
    rows = TaskRun.objects.filter(run_id=trace_id, node_key__in=nodes, map_index__isnull=True)
    return dict(rows.values_list("node_key", "status"))


def node_events(*, trace_id: str, node: str) -> QuerySet[Event]:
    """Every attempt of one node, as its Events in the order they were sent; reads the trace_id index."""
    return Event.objects.filter(trace_id=trace_id, context__node=node).order_by("timestamp", "event_id")


def workflow_page_list() -> QuerySet[WorkflowDefinition]:
    """Every definition with its node count and its latest run (each a lookup on the run index)."""
    latest = WorkflowRun.objects.filter(workflow=OuterRef("pk")).order_by("-created_at", "trace_id")
    return WorkflowDefinition.objects.order_by("name").annotate(
        node_count=Subquery(
            Node.objects.filter(workflow=OuterRef("pk"))
            .order_by()
            .annotate(n=Func(F("id"), function="COUNT"))
            .values("n"),
            output_field=IntegerField(),
        ),
        last_run_id=Subquery(latest.values("trace_id")[:1]),
        last_run_status=Subquery(latest.values("status")[:1]),
        last_run_at=Subquery(latest.values("created_at")[:1]),
    )


def event_type_queue_page_list(*, since: datetime) -> QuerySet[EventType]:
    """The queue list plus `done_since` and `failed_since`: tasks of each type that finished after `since`.

    Both counts read the partial index of finished task runs by (event type, finished_at), so the
    cost follows the tasks in the window, not the whole task history.
    """
    done = TaskRun.objects.filter(
        event_type_id=OuterRef("name"),
        status__in=[TaskRun.Status.SUCCESS, TaskRun.Status.FAILURE],
        finished_at__gte=since,
    ).order_by()
    failed = done.filter(status=TaskRun.Status.FAILURE)
    return event_type_queue_list().annotate(
        done_since=Subquery(done.annotate(n=Func(F("id"), function="COUNT")).values("n"), output_field=IntegerField()),
        failed_since=Subquery(
            failed.annotate(n=Func(F("id"), function="COUNT")).values("n"), output_field=IntegerField()
        ),
    )


# --------------------------------------------------------------------------- admission


def _rate_state(event_type: EventType) -> tuple[rules.Rate | None, int, Any]:
    """The type's rate limit, the dispatches its current window counts, and when its next slot opens."""
    rate = rules.rate_parse(event_type.rate_limit)
    if rate is None:
        return None, 0, None
    log = rules.RateLog(tuple(event_type.rate_times or ()), tuple(event_type.rate_counts or ()))
    now = timezone.now()
    used = rules.rate_used(log, now, rate)
    return rate, used, rules.rate_opens(log, now, rate) if used >= rate.count else None


def event_types_admission(event_types: list[EventType], *, limit: int = 10) -> dict[str, dict[str, Any]]:
    """For each type: its limits, its rate window, and the next `limit` tasks admission will hand out,
    in order, each with why it still waits: what `rules.admit` does with the heads of the first `limit`
    keys that may be served. Two queries for all the types, each reading indexes only as far as it
    takes `limit` rows: the cost depends neither on the lines' lengths nor on the number of keys."""
    names = [t.name for t in event_types]
    keys: dict[str, list[tuple[str, int, int]]] = {name: [] for name in names}
    line: dict[str, list[rules.Waiting]] = {name: [] for name in names}
    rows: dict[int, tuple] = {}
    with connections["default"].cursor() as cursor:
        cursor.execute(
            f"""
            SELECT k.event_type_id, k.key, k.held, k.turn FROM unnest(%s::varchar[]) AS t(name)
            CROSS JOIN LATERAL (
                SELECT * FROM {EventTypeKey._meta.db_table} AS k
                WHERE k.event_type_id = t.name AND k.head_priority IS NOT NULL
                ORDER BY k.head_priority DESC, k.turn, k.key LIMIT %s
            ) AS k
            """,
            [names, limit],
        )
        for name, key, held, turn in cursor.fetchall():
            keys[name].append((key, held, turn))
        pairs = [(name, key) for name in names for key, _, _ in keys[name]]
        # Even with no key to read: the pages' query counts stay the same whatever they show.
        cursor.execute(
            f"""
            SELECT t.id, t.event_type_id, t.priority, t.run_created_at, t.queued_at, t.fair_key, t.run_id,
                t.node_key, t.map_index
            FROM unnest(%s::varchar[], %s::varchar[]) AS k(name, key) CROSS JOIN LATERAL (
                SELECT * FROM {_TASK} AS t
                WHERE t.event_type_id = k.name AND t.fair_key = k.key AND t.status = 'QUEUED' AND NOT t.holds_slot
                ORDER BY {", ".join("t." + c for c in rules.LINE_ORDER)} LIMIT %s
            ) AS t
            """,
            [[n for n, _ in pairs], [k for _, k in pairs], limit],
        )
        for id_, name, priority, run_created_at, queued_at, key, run_id, node, index in cursor.fetchall():
            line[name].append(rules.Waiting(priority, run_created_at, queued_at, id_, key))
            rows[id_] = (run_id, node, index)
    return {t.name: _admission(t, keys[t.name], line[t.name], rows, limit) for t in event_types}


def _admission(
    event_type: EventType, keys: list[tuple[str, int, int]], line: list[rules.Waiting], rows: dict, limit: int
) -> dict[str, Any]:
    rate, used, opens = _rate_state(event_type)
    states = {k: rules.KeyState(held, turn) for k, held, turn in keys}
    turn = max((t for _, _, t in keys), default=0)
    order = rules.admit(free=limit, line=line, keys=states, per_key=event_type.per_key_concurrency, turn=turn)
    held = getattr(event_type, "running", None)
    held = event_type.held if held is None else held
    waiting = []
    for place, task in enumerate(order, 1):
        run_id, node, index = rows[task.id]
        reason = rules.wait_reason(
            concurrency=event_type.concurrency,
            held=held,
            rate=rate,
            rate_used=used,
            rate_opens=opens,
            per_key=event_type.per_key_concurrency,
            key=task.key,
            key_held=states[task.key].held,
            place=place,
        )
        waiting.append(
            {
                "trace_id": str(run_id),
                "node": node,
                "map_index": index,
                "key": task.key,
                "priority": task.priority,
                "place": place,
                "reason": reason.code,
                "why": reason.text,
            }
        )
    return {
        "limits": {
            "concurrency": event_type.concurrency,
            "rate_limit": event_type.rate_limit,
            "fairness_key": event_type.fairness_key,
            "per_key_concurrency": event_type.per_key_concurrency,
            "queue_timeout": event_type.queue_timeout,
        },
        "rate_window": None if rate is None else {"used": used, "limit": rate.count, "next_slot_at": opens},
        "next": waiting,
    }


def task_wait_reason(task: TaskRun) -> rules.WaitReason | None:
    """Why a waiting task still waits (`rules.wait_reason`), for its node's detail; None unless it waits
    in a line. Its type's row comes with the task; its key's is one more query."""
    if task.status != TaskRun.Status.QUEUED or task.holds_slot or task.event_type is None:
        return None
    event_type = task.event_type
    rate, used, opens = _rate_state(event_type)
    key_held = (
        EventTypeKey.objects.filter(event_type=event_type, key=task.fair_key).values_list("held", flat=True).first()
    )
    return rules.wait_reason(
        concurrency=event_type.concurrency,
        held=event_type.held,
        rate=rate,
        rate_used=used,
        rate_opens=opens,
        per_key=event_type.per_key_concurrency,
        key=task.fair_key,
        key_held=key_held or 0,
        place=getattr(task, "line_position", None),
    )


# --------------------------------------------------------------------------- workers


def worker_page_list(*, seen_within: timedelta) -> list[Worker]:
    """Every worker heard from within `seen_within`, newest heartbeat first, each annotated `silent_for`
    (a timedelta since its last heartbeat, measured on the database's clock as `last_seen` was written,
    so no web server's clock decides whether a worker looks dead)."""
    return list(
        Worker.objects.annotate(silent_for=Now() - F("last_seen"))
        .filter(last_seen__gte=Now() - seen_within)
        .order_by("-last_seen", "name")
    )


def worker_running(*, names: list[str]) -> list[TaskRun]:
    """The attempts these workers run now, by the task rows that record it: started, holding a slot, and
    naming the worker. One query on the partial index of slot holders, whose size follows the cluster's
    concurrency, not the history."""
    if not names:
        return []
    return list(
        TaskRun.objects.filter(holds_slot=True, status=TaskRun.Status.STARTED, worker__in=names)
        .select_related("run__workflow")
        .defer("result", "run__payload")
        .order_by("started_at", "id")
    )


_EVENT = Event._meta.db_table
# Each attempt (an Event) with its task row now: whether that row still points at the attempt, or at a newer
# one (it was retried), and how it stands. The task is found by its run, node and instance (the unique index).
_ATTEMPT_FATES = f"""
SELECT e.event_id, e.trace_id, e.context->>'node', (e.context->>'attempt')::int, t.map_index, t.status,
    t.attempts, t.worker, t.current_event_id, t.error, t.lease_expires_at, t.finished_at
FROM {_EVENT} AS e
JOIN {_TASK} AS t ON t.run_id = e.trace_id AND t.node_key = e.context->>'node'
    AND t.map_index IS NOT DISTINCT FROM (e.context->>'map_index')::int
WHERE e.event_id = ANY(%s::uuid[])
ORDER BY e.timestamp, e.event_id
"""


@dataclass
class AttemptFate:
    """An attempt a worker was running, and what became of it since."""

    event_id: str
    trace_id: str
    node: str
    attempt: int | None
    map_index: int | None
    status: str
    attempts: int
    worker: str
    current: bool
    error: str
    lease_expires_at: datetime | None
    finished_at: datetime | None


def attempt_fates(*, event_ids: list[str]) -> list[AttemptFate]:
    """What became of these attempts (a silent worker's): one query, whatever their number."""
    if not event_ids:
        return []
    with connections["default"].cursor() as cursor:
        cursor.execute(_ATTEMPT_FATES, [list(dict.fromkeys(event_ids))])
        rows = cursor.fetchall()
    fates = []
    for row in rows:
        event_id, trace_id, node, attempt, map_index, status, attempts, worker, current, error, lease, done = row
        fates.append(
            AttemptFate(
                event_id=str(event_id),
                trace_id=str(trace_id),
                node=node,
                attempt=attempt,
                map_index=map_index,
                status=status,
                attempts=attempts,
                worker=worker,
                current=current is not None and str(current) == str(event_id),
                error=error,
                lease_expires_at=lease,
                finished_at=done,
            )
        )
    return fates


# --------------------------------------------------------------------------- workflow trends

_RUN = WorkflowRun._meta.db_table
# Per node over a workflow's latest runs: percentiles of the run time and wait of the attempts that ran
# (rows with an Event: a mapped node's own row has none, its instances each have one), and how many of the
# node's own rows ended SUCCESS or FAILURE, and FAILURE. One GROUP BY, whatever the number of nodes.
_NODE_TRENDS = f"""
WITH recent AS (
    SELECT trace_id FROM {_RUN} WHERE workflow_id = %s ORDER BY created_at DESC, trace_id LIMIT %s
)
SELECT t.node_key,
    count(DISTINCT t.run_id),
    percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY extract(epoch FROM t.finished_at - t.started_at))
        FILTER (WHERE t.current_event_id IS NOT NULL AND t.status IN ('SUCCESS', 'FAILURE')
                AND t.started_at IS NOT NULL AND t.finished_at IS NOT NULL),
    percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY extract(epoch FROM t.started_at - t.queued_at))
        FILTER (WHERE t.current_event_id IS NOT NULL AND t.started_at IS NOT NULL AND t.queued_at IS NOT NULL),
    count(*) FILTER (WHERE t.map_index IS NULL AND t.status IN ('SUCCESS', 'FAILURE')),
    count(*) FILTER (WHERE t.map_index IS NULL AND t.status = 'FAILURE')
FROM recent AS r JOIN {_TASK} AS t ON t.run_id = r.trace_id
GROUP BY t.node_key
"""


@dataclass
class NodeTrend:
    """A node over a workflow's latest runs: seconds at the 50th and 95th percentile (None when nothing ran),
    and how many of its runs ended SUCCESS or FAILURE, and how many of those failed."""

    runs: int
    duration_p50: float | None
    duration_p95: float | None
    wait_p50: float | None
    wait_p95: float | None
    ended: int
    failed: int

    @property
    def failed_share(self) -> float | None:
        return self.failed / self.ended if self.ended else None


def workflow_node_trends(*, workflow: WorkflowDefinition, runs: int = 100) -> dict[str, NodeTrend]:
    """Node key -> its trend over the workflow's latest `runs` runs (whatever their version); one query.
    The runs are read from the (workflow, created_at) index, their tasks from the (run, node) index."""
    with connections["default"].cursor() as cursor:
        cursor.execute(_NODE_TRENDS, [workflow.pk, runs])
        rows = cursor.fetchall()
    trends = {}
    for key, n, duration, wait, ended, failed in rows:
        duration, wait = duration or (None, None), wait or (None, None)
        trends[key] = NodeTrend(n, duration[0], duration[1], wait[0], wait[1], ended, failed)
    return trends
