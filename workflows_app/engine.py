"""Every WorkflowRun and TaskRun transition: atomic, idempotent, and sending messages only after commit."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, OperationalError, connection, models, transaction
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from events_app.models import Event, EventType

from . import pgsql
from .models import (
    TaskRun,
    TriggerRule,
    WorkflowDefinition,
    WorkflowRun,
    WorkflowVersion,
)

logger = logging.getLogger(__name__)

S = TaskRun.Status
FINAL = frozenset(TaskRun.FINAL)
FAILED_LIKE = frozenset({S.FAILURE, S.UPSTREAM_FAILED, S.REVOKED})
# Seconds between a node's soft time limit and the hard kill.
HARD_LIMIT_GRACE = 10


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


# --------------------------------------------------------------------------- graph snapshots


@dataclass(frozen=True)
class NodeSpec:
    key: str
    task: str
    event_type: str
    params: dict
    max_retries: int
    retry_delay: float
    timeout: int | None
    trigger_rule: str


@dataclass(frozen=True)
class Graph:
    workflow: str
    version: int
    nodes: dict[str, NodeSpec]
    preds: dict[str, tuple[str, ...]]
    succs: dict[str, tuple[str, ...]]

    @property
    def roots(self) -> list[str]:
        return [key for key in self.nodes if not self.preds[key]]


def graph_from_spec(spec: dict, *, version: int = 0) -> Graph:
    """The run-time view of a version's spec: node settings plus predecessor and successor maps."""
    nodes = {
        n["key"]: NodeSpec(
            key=n["key"],
            task=n["task"],
            event_type=n["event_type"],
            params=n.get("params") or {},
            max_retries=n.get("max_retries", 0),
            retry_delay=float(n.get("retry_delay", 1.0)),
            timeout=n.get("timeout"),
            trigger_rule=n.get("trigger_rule", TriggerRule.ALL_SUCCESS),
        )
        for n in spec["nodes"]
    }
    preds: dict[str, list[str]] = {key: [] for key in nodes}
    succs: dict[str, list[str]] = {key: [] for key in nodes}
    for source, target in spec["edges"]:
        preds[target].append(source)
        succs[source].append(target)
    return Graph(
        workflow=spec["name"],
        version=version,
        nodes=nodes,
        preds={k: tuple(v) for k, v in preds.items()},
        succs={k: tuple(v) for k, v in succs.items()},
    )


@functools.lru_cache(maxsize=1024)
def graph_for_version(version_id: int) -> Graph:
    """Versions never change, so each process parses one at most once."""
    version = WorkflowVersion.objects.only("spec", "version").get(pk=version_id)
    return graph_from_spec(version.spec, version=version.version)


def trigger_decision(rule: str, upstream: Iterable[str]) -> str:
    """What becomes of a node whose predecessors are all final: QUEUED, SKIPPED or UPSTREAM_FAILED."""
    statuses = list(upstream)
    if rule == TriggerRule.ALL_DONE or not statuses:
        return S.QUEUED
    if rule == TriggerRule.ONE_SUCCESS:
        runs = any(s == S.SUCCESS for s in statuses)
    else:
        runs = all(s == S.SUCCESS for s in statuses)
    if runs:
        return S.QUEUED
    if any(s in FAILED_LIKE for s in statuses):
        return S.UPSTREAM_FAILED
    return S.SKIPPED


# --------------------------------------------------------------------------- plumbing

F = TypeVar("F", bound=Callable[..., Any])


def _retry_on_conflict(func: F) -> F:
    """Re-run a transition that PostgreSQL aborted for a deadlock; each attempt is a fresh transaction."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(5):
            try:
                return func(*args, **kwargs)
            except OperationalError as exc:
                if "deadlock" not in str(exc).lower() or attempt == 4 or transaction.get_connection().in_atomic_block:
                    raise
                logger.warning("retrying %s after deadlock", func.__name__)
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


@dataclass
class _Outbox:
    """Messages to publish once the surrounding transaction commits."""

    messages: list[tuple[dict, dict]] = field(default_factory=list)
    revokes: list[str] = field(default_factory=list)

    def add(self, event: dict, *, timeout: int | None, countdown: float = 0) -> None:
        options: dict[str, Any] = {"queue": event["event_type"]}
        if timeout:
            options["soft_time_limit"] = timeout
            options["time_limit"] = timeout + HARD_LIMIT_GRACE
        if countdown:
            options["countdown"] = countdown
        self.messages.append((event, options))

    def flush_on_commit(self) -> None:
        if self.messages or self.revokes:
            messages, revokes = list(self.messages), list(self.revokes)
            transaction.on_commit(lambda: _publish(messages, revokes))


def _publish(messages: list[tuple[dict, dict]], revokes: list[str]) -> None:
    """Send after commit. A failure here is logged, not raised: the rows are committed and say what
    should be in flight, so the caller's request still succeeds and the message can be sent again."""
    from config.celery import app

    if messages:
        try:
            with app.producer_or_acquire() as producer:
                for event, options in messages:
                    app.send_task(
                        event["task_name"],
                        args=[event],
                        task_id=event["event_id"],
                        producer=producer,
                        argsrepr=_args_repr(event, app.amqp.argsrepr_maxsize),
                        kwargsrepr="{}",
                        **options,
                    )
        except Exception:
            logger.exception("could not publish %d task message(s) to the broker", len(messages))
    if revokes:
        try:
            app.control.revoke(revokes, terminate=True, signal="SIGTERM")
        except Exception:
            # Some transports (the embedded file broker) have no broadcast; the durable cancel
            # check in the worker still refuses these attempts.
            logger.warning("could not broadcast revoke of %d task(s)", len(revokes), exc_info=True)


def _args_repr(event: dict, limit: int) -> str:
    """The arguments as the message headers show them (and the result store keeps), cut at `limit`
    characters like Celery's own, but not elided past three levels: its `saferepr` walks the Event
    in Python, a fifth of a publish."""
    text = repr([event])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _new_event(
    *,
    trace_id: uuid.UUID,
    run_payload: dict,
    graph: Graph,
    node: NodeSpec,
    attempt: int,
    upstream: dict,
    now: datetime,
    event_id: uuid.UUID | None = None,
) -> Event:
    """The Event of a node's attempt in the run `trace_id`: the run's payload with the node's params
    over it."""
    return Event(
        event_id=event_id or uuid.uuid4(),
        trace_id=trace_id,
        event_type=node.event_type,
        task_name=node.task,
        payload={**run_payload, **node.params},
        result={},
        context=_event_context(graph, node, attempt=attempt, upstream=upstream),
        status=Event.Status.PENDING,
        timestamp=now,
    )


def _event_context(graph: Graph, node: NodeSpec, *, attempt: int, upstream: dict) -> dict:
    return {
        "workflow": graph.workflow,
        "workflow_version": graph.version,
        "node": node.key,
        "attempt": attempt,
        "upstream": upstream,
    }


Picked = list[tuple[uuid.UUID, str, int]]


def _admit(
    type_names: Iterable[str],
    outbox: _Outbox,
    known: Iterable[Event] = (),
    released: Mapping[str, int] | None = None,
) -> None:
    """Hand QUEUED tasks to Celery, FIFO, while fewer than `concurrency` of their type hold a slot.

    The event-type row lock serialises admission per type across every process, so reading the
    count of held slots and handing out cannot interleave (the race that over-admits in
    check-then-act schemes). Types are locked in name order so two transitions never wait on each
    other's types. The count is the type row's `held`, which only admission writes, under that
    lock: what it takes, and the slots this transaction gave back (`released`, per type; they must
    be among `type_names`). `task_runs_reconcile` recounts it from the task rows. The line is read
    through a partial index, so admission's cost depends neither on the line's length nor on the
    slots held. `known` are events created in this transaction: they are not read back.
    """
    _admitted(_admit_send(type_names, released=released), outbox, known)


def _admit_send(
    type_names: Iterable[str], *, locked: bool = False, released: Mapping[str, int] | None = None
) -> list[Callable[[], Picked]]:
    """Admission's statements for each type, in name order; each callable returns what it picked.
    On PostgreSQL they are sent at once, so they can share a `pgsql.together()` block; `locked`
    says this transaction already locked the types (`pgsql.LOCK_EVENT_TYPES`)."""
    deadline = _dispatch_deadline(timezone.now())
    names = sorted(set(type_names))
    released = released or {}
    if pgsql.available():
        return [_admit_postgresql(name, deadline, released.get(name, 0), locked=locked) for name in names]
    return [functools.partial(_admit_orm, name, deadline, released.get(name, 0)) for name in names]


def _admitted(pending: list[Callable[[], Picked]], outbox: _Outbox, known: Iterable[Event] = ()) -> None:
    known_events = {event.event_id: event for event in known}
    for take in pending:
        picked = take()
        if not picked:
            continue
        events = {p[0]: known_events[p[0]] for p in picked if p[0] in known_events}
        missing = [p[0] for p in picked if p[0] not in events]
        if missing:
            events.update(Event.objects.in_bulk(missing))
        for event_id, node_key, version_id in picked:
            outbox.add(
                events[event_id].as_message(),
                timeout=graph_for_version(version_id).nodes[node_key].timeout,
            )


def _admit_orm(name: str, deadline: datetime, released: int) -> Picked:
    limits = EventType.objects.select_for_update().filter(name=name).values_list("concurrency", "held").first()
    if limits is None:
        return []
    concurrency, held = limits
    free = concurrency - (held - released)
    picked = []
    if free > 0:
        picked = list(
            TaskRun.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(event_type_id=name, status=S.QUEUED, holds_slot=False)
            .order_by("queued_at", "id")
            .values_list("id", "current_event_id", "node_key", "run__version_id")[:free]
        )
        TaskRun.objects.filter(id__in=[p[0] for p in picked]).update(holds_slot=True, lease_expires_at=deadline)
    if picked or released:
        EventType.objects.filter(name=name).update(held=Greatest(models.F("held") - released + len(picked), 0))
    return [p[1:] for p in picked]


def _admit_postgresql(name: str, deadline: datetime, released: int, *, locked: bool) -> Callable[[], Picked]:
    """What `_admit_orm` does, in two statements sent together, or one when the type is locked."""
    if not locked:
        pgsql.execute(pgsql.LOCK_EVENT_TYPES, {"lock": [name]})
    cursor = pgsql.execute(pgsql.ADMIT, {"name": name, "deadline": deadline, "released": released})
    return lambda: [row[2:] for row in cursor.fetchall()]


def _load_rows(run: WorkflowRun, rows: dict[str, TaskRun], keys: Iterable[str]) -> None:
    _load_rows_later(run, rows, keys)()


def _load_rows_later(run: WorkflowRun, rows: dict[str, TaskRun], keys: Iterable[str]) -> Callable[[], None]:
    """Send the read of the rows of `keys` not in `rows`; calling the result adds them to `rows`."""
    missing = [k for k in keys if k not in rows]
    if not missing:
        return lambda: None
    if pgsql.available():
        found = pgsql.fetch_models_later(TaskRun, pgsql.TASKS_OF_NODES, [run.pk, missing])
    else:
        # order_by(): Meta.ordering would join the run's table only to sort rows kept in a dict.
        found = TaskRun.objects.filter(run=run, node_key__in=missing).order_by().all
    return _adding_to(rows, found)


def _adding_to(rows: dict[str, TaskRun], found: Callable[[], Iterable[TaskRun]]) -> Callable[[], None]:
    """What adds the rows `found` returns to `rows`, by node, once called."""

    def add() -> None:
        for row in found():
            rows[row.node_key] = row

    return add


def _around(graph: Graph, keys: Iterable[str]) -> set[str]:
    """The nodes `_advance` reads to settle `keys`: themselves and their predecessors."""
    return {k for key in keys for k in (key, *graph.preds[key])}


def _save_rows(changed: list[TaskRun], new_events: list[Event], *, lock: list[str] | None) -> None:
    """Insert the events `_advance` created and write the fields it sets on every changed row, in
    one statement on PostgreSQL (the ORM's insert alone costs more Python than the statement takes),
    which also locks the event types in `lock`."""
    if not pgsql.available():
        Event.objects.bulk_create(new_events)
        TaskRun.objects.bulk_update(changed, ["status", "queued_at", "finished_at", "current_event"])
        return
    if not changed and not lock:
        return
    pgsql.execute(
        pgsql.SAVE_ADVANCED,
        {
            "advanced": pgsql.as_json(
                [
                    {
                        "id": row.pk,
                        "status": row.status,
                        "queued_at": row.queued_at,
                        "finished_at": row.finished_at,
                        "event_id": row.current_event_id,
                    }
                    for row in changed
                ]
            ),
            "events": pgsql.rows_json(new_events),
            "lock": sorted(set(lock or ())),
        },
    )


def _advance(
    *,
    run: WorkflowRun,
    graph: Graph,
    rows: dict[str, TaskRun],
    frontier: list[str],
    now: datetime,
    created: list[Event] | None = None,
    lock: Iterable[str] | None = None,
) -> list[str]:
    """Settle every WAITING node in `frontier` (and onward) whose predecessors are all final.

    Runs under the run's row lock. Returns the event types that gained QUEUED tasks; the events it
    creates are appended to `created` when given. With `lock`, the rows' write on PostgreSQL also
    locks those types and the returned ones for admission (`_admit_send(..., locked=True)`).
    """
    changed: list[TaskRun] = []
    new_events: list[Event] = []
    queued_types: list[str] = []
    seen: set[str] = set()
    while frontier:
        _load_rows(run, rows, _around(graph, frontier))
        next_frontier: list[str] = []
        for key in frontier:
            row = rows[key]
            if key in seen or row.status != S.WAITING:
                continue
            upstream = [rows[p].status for p in graph.preds[key]]
            if any(s not in FINAL for s in upstream):
                continue
            seen.add(key)
            node = graph.nodes[key]
            decision = trigger_decision(node.trigger_rule, upstream)
            row.status = decision
            if decision == S.QUEUED:
                row.queued_at = now
                results = {p: rows[p].result if rows[p].status == S.SUCCESS else None for p in graph.preds[key]}
                event = _new_event(
                    trace_id=run.trace_id,
                    run_payload=run.payload,
                    graph=graph,
                    node=node,
                    attempt=1,
                    upstream=results,
                    now=now,
                )
                new_events.append(event)
                row.current_event = event
                queued_types.append(node.event_type)
            else:
                row.finished_at = now
                next_frontier.extend(graph.succs[key])
            changed.append(row)
        frontier = next_frontier
    if created is not None:
        created.extend(new_events)
    _save_rows(changed, new_events, lock=None if lock is None else [*lock, *queued_types])
    return queued_types


def _finish_run_if_done(run: WorkflowRun, now: datetime) -> None:
    if pgsql.available():
        ended = pgsql.execute(pgsql.FINISH_RUN, {"run_id": run.pk, "now": now}).fetchone()
        if ended:
            run.status, run.finished_at = ended
        return
    if TaskRun.objects.filter(run=run).exclude(status__in=FINAL).exists():
        return
    failed = TaskRun.objects.filter(run=run, status__in=[S.FAILURE, S.UPSTREAM_FAILED]).exists()
    run.status = WorkflowRun.Status.FAILED if failed else WorkflowRun.Status.SUCCESS
    run.finished_at = now
    run.save(update_fields=["status", "finished_at"])


def _json_safe(value: Any) -> Any:
    """The value as stored JSON would give it back, or a TypeError for what JSON cannot hold."""
    return json.loads(json.dumps(value))


def run_payload_check(payload: Any) -> dict:
    """A run's payload as stored JSON gives it back, or an EngineError: 400 unless it is a JSON
    object, 413 when its JSON is larger than EVENTFLOW["MAX_PAYLOAD_BYTES"]. The one check of a
    payload, for every way a run starts: API, published event, schedule, command."""
    if not isinstance(payload, dict):
        raise EngineError("payload must be a JSON object")
    try:
        # ASCII (non-ASCII characters escaped), so its length is its size in bytes; NaN and the
        # infinities are not JSON, and PostgreSQL would refuse them.
        text = json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"payload is not JSON: {exc}") from None
    limit = settings.EVENTFLOW["MAX_PAYLOAD_BYTES"]
    if len(text) > limit:
        raise EngineError(f"payload is larger than {limit} bytes", status=413)
    return json.loads(text)


# --------------------------------------------------------------------------- transitions


def _current_version_id(workflow: WorkflowDefinition) -> int:
    """The pk of the workflow's current version, snapshotting it first if it has none yet."""
    try:
        return _stored_version_id(workflow.pk, workflow.version)
    except WorkflowVersion.DoesNotExist:
        from .definitions import workflow_version_sync

        # Not cached (lru_cache keeps no exception): this transaction may still roll back.
        return workflow_version_sync(workflow=workflow).pk


@functools.lru_cache(maxsize=4096)
def _version_id_named(workflow: str, version: int) -> int:
    """The pk of a workflow's version by the names an Event carries. A workflow deleted and created
    again under its name may give another answer later; callers check it under the run's lock."""
    return WorkflowVersion.objects.values_list("pk", flat=True).get(workflow__name=workflow, version=version)


@functools.lru_cache(maxsize=4096)
def _stored_version_id(workflow_id: int, version: int) -> int:
    """A version never changes once written, so a trigger reads its pk once per process."""
    return WorkflowVersion.objects.values_list("pk", flat=True).get(workflow_id=workflow_id, version=version)


def _new_run(
    workflow: WorkflowDefinition,
    version_id: int,
    payload: dict,
    user: Any,
    source: str,
    trigger_event: Event | None,
    now: datetime,
    idempotency_key: str | None = None,
) -> tuple[WorkflowRun, Graph, dict[str, Event]]:
    """A run of the workflow's version `version_id`, not yet written, its graph, and its roots'
    Events."""
    graph = graph_for_version(version_id)
    run = WorkflowRun(
        workflow=workflow,
        version_id=version_id,
        workflow_version=graph.version,
        payload=payload,
        idempotency_key=idempotency_key or None,
        created_by=user if getattr(user, "is_authenticated", False) else None,
        source=source,
        trigger_event=trigger_event,
    )
    events = {
        key: _new_event(
            trace_id=run.trace_id,
            run_payload=run.payload,
            graph=graph,
            node=graph.nodes[key],
            attempt=1,
            upstream={},
            now=now,
        )
        for key in graph.roots
    }
    return run, graph, events


def _start_params(
    run: WorkflowRun, graph: Graph, events: dict[str, Event], now: datetime, *, new_run: bool
) -> dict[str, Any]:
    """The parameters of `pgsql.START_RUN` (`pgsql.START_TASKS` for a run already written, without
    its row): the run's row, a task row per node, QUEUED with its Event for the roots (`events`) and
    WAITING for the rest, the roots' Events, and the lock of the roots' event types."""
    tasks = [
        {
            "node_key": node.key,
            "event_type": node.event_type,
            "task_name": node.task,
            "status": S.QUEUED if node.key in events else S.WAITING,
            "queued_at": now if node.key in events else None,
            "event_id": events[node.key].event_id if node.key in events else None,
        }
        for node in graph.nodes.values()
    ]
    return {
        **({"run": pgsql.as_json(pgsql.new_row(run))} if new_run else {}),
        "run_id": run.pk,
        "tasks": pgsql.as_json(tasks),
        "events": pgsql.rows_json(events.values()),
        "lock": sorted({graph.nodes[key].event_type for key in events}),
    }


def _written(run: WorkflowRun) -> None:
    """Mark a run inserted by one of the engine's statements as saved, as the ORM's insert would."""
    run._state.adding, run._state.db = False, connection.alias


def _admitted_by_function(events: list[uuid.UUID], nodes: list[str], versions: list[int]) -> Callable[[], Picked]:
    """What admission took, as the engine's functions answer it (`pgsql._ADMITTED_OUT`), in the form
    `_admitted` reads."""
    return lambda: list(zip(events, nodes, versions, strict=True))


def _start_run_in_one_call(
    run: WorkflowRun, graph: Graph, events: dict[str, Event], now: datetime
) -> Callable[[], Picked]:
    """Write a new run, its tasks and its roots' Events, and admit its roots, in one call of
    `pgsql.START_RUN_FUNCTION`: one statement where BEGIN, the inserts, admission and COMMIT were
    four, each costing the web process more to send than PostgreSQL spends on it."""
    params = {**_start_params(run, graph, events, now, new_run=True), "deadline": _dispatch_deadline(now)}
    admitted = pgsql.call(pgsql.CALL_START_RUN, params).fetchone()
    _written(run)
    return _admitted_by_function(*admitted)


def _insert_tasks(run: WorkflowRun, graph: Graph, events: dict[str, Event], now: datetime, *, new_run: bool) -> None:
    """A task row per node, QUEUED with its event for the roots (`events`), WAITING for the rest,
    after the run's own row when `new_run`; on PostgreSQL the same statement locks the roots' event
    types."""
    if not pgsql.available():
        if new_run:
            run.save(force_insert=True)
        Event.objects.bulk_create(events.values())
        TaskRun.objects.bulk_create(
            TaskRun(
                run=run,
                node_key=node.key,
                event_type_id=node.event_type,
                task_name=node.task,
                status=S.QUEUED if node.key in events else S.WAITING,
                queued_at=now if node.key in events else None,
                current_event=events.get(node.key),
            )
            for node in graph.nodes.values()
        )
        return
    pgsql.execute(
        pgsql.START_RUN if new_run else pgsql.START_TASKS, _start_params(run, graph, events, now, new_run=new_run)
    )
    if new_run:
        _written(run)


@_retry_on_conflict
def workflow_run_start(
    *,
    workflow: WorkflowDefinition,
    payload: dict,
    idempotency_key: str | None = None,
    user: Any = None,
    source: str = "api",
    trigger_event: Event | None = None,
) -> tuple[WorkflowRun, bool]:
    """Start a run on the workflow's current version; returns (run, created).

    With an idempotency key already used for this workflow, returns that run and starts nothing.
    `trigger_event` is the published event that started it, listed first among the run's events.
    """
    payload = run_payload_check(payload)
    if not workflow.is_active:
        raise EngineError(f"workflow '{workflow.name}' is inactive", status=409)
    if idempotency_key:
        existing = WorkflowRun.objects.filter(workflow=workflow, idempotency_key=idempotency_key).first()
        if existing:
            return existing, False
    now = timezone.now()
    try:
        version_id: int | None = _stored_version_id(workflow.pk, workflow.version)
    except WorkflowVersion.DoesNotExist:
        version_id = None  # snapshotted in the transaction below
    if version_id is not None and not idempotency_key and pgsql.available():
        # Without a key's savepoint or a version to write, the inserts and admission are one call.
        run, graph, events = _new_run(workflow, version_id, payload, user, source, trigger_event, now)
        admitted = [_start_run_in_one_call(run, graph, events, now)]
    else:
        with transaction.atomic():
            if version_id is None:
                version_id = _current_version_id(workflow)
            run, graph, events = _new_run(
                workflow, version_id, payload, user, source, trigger_event, now, idempotency_key
            )
            if idempotency_key:
                try:
                    # The savepoint lets a lost race on the idempotency key end in the winner's run.
                    with transaction.atomic():
                        run.save(force_insert=True)
                except IntegrityError:
                    # A concurrent request with the same idempotency key won the insert.
                    existing = WorkflowRun.objects.filter(workflow=workflow, idempotency_key=idempotency_key).first()
                    if existing:
                        return existing, False
                    raise
            with pgsql.together():
                _insert_tasks(run, graph, events, now, new_run=not idempotency_key)
                admitted = _admit_send({graph.nodes[key].event_type for key in events}, locked=True)
    outbox = _Outbox()
    _admitted(admitted, outbox, known=events.values())
    outbox.flush_on_commit()
    return run, True


def _lease_expiry(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.EVENTFLOW["LEASE_SECONDS"])


def _dispatch_deadline(due: datetime) -> datetime:
    return due + timedelta(seconds=settings.EVENTFLOW["DISPATCH_GRACE_SECONDS"])


@_retry_on_conflict
def task_run_start(*, event_id: str, attempt: int = 1, worker: str = "") -> bool:
    """Record that a worker began the event's attempt; False means the attempt must not run.

    A task that is final, revoked, or whose event is no longer its current attempt is refused, so a
    redelivered or stale message never runs finished work again. A redelivered attempt that is
    still STARTED runs again only once its lease has lapsed (its first holder is gone).
    """
    now = timezone.now()
    fields = {"started_at": now, "worker": worker[:200], "lease_expires_at": _lease_expiry(now)}
    if pgsql.available():
        params = {**fields, "event_id": event_id, "attempt": attempt, "now": now}
        return pgsql.execute(pgsql.START, params).fetchone()[0] > 0
    with transaction.atomic():
        updated = TaskRun.objects.filter(current_event_id=event_id, status__in=[S.QUEUED, S.RETRY]).update(
            status=S.STARTED, attempts=attempt, **fields
        )
        if not updated:
            return bool(
                TaskRun.objects.filter(current_event_id=event_id, status=S.STARTED, lease_expires_at__lt=now).update(
                    **fields
                )
            )
        Event.objects.filter(event_id=event_id).update(status=Event.Status.STARTED)
    return True


def task_runs_renew(*, event_ids: Iterable[str]) -> int:
    """Extend the leases of the attempts a worker is running; one statement for all of them."""
    ids = list(event_ids)
    if not ids:
        return 0
    return TaskRun.objects.filter(current_event_id__in=ids, status=S.STARTED).update(
        lease_expires_at=_lease_expiry(timezone.now())
    )


def _stored_outcomes(event_ids: list[str]) -> dict[str, tuple[bool, Any, str]]:
    """Outcomes Celery stored in the result backend for these attempts, when it stores results.

    The backend is written before `task_postrun` fires, so an attempt whose worker died between
    the two finished in Celery although the engine never heard of it.
    """
    from django_celery_results.models import TaskResult

    outcomes = {}
    rows = TaskResult.objects.filter(task_id__in=event_ids, status__in=["SUCCESS", "FAILURE"])
    for task_id, status, raw, traceback in rows.values_list("task_id", "status", "result", "traceback"):
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            value = raw
        succeeded = status == "SUCCESS"
        outcomes[task_id] = (succeeded, value if succeeded else None, "" if succeeded else (traceback or str(value)))
    return outcomes


def task_runs_reconcile(*, limit: int = 200) -> int:
    """Bring every slot holder past its deadline to a definite state; returns how many it handled.

    Started attempts whose lease lapsed (their worker died) take the outcome Celery stored, if
    any, else are retried or failed per the node's policy, freeing the slot. Sent tasks that never
    started (their message was lost) are sent again with the same event id. Safe to run from many
    processes at once: each transition re-checks under the run's lock.
    """
    now = timezone.now()
    overdue = list(
        TaskRun.objects.filter(holds_slot=True, lease_expires_at__lt=now)
        .order_by("lease_expires_at")
        .values_list("id", "run_id", "current_event_id", "status", "worker")[:limit]
    )
    started = [row for row in overdue if row[3] == S.STARTED]
    outcomes = _stored_outcomes([str(row[2]) for row in started]) if started else {}
    for _, trace_id, event_id, _, worker in started:
        succeeded, result, error = outcomes.get(
            str(event_id),
            (False, None, f"worker lost: {worker or 'unknown worker'} stopped renewing the lease of this attempt"),
        )
        task_run_finish(
            trace_id=str(trace_id), event_id=str(event_id), succeeded=succeeded, result=result, error=error, lost=True
        )
    unstarted = [row for row in overdue if row[3] in (S.QUEUED, S.RETRY)]
    if unstarted:
        task_runs_redispatch(ids=[row[0] for row in unstarted])
    event_types_recount()
    return len(overdue)


def event_types_recount() -> None:
    """Set each event type's count of held slots to what its task rows say, under the type's lock.

    The engine keeps the count on every transition; rows deleted outside it (a running run deleted
    in the admin) would keep their slots counted. Any difference is logged and fixed, and the line
    is admitted from again.
    """
    holding = (
        TaskRun.objects.filter(event_type_id=models.OuterRef("name"), holds_slot=True)
        .order_by()
        .values("event_type_id")
        .annotate(n=models.Count("id"))
        .values("n")
    )
    # One statement, so the count and the rows are read in one snapshot: only a type that really
    # drifted differs, and only that type is locked, not every type on every reconciler pass.
    drifted = (
        EventType.objects.annotate(counted=Coalesce(models.Subquery(holding), 0))
        .exclude(held=models.F("counted"))
        .values_list("name", flat=True)
    )
    for name in list(drifted):
        outbox = _Outbox()
        with transaction.atomic():
            held = EventType.objects.select_for_update().filter(name=name).values_list("held", flat=True).first()
            counted = TaskRun.objects.filter(event_type_id=name, holds_slot=True).count()
            if held is None or held == counted:
                continue
            logger.warning("event type %s counted %d slots held, its tasks hold %d: recounted", name, held, counted)
            EventType.objects.filter(name=name).update(held=counted)
            _admit([name], outbox)
            outbox.flush_on_commit()


@_retry_on_conflict
def task_runs_redispatch(*, ids: list[int]) -> None:
    """Send again the current attempt of tasks that hold a slot but never started.

    The same event id goes out again, so if the first message was only late, whichever copy
    starts first runs and the other is refused.
    """
    outbox = _Outbox()
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            TaskRun.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(id__in=ids, holds_slot=True, status__in=[S.QUEUED, S.RETRY], lease_expires_at__lt=now)
            .select_related("current_event", "run")
        )
        for row in rows:
            logger.warning("sending %s of run %s again: it did not start in time", row.node_key, row.run_id)
            timeout = graph_for_version(row.run.version_id).nodes[row.node_key].timeout
            outbox.add(row.current_event.as_message(), timeout=timeout)
        TaskRun.objects.filter(id__in=[r.id for r in rows]).update(lease_expires_at=_dispatch_deadline(now))
        outbox.flush_on_commit()


def _lock_run_and_read_task(trace_id: str, event_id: str) -> tuple[WorkflowRun | None, TaskRun | None]:
    """Lock the run, then read the task whose current attempt is `event_id` (after the lock, so a
    concurrent transition of the same run is seen)."""
    if pgsql.available():
        with pgsql.together():
            runs = pgsql.fetch_models_later(WorkflowRun, pgsql.LOCK_RUN, [trace_id])
            rows = pgsql.fetch_models_later(TaskRun, pgsql.TASK_OF_EVENT, [trace_id, event_id])
        run, row = next(iter(runs()), None), next(iter(rows()), None)
        return run, (row if run else None)
    run = WorkflowRun.objects.select_for_update().filter(trace_id=trace_id).first()
    if run is None:
        return None, None
    # order_by("pk"): Meta.ordering would join the run's table to sort this single row.
    return run, TaskRun.objects.filter(run=run, current_event_id=event_id).order_by("pk").first()


def _save_outcome(
    run: WorkflowRun,
    row: TaskRun,
    rows: dict[str, TaskRun],
    keys: Iterable[str],
    *,
    event_status: str,
    event_result: Any,
    celery_result: Mapping[str, Any] | None,
) -> tuple[Callable[[], None], bool]:
    """Write a final task row, its attempt's Event and, on PostgreSQL, Celery's result row when given;
    send the read of the rows of `keys` not in `rows`. Returns what adds those rows once called, and
    whether Celery's row was written."""
    if not pgsql.available():
        row.save(update_fields=["status", "result", "error", "finished_at", "holds_slot", "lease_expires_at"])
        Event.objects.filter(event_id=row.current_event_id).update(status=event_status, result=event_result)
        return _load_rows_later(run, rows, keys), False
    params = {
        name: TaskRun._meta.get_field(name).get_db_prep_save(getattr(row, name), connection)
        for name in ("status", "result", "error", "finished_at")
    }
    params["event_result"] = Event._meta.get_field("result").get_db_prep_save(event_result, connection)
    params.update(id=row.pk, event_id=row.current_event_id, event_status=event_status)
    params.update(celery_result=_celery_result_json(celery_result, row.finished_at), run_id=run.pk)
    params["nodes"] = [k for k in keys if k not in rows]
    return _adding_to(rows, pgsql.fetch_models_later(TaskRun, pgsql.SAVE_OUTCOME, params)), celery_result is not None


@_retry_on_conflict
def task_run_finish(
    *,
    trace_id: str,
    event_id: str,
    succeeded: bool,
    result: Any = None,
    error: str = "",
    lost: bool = False,
    celery_result: Mapping[str, Any] | None = None,
    event: Mapping[str, Any] | None = None,
) -> bool:
    """Record an attempt's outcome, retry or settle the task, dispatch successors, settle the run.

    Idempotent: a completion for an attempt that is not current or already final changes nothing,
    so a duplicate never dispatches a successor twice. `celery_result`, the Celery result row of a
    success, is written in the same transaction on PostgreSQL; True means it was, and Celery need
    not store it again. `event`, the attempt's Event as the task received it, names the node and
    the version of the graph, so that a success can be recorded in one round trip
    (`_finish_success_in_one_trip`); the database decides, whatever it says.
    """
    if succeeded:
        try:
            result = _json_safe(result)
        except (TypeError, ValueError) as exc:
            succeeded, result, error = (
                False,
                None,
                f"result is not JSON-serialisable: {exc}",
            )
    if succeeded and not lost and event is not None and pgsql.available():
        recorded = _finish_success_in_one_trip(
            trace_id=trace_id, event_id=event_id, result=result, celery_result=celery_result, event=event
        )
        if recorded is not None:
            return recorded
    now = timezone.now()
    outbox = _Outbox()
    with transaction.atomic():
        run, row = _lock_run_and_read_task(trace_id, event_id)
        if run is None or row is None or row.status in FINAL:
            return False
        if lost and not (row.status == S.STARTED and row.lease_expires_at and row.lease_expires_at < now):
            return False  # renewed or finished since the reconciler looked
        graph = graph_for_version(run.version_id)
        node = graph.nodes[row.node_key]
        types = [row.event_type_id]
        if not succeeded and row.attempts <= node.max_retries:
            attempt = row.attempts + 1
            previous = Event.objects.filter(event_id=event_id).values_list("context", flat=True).first() or {}
            event = _new_event(
                trace_id=run.trace_id,
                run_payload=run.payload,
                graph=graph,
                node=node,
                attempt=attempt,
                upstream=previous.get("upstream", {}),
                now=now,
            )
            event.save(force_insert=True)
            Event.objects.filter(event_id=event_id).update(status=Event.Status.FAILURE, result={"error": error})
            # The retry keeps its slot through the backoff: it was admitted and is not finished.
            countdown = node.retry_delay * 2 ** (attempt - 2)
            row.status, row.error, row.current_event = S.RETRY, error, event
            row.lease_expires_at = _dispatch_deadline(now + timedelta(seconds=countdown))
            row.save(update_fields=["status", "error", "current_event", "lease_expires_at"])
            outbox.add(event.as_message(), timeout=node.timeout, countdown=countdown)
            outbox.flush_on_commit()
            return False
        released = {row.event_type_id: int(row.holds_slot)}  # read under the run's lock, before this write
        row.status = S.SUCCESS if succeeded else S.FAILURE
        row.result = result if succeeded else None
        row.error = "" if succeeded else error
        row.finished_at = now
        row.holds_slot = False
        row.lease_expires_at = None
        rows = {row.node_key: row}
        frontier = list(graph.succs[row.node_key])
        # On PostgreSQL, four round trips and five statements from BEGIN to COMMIT: the lock, then the
        # task's read; the outcome with the read of what it may unblock; the successors' writes with
        # the lock of the types to admit from, then admission.
        loaded, stored = _save_outcome(
            run,
            row,
            rows,
            _around(graph, frontier),
            event_status=Event.Status.SUCCESS if succeeded else Event.Status.FAILURE,
            event_result=result if succeeded else {"error": error},
            celery_result=celery_result if succeeded else None,
        )
        loaded()
        created: list[Event] = []
        with pgsql.together():
            queued = _advance(run=run, graph=graph, rows=rows, frontier=frontier, now=now, created=created, lock=types)
            admitted = _admit_send(types + queued, locked=True, released=released)
        _admitted(admitted, outbox, known=created)
        if not queued:  # a successor just became QUEUED, so the run cannot be done yet
            _finish_run_if_done(run, now)
        outbox.flush_on_commit()
        return stored


def _celery_result_json(celery_result: Mapping[str, Any] | None, now: datetime) -> Any:
    """The parameter of the statements that write Celery's result row with an outcome, stored `now`."""
    if celery_result is None:
        return None
    return pgsql.as_json({**celery_result, "date_created": now, "date_done": now})


def _finish_success_in_one_trip(
    *,
    trace_id: str,
    event_id: str,
    result: Any,
    celery_result: Mapping[str, Any] | None,
    event: Mapping[str, Any],
) -> bool | None:
    """`task_run_finish` for a success whose successors each wait on this node alone (a chain, a
    fan-out, a leaf), in one statement and round trip: each round trip costs a worker more,
    waiting for a CPU on a busy machine, than the statements take. None when it does not apply
    (a successor joins other branches, or the Event names a graph the run does not have) and the
    general path must record the outcome; whatever it admitted is sent all the same.

    The graph comes from the Event's context, before any lock, so all of it is known to the one
    call of `pgsql.FINISH_SUCCESS_FUNCTION`: the run's lock and the event types' locks in name
    order, the outcome with its successors (written only if the attempt is current and the run's
    version is the one read, and admitting those with a free slot and nobody ahead of them),
    admission from the lines, and the run's end for a leaf.
    """
    context = event.get("context")
    try:
        version_id = _version_id_named(context["workflow"], context["workflow_version"])
    except (KeyError, TypeError, ValueError, WorkflowVersion.DoesNotExist):
        return None
    graph = graph_for_version(version_id)
    node = graph.nodes.get(context.get("node"))
    if node is None:
        _version_id_named.cache_clear()  # the workflow may have been created again under its name
        return None
    successors = [graph.nodes[key] for key in graph.succs[node.key]]
    if any(graph.preds[s.key] != (node.key,) for s in successors):
        return None
    now = timezone.now()
    upstream = {node.key: result}
    next_ids = [uuid.uuid4() for _ in successors]
    params = {
        "run_id": trace_id,
        "event_id": event_id,
        "node": node.key,
        "version_id": version_id,
        "event_type": node.event_type,
        "now": now,
        "result": TaskRun._meta.get_field("result").get_db_prep_save(result, connection),
        "celery_result": _celery_result_json(celery_result, now),
        "next": pgsql.as_json(
            [
                {
                    "node_key": s.key,
                    "event_id": i,
                    "event_type": s.event_type,
                    "task_name": s.task,
                    "params": s.params,
                    "context": _event_context(graph, s, attempt=1, upstream=upstream),
                }
                for s, i in zip(successors, next_ids, strict=True)
            ]
        ),
    }
    types = sorted({node.event_type, *(s.event_type for s in successors)})
    params.update(lock=types, deadline=_dispatch_deadline(now))
    answer = pgsql.call(pgsql.CALL_FINISH_SUCCESS, params).fetchone()
    recorded, version_matched, queued, admitted_at_once, run_payload, *admitted = answer
    created = []
    if queued:
        by_id = dict(zip(next_ids, successors, strict=True))
        run_payload = WorkflowRun._meta.get_field("payload").from_db_value(run_payload, None, connection)
        created = [
            _new_event(
                trace_id=uuid.UUID(trace_id),
                run_payload=run_payload,
                graph=graph,
                node=by_id[i],
                attempt=1,
                upstream=upstream,
                now=now,
                event_id=i,
            )
            for i in queued
        ]
    outbox = _Outbox()
    for new in created:
        if new.event_id in admitted_at_once:
            outbox.add(new.as_message(), timeout=graph.nodes[new.context["node"]].timeout)
    _admitted([_admitted_by_function(*admitted)], outbox, known=created)
    outbox.flush_on_commit()
    if run_payload is not None and not version_matched:
        _version_id_named.cache_clear()  # the workflow was created again under its name
        return None
    return bool(recorded) and celery_result is not None


@_retry_on_conflict
def task_run_retrying(*, event_id: str, error: str = "") -> None:
    """A task asked Celery to retry itself (`self.retry`): show RETRY until the new attempt starts."""
    TaskRun.objects.filter(current_event_id=event_id, status=S.STARTED).update(status=S.RETRY, error=error)
    Event.objects.filter(event_id=event_id).update(status=Event.Status.RETRY)


@_retry_on_conflict
def workflow_run_cancel(*, trace_id: str) -> WorkflowRun:
    """Cancel a run: every unfinished task ends REVOKED, running ones are terminated.

    Durable: a message already in a queue is refused at start by `task_run_start`, whatever the
    workers remember, since the row is REVOKED.
    """
    now = timezone.now()
    outbox = _Outbox()
    with transaction.atomic():
        run = WorkflowRun.objects.select_for_update().get(trace_id=trace_id)
        if run.is_final:
            return run
        # Locked, so no admission takes one of them between this read and the update below.
        open_rows = list(
            TaskRun.objects.select_for_update(of=("self",))
            .filter(run=run)
            .exclude(status__in=FINAL)
            .values_list("event_type_id", "current_event_id", "holds_slot")
        )
        TaskRun.objects.filter(run=run).exclude(status__in=FINAL).update(
            status=S.REVOKED, finished_at=now, holds_slot=False
        )
        event_ids = [e for _, e, _ in open_rows if e]
        Event.objects.filter(event_id__in=event_ids).exclude(
            status__in=[Event.Status.SUCCESS, Event.Status.FAILURE]
        ).update(status=Event.Status.REVOKED)
        outbox.revokes.extend(str(e) for e in event_ids)
        run.status, run.finished_at = WorkflowRun.Status.CANCELED, now
        run.save(update_fields=["status", "finished_at"])
        released = Counter(t for t, _, held in open_rows if held)
        _admit({t for t, _, _ in open_rows}, outbox, released=released)
        outbox.flush_on_commit()
    return run


@_retry_on_conflict
def workflow_run_retry(*, trace_id: str) -> WorkflowRun:
    """Re-run the failed, upstream-failed and revoked tasks of a final run; successes and results stay."""
    now = timezone.now()
    outbox = _Outbox()
    with transaction.atomic():
        run = WorkflowRun.objects.select_for_update().get(trace_id=trace_id)
        if not run.is_final or run.status == WorkflowRun.Status.SUCCESS:
            raise EngineError(
                f"run {trace_id} is {run.status}: only a failed or canceled run can be retried",
                status=409,
            )
        reset = list(TaskRun.objects.filter(run=run, status__in=FAILED_LIKE | {S.SKIPPED}))
        for row in reset:
            row.status, row.queued_at, row.started_at, row.finished_at = (
                S.WAITING,
                None,
                None,
                None,
            )
            row.result, row.error, row.holds_slot, row.attempts = None, "", False, 0
        TaskRun.objects.bulk_update(
            reset,
            [
                "status",
                "queued_at",
                "started_at",
                "finished_at",
                "result",
                "error",
                "holds_slot",
                "attempts",
            ],
        )
        run.status, run.finished_at = WorkflowRun.Status.RUNNING, None
        run.save(update_fields=["status", "finished_at"])
        graph = graph_for_version(run.version_id)
        rows = {row.node_key: row for row in reset}
        types = _advance(
            run=run,
            graph=graph,
            rows=rows,
            frontier=[r.node_key for r in reset],
            now=now,
        )
        _admit(types, outbox)
        _finish_run_if_done(run, now)
        outbox.flush_on_commit()
    return run


@_retry_on_conflict
def event_type_admit(*, name: str) -> None:
    """Re-check an event type's line, e.g. after its concurrency was raised."""
    outbox = _Outbox()
    with transaction.atomic():
        _admit([name], outbox)
        outbox.flush_on_commit()


def event_type_set_concurrency(*, name: str, concurrency: int) -> EventType:
    """Change a type's limit live: raising it dispatches waiting tasks at once; lowering lets running ones end."""
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise EngineError("concurrency must be an integer >= 1")
    with transaction.atomic():
        EventType.objects.filter(name=name).update(concurrency=concurrency)
        event_type_admit(name=name)
    return EventType.objects.get(name=name)


def _published(*, event_type: str, idempotency_key: str) -> tuple[Event, list[WorkflowRun]] | None:
    event = Event.objects.filter(event_type=event_type, idempotency_key=idempotency_key).first()
    if event is None:
        return None
    runs = WorkflowRun.objects.filter(trigger_event=event).select_related("workflow").order_by("workflow__name")
    return event, list(runs)


def event_publish(
    *, event_type: str, payload: dict, user: Any = None, idempotency_key: str | None = None
) -> tuple[Event, list[WorkflowRun], bool]:
    """Store an outside event and start every active workflow subscribed to its type, all or nothing.

    Returns (event, runs, created). With an idempotency key already used for this event type, returns
    that event and the runs it started, and writes nothing.
    """
    payload = run_payload_check(payload)
    if idempotency_key:
        existing = _published(event_type=event_type, idempotency_key=idempotency_key)
        if existing:
            return (*existing, False)
    with transaction.atomic():
        event = Event(
            event_type=event_type,
            payload=payload,
            status=Event.Status.SUCCESS,
            context={"source": "api"},
            timestamp=timezone.now(),
            idempotency_key=idempotency_key or None,
        )
        try:
            with transaction.atomic():
                event.save(force_insert=True)
        except IntegrityError:
            # A concurrent request with the same key won the insert; the unique constraint made this
            # one wait for its commit, so its runs are visible now.
            existing = idempotency_key and _published(event_type=event_type, idempotency_key=idempotency_key)
            if existing:
                return (*existing, False)
            raise
        subscribed = [
            w
            for w in WorkflowDefinition.objects.filter(is_active=True).order_by("name")
            if event_type in (w.trigger_event_types or [])
        ]
        runs = [
            workflow_run_start(
                workflow=w, payload=payload, user=user, source=f"event:{event.event_id}", trigger_event=event
            )[0]
            for w in subscribed
        ]
    return event, runs, True
