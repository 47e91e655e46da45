"""Every WorkflowRun and TaskRun transition, named `<entity>_<action>`.

Each gathers what `rules` decides on (from the Event a worker holds, or read from the database),
asks `rules`, and has the database carry the decision out in one call (`sql`), which changes nothing
unless the database still agrees with what the decision read. Messages leave once it commits.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.models.functions import Now

from events_app.models import Event, EventType
from webhooks_app.services import deliveries_recover

from .. import pgsql, tracing
from ..models import TaskRun, WorkflowDefinition, WorkflowRun, WorkflowVersion
from . import expressions, kinds, rules, sql
from .events import next_attempt_event
from .graph import Graph, graph_for_version, version_id_named
from .outbox import Outbox
from .rules import NodeState, Outcome, Plan, RunContext, S

logger = logging.getLogger(__name__)

# How often a finish decides again after the database found its reads out of date.
DECIDE_ATTEMPTS = 10


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


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


def _config(name: str) -> float:
    return settings.EVENTFLOW[name]


def _json_safe(value: Any) -> Any:
    """The value as stored JSON would give it back, or a TypeError for what JSON cannot hold."""
    return json.loads(json.dumps(value))


def run_payload_check(payload: Any) -> dict:
    """A run's payload as stored JSON gives it back, or an EngineError: 400 unless it is a JSON object
    PostgreSQL can store, 413 when its JSON is larger than EVENTFLOW["MAX_PAYLOAD_BYTES"]. The one
    check of a payload, for every way a run starts: API, published event, schedule, command."""
    if not isinstance(payload, dict):
        raise EngineError("payload must be a JSON object")
    try:
        # ASCII (non-ASCII characters escaped), so its length is its size in bytes; NaN and the
        # infinities are not JSON, and PostgreSQL would refuse them.
        text = json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"payload is not JSON: {exc}") from None
    if "\\u0000" in text or "\\ud" in text:  # a NUL, or a UTF-16 surrogate, perhaps one alone
        if any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in json.dumps(payload, ensure_ascii=False)):
            raise EngineError("payload holds a NUL character or a lone surrogate, which PostgreSQL cannot store")
    limit = settings.EVENTFLOW["MAX_PAYLOAD_BYTES"]
    if len(text) > limit:
        raise EngineError(f"payload is larger than {limit} bytes", status=413)
    return json.loads(text)


def run_priority_check(priority: Any) -> int:
    """A run's priority: an integer from 0 to 9 (None: 5), or an EngineError naming the field."""
    if priority is None:
        return 5
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 9:
        raise EngineError(f"priority must be an integer from 0 to 9, not {priority!r}")
    return priority


def _plan_params(plan: Plan) -> dict[str, Any]:
    """A plan as `eventflow_advance` and `eventflow_start_run` take it."""
    steps = [
        {
            "node": step.node,
            "status": step.status,
            "result": step.result,
            "error": step.error,
            "keep": step.trim,
            "event_id": step.event["event_id"] if step.status == S.DEFERRED else None,
            "due_in": step.due_in,
            "wait_type": step.wait_type,
            "wait_key": step.wait_key,
            "notify": step.notify or None,
        }
        for step in plan.steps
    ]
    instances = [
        {
            "node": i.node,
            "map_index": i.map_index,
            "event_type": i.event_type,
            "task_name": i.event["task_name"],
            "event_id": i.event["event_id"],
        }
        for i in plan.instances
    ]
    queued = plan.queued
    return {
        "expect": pgsql.as_json([{"node": k, "status": v} for k, v in plan.expect.items()]),
        "steps": pgsql.as_json(steps),
        "events": pgsql.as_json(plan.events),
        "instances": pgsql.as_json(instances),
        "open": plan.open,
        "ready_nodes": [step.node for step in queued],
        "ready_events": [step.event["event_id"] for step in queued],
        "ready_types": [step.event_type for step in queued],
        "types": plan.types,
        "may_end": plan.may_end,
        "grace": _config("DISPATCH_GRACE_SECONDS"),
    }


def _send(
    sent: Any, clock: Any, *, plan: Plan | None = None, version_id: int | None = None, revokes: Iterable[str] = ()
) -> Any:
    """Send after commit what admission answered, and schedule the wake-ups it asked for; the Events
    the `plan` composed are not read back. Answers a retry's due time if admission set one."""
    known = {event["event_id"]: event for event in plan.events} if plan else {}
    outbox = Outbox()
    retry_at = None
    tasks = []
    for item in pgsql.loads(sent):
        if "wake" in item:
            outbox.add_wake(item["wake"], _timestamp(item["at"]))
        elif "deliver" in item:
            outbox.add_delivery(item["deliver"])
        elif "retry_at" in item:
            retry_at = _timestamp(item["retry_at"])
        else:
            tasks.append(item)
    outbox.add_sent(tasks, clock, known=known, version_id=version_id)
    outbox.revokes.extend(str(e) for e in revokes)
    outbox.flush_on_commit()
    return retry_at


def _timestamp(value: str) -> datetime:
    """A timestamp as PostgreSQL's JSON gives it."""
    return datetime.fromisoformat(value)


# --------------------------------------------------------------------------- starting a run

# How long a process keeps an event type's `fairness_key` before reading it again: a change made
# elsewhere applies to runs started from then on, within this many seconds.
FAIRNESS_KEY_TTL = 2.0
_fairness_keys: dict[str, tuple[float, str | None]] = {}


def _fairness_sources(names: Iterable[str]) -> dict[str, str | None]:
    names = set(names)
    now = time.monotonic()
    stale = [n for n in names if n not in _fairness_keys or now - _fairness_keys[n][0] > FAIRNESS_KEY_TTL]
    if stale:
        found = dict(EventType.objects.filter(name__in=stale).values_list("name", "fairness_key"))
        _fairness_keys.update((n, (now, found.get(n))) for n in stale)
    return {n: _fairness_keys[n][1] for n in names}


def _fair_keys(graph: Graph, payload: Mapping[str, Any]) -> dict[str, str]:
    """Each node's fairness key: its event type's `fairness_key` on the run's payload."""
    queues = {key: kinds.queue_of(n.kind, n.event_type) for key, n in graph.nodes.items()}
    sources = _fairness_sources(q for q in queues.values() if q)
    values = {
        q: rules.fairness_key_of(expressions.fairness_value(src, payload=payload)) for q, src in sources.items() if src
    }
    return {key: values.get(q, "") for key, q in queues.items()}


@functools.lru_cache(maxsize=4096)
def _stored_version_id(workflow_id: int, version: int) -> int:
    """A version never changes once written, so a trigger reads its pk once per process."""
    return WorkflowVersion.objects.values_list("pk", flat=True).get(workflow_id=workflow_id, version=version)


def _current_version_id(workflow: WorkflowDefinition) -> int:
    """The pk of the workflow's current version, snapshotting it first if it has none yet."""
    try:
        return _stored_version_id(workflow.pk, workflow.version)
    except WorkflowVersion.DoesNotExist:
        from ..definitions import workflow_version_sync

        with transaction.atomic():
            return workflow_version_sync(workflow=workflow).pk


def _existing_run(workflow: WorkflowDefinition, idempotency_key: str | None) -> WorkflowRun | None:
    if not idempotency_key:
        return None
    return WorkflowRun.objects.filter(workflow=workflow, idempotency_key=idempotency_key).first()


@_retry_on_conflict
def workflow_run_start(
    *,
    workflow: WorkflowDefinition,
    payload: Any,
    idempotency_key: str | None = None,
    user: Any = None,
    source: str = "api",
    trigger_event: Event | None = None,
    priority: int | None = None,
) -> tuple[WorkflowRun, bool]:
    """Start a run on the workflow's current version; returns (run, created).

    With an idempotency key already used for this workflow, returns that run and starts nothing.
    `trigger_event` is the published event that started it, listed first among the run's events.
    `priority` (0 to 9, default 5) orders its tasks before those of lower ones in every line.
    The run, its tasks, its first steps and their admission are one call of `eventflow_start_run`.
    """
    payload = run_payload_check(payload)
    priority = run_priority_check(priority)
    if not workflow.is_active:
        raise EngineError(f"workflow '{workflow.name}' is inactive", status=409)
    if existing := _existing_run(workflow, idempotency_key):
        return existing, False
    version_id = _current_version_id(workflow)
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
        priority=priority,
    )
    plan = rules.plan_start(_context(str(run.trace_id), payload, graph))
    keys = _fair_keys(graph, payload)
    tasks = [
        {
            "node_key": n.key,
            "event_type": kinds.queue_of(n.kind, n.event_type),
            "task_name": n.task,
            "fair_key": keys[n.key],
        }
        for n in graph.nodes.values()
    ]
    params = {"run": pgsql.as_json(pgsql.new_row(run)), "tasks": pgsql.as_json(tasks), **_plan_params(plan)}
    try:
        # With a key, a savepoint: a concurrent request with the same key may win the run's insert.
        with transaction.atomic() if idempotency_key else contextlib.nullcontext():
            clock, sent, ended, waiting = pgsql.fetch_one(sql.START_RUN, params)
    except IntegrityError:
        if existing := _existing_run(workflow, idempotency_key):
            return existing, False
        raise
    run._state.adding, run._state.db = False, connection.alias
    run.created_at = clock
    if ended:
        run.status, run.finished_at = ended, clock
    _send(sent, clock, plan=plan, version_id=version_id)
    _resume_reached(str(run.trace_id), version_id, waiting)
    tracing.trigger_span(trace_id=run.trace_id, workflow=workflow.name, source=source, created_at=clock)
    return run, True


# --------------------------------------------------------------------------- an attempt


@dataclass(frozen=True)
class Start:
    """A worker's answer to whether an attempt may run: `allowed`, else maybe `wait` seconds first
    (it arrived before its due time on the database's clock). `run_payload` is the run's input, from
    which a finish composes its successors' Events."""

    allowed: bool
    run_payload: dict | None = None
    wait: float = 0.0

    def __bool__(self) -> bool:
        return self.allowed


def task_run_start(*, event_id: str, attempt: int = 1, worker: str = "") -> Start:
    """Record that a worker began the event's attempt.

    A task that is final, revoked, or whose event is no longer its current attempt is refused, so a
    redelivered or stale message never runs finished work again. A redelivered attempt that is
    still STARTED runs again only once its lease has lapsed (its first holder is gone).
    """
    params = {"event_id": event_id, "attempt": attempt, "worker": worker[:200], "lease": _config("LEASE_SECONDS")}
    started, payload, wait, _ = pgsql.fetch_one(sql.START, params)
    return Start(allowed=started > 0, run_payload=pgsql.loads(payload), wait=float(wait or 0))


def task_runs_renew(*, event_ids: Iterable[str]) -> int:
    """Extend the leases of the attempts a worker is running; one statement for all of them."""
    ids = [str(e) for e in event_ids]
    if not ids:
        return 0
    return pgsql.execute(sql.RENEW, {"event_ids": ids, "lease": _config("LEASE_SECONDS")}).rowcount


@_retry_on_conflict
def task_run_retrying(*, event_id: str, error: str = "") -> None:
    """A task asked Celery to retry itself (`self.retry`): show RETRY until the new attempt starts."""
    pgsql.execute(sql.RETRYING, {"event_id": event_id, "error": error})


def _context(trace_id: str, payload: Mapping[str, Any], graph: Graph) -> RunContext:
    return RunContext(trace_id, payload, graph, max_map_items=settings.EVENTFLOW["MAX_MAP_ITEMS"])


@dataclass
class _Read:
    version_id: int
    payload: dict
    states: dict[str, NodeState]
    attempt: dict | None  # node, map_index, attempts, event of the attempt asked about, if still current
    instances: list[NodeState]  # of the mapped node asked about, by index


def _read(trace_id: str, event_id: str, nodes: Iterable[str], mapped: str | None = None) -> _Read | None:
    params = {"run_id": trace_id, "event_id": event_id, "nodes": sorted(nodes), "mapped": mapped}
    row = pgsql.fetch_one(sql.READ, params)
    if row is None:
        return None
    version_id, payload, states, attempt, instances = (pgsql.loads(value) for value in row)
    return _Read(
        version_id=version_id,
        payload=payload,
        states={s["node"]: NodeState(s["status"], s["result"]) for s in states},
        attempt=attempt,
        instances=[NodeState(i["status"], i["result"]) for i in instances],
    )


def _trusted_version(event: Mapping[str, Any] | None) -> int | None:
    """The version the Event's context names, which the database confirms under the run's lock."""
    try:
        context = event["context"]
        return version_id_named(context["workflow"], context["workflow_version"])
    except (KeyError, TypeError, ValueError, WorkflowVersion.DoesNotExist):
        return None


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
    run_payload: Mapping[str, Any] | None = None,
) -> bool:
    """Record an attempt's outcome: retry or settle its task, settle the successors it makes ready,
    admit from the lines, and end the run when nothing is left.

    Idempotent: a completion for an attempt that is not current or already final changes nothing,
    so a duplicate never dispatches a successor twice. `event`, the attempt's Event as the task
    received it, names the node and the graph's version, and `run_payload` (from `task_run_start`)
    lets its successors' Events be composed without a read: a success whose successors depend on it
    alone is then one call. `celery_result`, the Celery result row of a success, is written in the
    same transaction; True means it was, and Celery need not store it again. `lost`: the reconciler
    found the attempt's lease lapsed, which the database confirms.
    """
    _, stored = _finish(
        trace_id=trace_id,
        event_id=event_id,
        succeeded=succeeded,
        result=result,
        error=error,
        lost=lost,
        celery_result=celery_result,
        event=event,
        run_payload=run_payload,
    )
    return stored


@_retry_on_conflict
def _finish(
    *,
    trace_id: str,
    event_id: str,
    succeeded: bool = False,
    result: Any = None,
    error: str = "",
    lost: bool = False,
    due: bool = False,
    expired: tuple[int, str] | None = None,
    celery_result: Mapping[str, Any] | None = None,
    event: Mapping[str, Any] | None = None,
    run_payload: Mapping[str, Any] | None = None,
) -> tuple[bool, bool]:
    """`task_run_finish`, answering (whether it was recorded, whether Celery's result was stored).
    `due`: a waiting node's wait ended (the database confirms it), and its kind says what that makes
    of it. `expired`: a QUEUED task waited past its type's `queue_timeout` (seconds, type), which the
    database confirms."""
    if succeeded:
        try:
            result = _json_safe(result)
        except (TypeError, ValueError) as exc:
            succeeded, result, error = False, None, f"result is not JSON-serialisable: {exc}"
    version_id = None if lost else _trusted_version(event)
    graph: Graph | None = graph_for_version(version_id) if version_id else None
    node_key = event["context"].get("node") if graph and event else None
    if graph is None or node_key not in graph.nodes:
        graph, version_id, event = None, None, None
    attempt = event["context"].get("attempt", 1) if event else 1
    map_index = event["context"].get("map_index") if event else None
    payload = run_payload if run_payload is not None and graph is not None else None
    read: dict[str, NodeState] = {}
    needs: set[str] = set()
    instances: list[NodeState] | None = None
    read_instances = False
    for _ in range(DECIDE_ATTEMPTS):
        if graph is None or payload is None or needs or read_instances:
            found = _read(trace_id, event_id, needs, node_key if read_instances else None)
            if found is None:
                return False, False  # the run is gone
            if version_id != found.version_id:  # the Event named no version, or another than the run's
                version_id, graph, event = found.version_id, graph_for_version(found.version_id), None
            if event is None:
                if found.attempt is None:
                    return False, False  # not its task's current attempt
                event, node_key, attempt = found.attempt["event"], found.attempt["node"], found.attempt["attempts"]
                map_index = found.attempt["map_index"]
            payload = found.payload
            read.update(found.states)
            if read_instances:
                instances, read_instances = found.instances, False
        node = graph.nodes[node_key]
        if due:
            outcome = kinds.kind_of(node.kind).due(node)
        elif expired:
            outcome = rules.queue_timeout_outcome(waited=expired[0], event_type=expired[1])
        else:
            outcome = rules.attempt_outcome(node, attempt=attempt, succeeded=succeeded, result=result, error=error)
        plan = rules.plan_finish(
            _context(trace_id, payload, graph), node_key, outcome, read, map_index=map_index, instances=instances
        )
        if isinstance(plan, set):
            needs = plan
            continue
        retry = next_attempt_event(event) if outcome.status == S.RETRY else None
        if retry and retry["event_type"] not in plan.types:  # its due time may wait for its rate window
            plan.types = sorted([*plan.types, retry["event_type"]])
        code, clock, sent, _, waiting = _advance(
            trace_id,
            version_id,
            plan,
            event_id=event_id,
            outcome=outcome,
            retry_event=retry,
            lost=lost,
            due=due,
            expired=expired is not None,
            celery_result=celery_result,
        )
        if code == sql.APPLIED:
            retry_at = _send(sent, clock, plan=plan, version_id=version_id)
            if retry:
                eta = retry_at or clock + timedelta(seconds=outcome.retry_in)
                _send_retry({**retry, "timestamp": clock}, eta, version_id=version_id, node=node_key)
            _resume_reached(trace_id, version_id, waiting)
            return True, celery_result is not None and outcome.status == S.SUCCESS
        if code in (sql.NOT_CURRENT, sql.GONE):
            return False, False
        if code == sql.OTHER_VERSION:
            version_id_named.cache_clear()  # the workflow was created again under its name
            graph, version_id, event, read, instances = None, None, None, {}, None
        else:  # STALE: what the decision read changed meanwhile; read every node again
            needs, read = set(graph.nodes) - {node_key}, {}
            read_instances = map_index is not None
    raise RuntimeError(f"could not record the outcome of {event_id}: the run kept changing")


def _send_retry(event: dict, eta: datetime, *, version_id: int, node: str) -> None:
    """A retry's message, due at `eta` on the database's clock: Celery's ETA is an instant, so the host
    that records the failure lends its clock to none of it."""
    outbox = Outbox()
    outbox.add_event(event, version_id=version_id, node=node, eta=eta)
    outbox.flush_on_commit()


def _advance(
    trace_id: str,
    version_id: int | None,
    plan: Plan,
    *,
    event_id: str | None = None,
    outcome: Outcome | None = None,
    retry_event: dict | None = None,
    lost: bool = False,
    due: bool = False,
    expired: bool = False,
    celery_result: Mapping[str, Any] | None = None,
) -> tuple[int, Any, list[dict], str | None, Any]:
    """Have `eventflow_advance` carry `plan` out, ending the attempt `event_id` with `outcome` if given;
    answers its code, the database's clock, what admission sent, the run's status if it ended, and the
    wait_event nodes it reached with the events already published for them."""
    params = _plan_params(plan)
    if retry_event:
        params["events"] = pgsql.as_json([retry_event])
    succeeded = outcome is not None and outcome.status == S.SUCCESS
    params.update(
        run_id=trace_id,
        version_id=version_id,
        event_id=event_id,
        lost=lost,
        due=due,
        expired=expired,
        outcome=outcome.status if outcome else None,
        result=_jsonb(outcome.result) if succeeded else None,
        error=outcome.error if outcome else None,
        event_result=None if succeeded or outcome is None else _jsonb(outcome.event_result),
        celery_result=pgsql.as_json(celery_result) if celery_result and succeeded else None,
        retry_event=retry_event["event_id"] if retry_event else None,
        retry_in=outcome.retry_in if outcome else None,
    )
    return pgsql.fetch_one(sql.ADVANCE, params)


def _jsonb(value: Any) -> Any:
    """A JSON column's parameter: SQL NULL for None, as the ORM stores it."""
    return None if value is None else pgsql.as_json(value)


# --------------------------------------------------------------------------- recovery


def _stored_outcomes(event_ids: list[str]) -> dict[str, tuple[bool, Any, str]]:
    """Outcomes Celery stored in the result backend for these attempts.

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
    """Bring every slot holder past its deadline (on the database's clock) to a definite state, and
    end the waits that are due (timeouts, delays); returns how many it handled.

    Started attempts whose lease lapsed (their worker died) take the outcome Celery stored, if any,
    else are retried or failed per the node's policy, freeing the slot. Sent tasks that never
    started (their message was lost) are sent again with the same event id. Safe to run from many
    processes at once: each transition is checked again under the run's lock.
    """
    overdue = pgsql.fetch_all(sql.OVERDUE, {"limit": limit})
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
    unstarted = [row[0] for row in overdue if row[3] in (S.QUEUED, S.RETRY)]
    if unstarted:
        task_runs_redispatch(ids=unstarted)
    ended = pgsql.fetch_all(sql.DUE, {"limit": limit})
    for trace_id, event_id in ended:
        _finish(trace_id=str(trace_id), event_id=str(event_id), due=True)
    expired = pgsql.fetch_all(sql.EXPIRED, {"limit": limit})
    for trace_id, event_id, name, timeout in expired:
        _finish(trace_id=str(trace_id), event_id=str(event_id), expired=(timeout, name))
    for (name,) in pgsql.fetch_all(sql.RATE_OVERDUE, {}):
        event_type_admit(name=name)
    event_types_recount()
    deliveries_recover()
    return len(overdue) + len(ended) + len(expired)


def task_runs_redispatch(*, ids: list[int]) -> None:
    """Send again the current attempt of tasks that hold a slot but never started by their deadline.

    The same event id goes out again, so if the first message was only late, whichever copy
    starts first runs and the other is refused.
    """
    rows = pgsql.fetch_all(sql.REDISPATCH, {"ids": ids, "grace": _config("DISPATCH_GRACE_SECONDS")})
    outbox = Outbox()
    for node_key, version_id, event in rows:
        event = pgsql.loads(event)
        logger.warning("sending %s of run %s again: it did not start in time", node_key, event["trace_id"])
        outbox.add_sent([{"node": node_key, "version_id": version_id, "event": event}], clock=None)
    outbox.flush_on_commit()


def event_types_recount() -> None:
    """Set each event type's count of held slots to what its task rows say, under the type's lock.

    The engine keeps the count on every transition; rows deleted outside it (a running run deleted
    in the admin) would keep their slots counted. Any difference is logged and fixed, and the line
    is admitted from again. Only a type found drifted in one snapshot is locked.
    """
    for (name,) in pgsql.fetch_all(sql.DRIFTED, {}):
        with transaction.atomic():
            before = pgsql.fetch_one(sql.LOCK_TYPE, {"name": name})
            recounted = pgsql.fetch_one(sql.RECOUNT, {"name": name})
            if before is None or recounted is None:
                continue
            logger.warning(
                "event type %s counted %d slots held, its tasks hold %d: recounted", name, before[0], recounted[0]
            )
            _admit([name])
    for (name,) in pgsql.fetch_all(sql.KEYS_DRIFTED, {}):
        with transaction.atomic():
            if pgsql.fetch_one(sql.LOCK_TYPE, {"name": name}) is None:
                continue
            (fixed,) = pgsql.fetch_one(sql.RECOUNT_KEYS, {"name": name})
            if fixed:
                logger.warning("event type %s: %d fairness key(s) recounted from its tasks", name, fixed)
            _admit([name])


# --------------------------------------------------------------------------- runs and types


def _admit(names: Iterable[str]) -> None:
    types = sorted(set(names))
    params = {"types": types, "grace": _config("DISPATCH_GRACE_SECONDS")}
    (sent,) = pgsql.fetch_one(sql.ADMIT, params)
    _send(sent, None)


@_retry_on_conflict
def workflow_run_cancel(*, trace_id: str) -> WorkflowRun:
    """Cancel a run: every unfinished task ends REVOKED, running ones are terminated.

    Durable: a message already in a queue is refused at start by `task_run_start`, whatever the
    workers remember, since the row is REVOKED.
    """
    with transaction.atomic():
        row = pgsql.fetch_one(sql.CANCEL, {"run_id": trace_id, "grace": _config("DISPATCH_GRACE_SECONDS")})
        _, revoked, sent = row
        _send(sent, None, revokes=revoked)
    return WorkflowRun.objects.get(trace_id=trace_id)


@_retry_on_conflict
def workflow_run_retry(*, trace_id: str) -> WorkflowRun:
    """Re-run the failed, upstream-failed, skipped and revoked tasks of a final run; successes and
    their results stay."""
    with transaction.atomic():
        locked = pgsql.fetch_one(sql.LOCK_RUN, {"run_id": trace_id})
        if locked is None:
            raise WorkflowRun.DoesNotExist(trace_id)
        status, version_id, payload = locked
        payload = pgsql.loads(payload)
        if not rules.run_retryable(status):
            raise EngineError(
                f"run {trace_id} is {status}: only a failed or canceled run can be retried",
                status=409,
            )
        (rerun,) = pgsql.fetch_one(sql.RERUN, {"run_id": trace_id})
        states: dict[str, NodeState] = {}
        instances: dict[str, list[NodeState]] = {}
        for key, index, status, result in pgsql.fetch_all(sql.STATES, {"run_id": trace_id}):
            if index is None:
                states[key] = NodeState(status, pgsql.loads(result))
            else:
                instances.setdefault(key, []).append(NodeState(status, pgsql.loads(result)))
        graph = graph_for_version(version_id)
        plan = rules.plan_rerun(_context(trace_id, payload, graph), states, rerun or [], instances)
        _, clock, sent, _, waiting = _advance(trace_id, version_id, plan)
        _send(sent, clock, plan=plan, version_id=version_id)
        _resume_reached(trace_id, version_id, waiting)
    return WorkflowRun.objects.get(trace_id=trace_id)


@_retry_on_conflict
def event_type_admit(*, name: str) -> None:
    """Re-check an event type's line, e.g. after its concurrency was raised."""
    with transaction.atomic():
        _admit([name])


# An event type's settings that change how its line is admitted from, live.
ADMISSION_FIELDS = ("concurrency", "rate_limit", "fairness_key", "per_key_concurrency", "queue_timeout")


# The most each whole-number setting may be.
ADMISSION_MAXIMUM = {"concurrency": 100_000, "per_key_concurrency": 100_000, "queue_timeout": 30 * 86_400}


def _whole(value: Any, *, most: int, nullable: bool) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        return f"must be an integer from 1 to {most}" + (", or null" if nullable else "")
    return None


def event_type_settings_check(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """An event type's admission settings as given (any of `ADMISSION_FIELDS`): the values to store,
    and what is wrong with each field that is wrong. The one check for the API, the admin and imports."""
    clean: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in ADMISSION_FIELDS:
        if name not in data:
            continue
        value = data[name]
        if name in ADMISSION_MAXIMUM:
            error = _whole(value, most=ADMISSION_MAXIMUM[name], nullable=name != "concurrency")
        elif name == "rate_limit":
            value = None if value in (None, "") else value
            try:
                rate = rules.rate_parse(value)
                value, error = (rate.text if rate else None), None
            except ValueError as exc:
                error = str(exc)
        else:  # fairness_key
            value = None if value in (None, "") else value
            problems = (
                expressions.check(value, names=expressions.FAIRNESS_NAMES, upstream=(), expect=None)
                if value is not None
                else []
            )
            error = "; ".join(problems) or None
        if error:
            errors[name] = error
        else:
            clean[name] = value
    return clean, errors


@_retry_on_conflict
def event_type_update(*, name: str, **settings_: Any) -> Any:
    """Change a type's admission settings live, all or none: a raised limit admits waiting tasks at
    once; a lowered one lets running tasks end. An EngineError names each field that is wrong."""
    clean, errors = event_type_settings_check(settings_)
    unknown = sorted(set(settings_) - set(ADMISSION_FIELDS))
    if unknown:
        errors.update({field_name: "is not an admission setting" for field_name in unknown})
    if errors:
        raise EngineError("; ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
    with transaction.atomic():
        if pgsql.fetch_one(sql.LOCK_TYPE, {"name": name}) is None:
            raise EngineError(f"event type '{name}' does not exist", status=404)
        EventType.objects.filter(name=name).update(**clean, updated_at=Now())
        if "per_key_concurrency" in clean:
            # Keys count their slots only under a share: count them now, and mark which may be served.
            pgsql.fetch_one(sql.RECOUNT_KEYS, {"name": name})
        _admit([name])
    _fairness_keys.pop(name, None)
    return EventType.objects.get(name=name)


def event_type_set_concurrency(*, name: str, concurrency: int) -> Any:
    """Change a type's limit live: raising it dispatches waiting tasks at once; lowering lets running
    ones end."""
    return event_type_update(name=name, concurrency=concurrency)


# --------------------------------------------------------------------------- nodes that wait


def _wait_event_result(event: Mapping[str, Any]) -> dict[str, Any]:
    return {"event_id": str(event["event_id"]), "key": event["key"], "payload": event["payload"]}


def _resume(trace_id: str, waiter_event_id: str, event: Mapping[str, Any]) -> bool:
    """End a waiting wait_event node with the event it waited for; False if it was no longer waiting."""
    applied, _ = _finish(trace_id=trace_id, event_id=waiter_event_id, succeeded=True, result=_wait_event_result(event))
    return applied


def _resume_reached(trace_id: str, version_id: int, waiting: Any) -> None:
    """The wait_event nodes a transition reached, with the events of their type and key published since
    their run started: each resumes on the first that matches, if any."""
    waiting = pgsql.loads(waiting) or []
    if not waiting:
        return
    graph = graph_for_version(version_id)
    for reached in waiting:
        node = graph.nodes[reached["node"]]
        for event in reached["events"]:
            if kinds.WaitEventKind.matches(node, event):
                _resume(trace_id, str(reached["event_id"]), event)
                break


def _waiters_resume(event: Event) -> list[dict[str, str]]:
    """Resume the nodes waiting for `event` (its type and key, runs started before it, `match` holding),
    in the transaction that stored it, under the lock a waiter reached meanwhile takes too."""
    params = {"type": event.event_type, "key": event.key, "timestamp": event.timestamp}
    pgsql.execute(sql.LOCK_WAIT, params)
    resumed = []
    message = {
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "key": event.key,
        "payload": event.payload,
    }
    for trace_id, node_key, waiter_event_id, version_id in pgsql.fetch_all(sql.WAITERS, params):
        node = graph_for_version(version_id).nodes[node_key]
        if kinds.WaitEventKind.matches(node, message) and _resume(str(trace_id), str(waiter_event_id), message):
            resumed.append({"trace_id": str(trace_id), "node": node_key})
    return resumed


def task_run_decide(*, trace_id: str, node: str, approve: bool, user: Any, comment: str = "") -> None:
    """Approve (SUCCESS) or reject (FAILURE) a run's waiting approval, once: the user, the comment and
    the database's time are its result, or its error. Anything but a waiting approval is a 409."""
    row = (
        TaskRun.objects.filter(run_id=trace_id, node_key=node, map_index=None)
        .values_list("status", "current_event_id", "run__version_id")
        .first()
    )
    if row is None:
        raise EngineError(f"run {trace_id} has no node '{node}'", status=404)
    status, event_id, version_id = row
    spec = graph_for_version(version_id).nodes.get(node)
    if spec is None or spec.kind != "approval" or status != S.DEFERRED:
        raise EngineError(f"node '{node}' of run {trace_id} is not a waiting approval (it is {status})", status=409)
    username = getattr(user, "get_username", lambda: "")()
    (at,) = pgsql.fetch_one("SELECT statement_timestamp()", {})
    result = {"approved": True, "by": username, "comment": comment, "at": at.isoformat().replace("+00:00", "Z")}
    error = f"rejected by {username}" + (f": {comment}" if comment else "")
    applied, _ = _finish(
        trace_id=trace_id, event_id=str(event_id), succeeded=approve, result=result if approve else None, error=error
    )
    if not applied:
        raise EngineError(f"node '{node}' of run {trace_id} was decided meanwhile", status=409)


# --------------------------------------------------------------------------- events from outside


def _published(*, event_type: str, idempotency_key: str) -> tuple[Event, list[WorkflowRun]] | None:
    event = Event.objects.filter(event_type=event_type, idempotency_key=idempotency_key).first()
    if event is None:
        return None
    runs = WorkflowRun.objects.filter(trigger_event=event).select_related("workflow").order_by("workflow__name")
    return event, list(runs)


def event_publish(
    *, event_type: str, payload: Any, user: Any = None, idempotency_key: str | None = None, key: str | None = None
) -> tuple[Event, list[WorkflowRun], bool]:
    """Store an outside event, resume the wait_event nodes waiting for it (its type and `key`), and
    start every active workflow subscribed to its type, all or nothing.

    Returns (event, runs, created); `event.resumed` lists the nodes it resumed. With an idempotency key
    already used for this event type, returns that event and the runs it started, and writes nothing.
    Its time is the database's.
    """
    payload = run_payload_check(payload)
    if idempotency_key:
        existing = _published(event_type=event_type, idempotency_key=idempotency_key)
        if existing:
            return (*existing, False)
    with transaction.atomic():
        event = Event(
            event_id=uuid.uuid4(),
            event_type=event_type,
            payload=payload,
            status=Event.Status.SUCCESS,
            context={"source": "api"},
            timestamp=Now(),
            idempotency_key=idempotency_key or None,
            key=key or None,
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
        event.refresh_from_db(fields=["timestamp"])
        event.resumed = _waiters_resume(event) if event.key else []
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
