"""The engine's hot path on PostgreSQL: each transition in as few statements as it takes, each
statement prepared once per connection.

A worker runs these statements for every task, and PostgreSQL spends longer planning them than
executing them, and Django longer building them than both. Prepared statements are planned
once per connection, and these SQL texts are built once per process. Elsewhere (the embedded
SQLite quickstart) the engine does the same through the ORM in more statements.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from django.db import DatabaseError, ProgrammingError, connection, models
from django_celery_results.models import TaskResult
from psycopg.types.json import Jsonb

from events_app.models import Event, EventType

from .models import TaskRun, WorkflowDefinition, WorkflowRun

M = TypeVar("M", bound=models.Model)

TASK = TaskRun._meta.db_table
RUN = WorkflowRun._meta.db_table
EVENT = Event._meta.db_table
EVENT_TYPE = EventType._meta.db_table


def available() -> bool:
    return connection.vendor == "postgresql"


def execute(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> psycopg.Cursor:
    """Run `sql` in Django's connection and transaction, prepared at first use when the connection
    prepares at all (`prepare_threshold` in the database's OPTIONS, set by `config.settings.base`).

    A psycopg cursor of its own on Django's connection keeps Django's transaction and error
    handling, and lets the hot path ask for preparing at once rather than after a few runs.
    """
    with connection.wrap_database_errors:
        connection.ensure_connection()
        raw = connection.connection
        cursor = psycopg.Cursor(raw)
        cursor.execute(sql, params, prepare=True if raw.prepare_threshold is not None else None)
    return cursor


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Send the statements `execute`d in the block in one round trip (with the transaction's BEGIN
    when one of them opens it), and read their results after the block.

    A worker on a busy machine waits longer for its turn on a CPU after each round trip than the
    statements take. Only statements whose results are read after the block belong inside, and ORM
    inserts without RETURNING: in pipeline mode a cursor's rowcount is unknown until the block ends,
    and the ORM's `save(update_fields=...)` reads it. An error in the block is raised at its end,
    as Django's database error, so the caller's transaction rolls back as usual. Elsewhere than
    PostgreSQL the block runs the statements one by one.
    """
    if not available():
        yield
        return
    with connection.wrap_database_errors:
        connection.ensure_connection()
        raw = connection.connection
        if raw.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF:
            # Within another: psycopg would sync the outer pipeline at each end of a nested one.
            yield
            return
        with raw.pipeline():
            yield


def fetch_models_later(model: type[M], sql: str, params: Sequence[Any] | Mapping[str, Any]) -> Callable[[], list[M]]:
    """Send a statement selecting `columns(model)` now; when called, the instances of `model` it
    read, as the ORM would load them (after a `together()` block, when there is one)."""
    cursor = execute(sql, params)

    def load() -> list[M]:
        with connection.wrap_database_errors:
            rows = cursor.fetchall()
        return [instance for (instance,) in _instances(rows, [model])]

    return load


def fetch_rows(sql: str, params: Sequence[Any], *row_models: type[models.Model]) -> list[tuple[Any, ...]]:
    """Run a statement selecting `columns(model)` for each of `row_models` in turn, then any other
    values; per row, the instance of each, as the ORM would load them, then those values."""
    cursor = execute(sql, params)
    with connection.wrap_database_errors:
        rows = cursor.fetchall()
    return _instances(rows, list(row_models))


def _instances(rows: list[tuple[Any, ...]], row_models: list[type[models.Model]]) -> list[tuple[Any, ...]]:
    layout = []
    start = 0
    for model in row_models:
        fields = model._meta.concrete_fields
        names = [field.attname for field in fields]
        converters = [(i, f.from_db_value) for i, f in enumerate(fields) if hasattr(f, "from_db_value")]
        layout.append((model, start, start + len(fields), names, converters))
        start += len(fields)
    loaded = []
    for row in rows:
        instances = []
        for model, begin, end, names, converters in layout:
            values = list(row[begin:end])
            for i, convert in converters:
                values[i] = convert(values[i], None, connection)
            instances.append(model.from_db(connection.alias, names, values))
        loaded.append((*instances, *row[start:]))
    return loaded


def columns(model: type[models.Model], alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(f"{prefix}{field.column}" for field in model._meta.concrete_fields)


S = TaskRun.Status

# A start: the task row and its attempt's Event, in one statement. A redelivered attempt that is
# still STARTED starts again only once its lease has lapsed. Its commit does not wait for the disk
# (synchronous_commit off, for this transaction only): a start lost to a server crash leaves the
# task QUEUED, as if the worker had not yet taken the message, and the outcome is then recorded
# all the same (a finish accepts a QUEUED task) or the task is sent again once its dispatch
# deadline passes. The finish's commit, which waits, writes the start's record to disk with it.
START = f"""
WITH started AS (
    UPDATE {TASK}
    SET status = '{S.STARTED.value}', attempts = %(attempt)s, started_at = %(now)s, worker = %(worker)s,
        lease_expires_at = %(lease_expires_at)s
    WHERE current_event_id = %(event_id)s
      AND (status IN ('{S.QUEUED.value}', '{S.RETRY.value}')
           OR (status = '{S.STARTED.value}' AND lease_expires_at < %(now)s))
    RETURNING current_event_id
), marked AS (
    UPDATE {EVENT} SET status = '{Event.Status.STARTED.value}' WHERE event_id IN (SELECT current_event_id FROM started)
)
SELECT (SELECT count(*) FROM started), set_config('synchronous_commit', 'off', true)
"""

WORKFLOW_BY_NAME = f"SELECT {columns(WorkflowDefinition)} FROM {WorkflowDefinition._meta.db_table} WHERE name = %s"
LOCK_RUN = f"SELECT {columns(WorkflowRun)} FROM {RUN} WHERE trace_id = %s FOR UPDATE"
# The run's lock, then its event types' (`lock`) in name order, in one statement: each row out locks
# the run (again, for all but the first) and the next type. Answers the run's payload, on every row.
LOCK_RUN_AND_TYPES = f"""
SELECT run.payload FROM {RUN} AS run, {EVENT_TYPE} AS type
WHERE run.trace_id = %(run_id)s AND type.name = ANY(%(lock)s::varchar[])
ORDER BY type.name FOR UPDATE
"""
TASK_OF_EVENT = f"SELECT {columns(TaskRun)} FROM {TASK} WHERE run_id = %s AND current_event_id = %s"
TASKS_OF_NODES = f"SELECT {columns(TaskRun)} FROM {TASK} WHERE run_id = %s AND node_key = ANY(%s::varchar[])"

CELERY_RESULT = TaskResult._meta.db_table
# The columns of Celery's result row for a success (`celery_task.celery_result_row`), and its dates.
CELERY_RESULT_COLUMNS = (
    "task_id",
    "status",
    "result",
    "content_type",
    "content_encoding",
    "meta",
    "traceback",
    "periodic_task_name",
    "task_name",
    "task_args",
    "task_kwargs",
    "worker",
    "date_created",
    "date_done",
)


def _insert_celery_result(condition: str) -> str:
    """Celery's result row `celery_result` (a JSON record of `CELERY_RESULT_COLUMNS`, or NULL for
    none), when `condition` holds, as django-celery-results stores it: created at the first store,
    every column but the creation date replaced at the next. A CTE of the statements below."""
    names = ", ".join(CELERY_RESULT_COLUMNS)
    replaced = ", ".join(f"{c} = EXCLUDED.{c}" for c in CELERY_RESULT_COLUMNS if c not in ("task_id", "date_created"))
    return f"""
    INSERT INTO {CELERY_RESULT} ({names})
    SELECT {names} FROM jsonb_populate_record(NULL::{CELERY_RESULT}, %(celery_result)s)
    WHERE %(celery_result)s IS NOT NULL AND {condition}
    ON CONFLICT (task_id) DO UPDATE SET {replaced}
    """


# A final outcome: the task row, its attempt's Event and Celery's result row when there is one
# (`_insert_celery_result`); then the rows of the run's `nodes`
# (those the outcome may unblock), as they were before it. One statement, as each one sent costs
# more on the client than on the server.
SAVE_OUTCOME = f"""
WITH outcome AS (
    UPDATE {TASK}
    SET status = %(status)s, result = %(result)s, error = %(error)s, finished_at = %(finished_at)s,
        holds_slot = false, lease_expires_at = NULL
    WHERE id = %(id)s
), attempt AS (
    UPDATE {EVENT} SET status = %(event_status)s, result = %(event_result)s WHERE event_id = %(event_id)s
), celery_result AS ({_insert_celery_result("true")})
SELECT {columns(TaskRun)} FROM {TASK} WHERE run_id = %(run_id)s AND node_key = ANY(%(nodes)s::varchar[])
"""

# A success recorded with its successors in one statement, for a node whose successors each have it as
# their only predecessor (so each becomes QUEUED, whatever its trigger rule): the task row, its
# attempt's Event, Celery's result row when there is one, and each successor still WAITING made
# QUEUED with its new Event, whose payload is the run's own with the node's params over it. Nothing
# is written unless the attempt is the task's current one, not final, and the run's version is
# `version_id` (the graph the caller read the successors from; compared after the run is read by its
# key, so no plan can read the version's other runs through its index).
#
# The event types in `lock` are locked before (so this statement's snapshot has their counts of held
# slots after the wait, as admission's has; `ADMIT`). A successor whose type has nobody waiting in
# line and a slot free (counting the one this finish gives back) takes the slot at once, in the write
# that queues it, and its type's count follows in the same statement, when it changes (a chain's
# next step takes the slot its predecessor gives back): one row version each, where queueing, then
# admitting from the line, wrote two. Successors of a type with a line join its end, for `ADMIT` to
# take in turn. Answers how many tasks it recorded, whether the version matched, the Event ids of the
# successors it queued, those of them it admitted, and the types whose line it found not empty.
# Run by the function below (`FINISH_SUCCESS_FUNCTION`).
FINISH_SUCCESS = f"""
WITH old AS (
    SELECT id, holds_slot FROM {TASK}
    WHERE run_id = %(run_id)s AND current_event_id = %(event_id)s AND node_key = %(node)s
      AND status IN ('{S.QUEUED.value}', '{S.STARTED.value}', '{S.RETRY.value}')
      AND (SELECT version_id FROM {RUN} WHERE trace_id = %(run_id)s) = %(version_id)s
), outcome AS (
    UPDATE {TASK}
    SET status = '{S.SUCCESS.value}', result = %(result)s, error = '', finished_at = %(now)s,
        holds_slot = false, lease_expires_at = NULL
    WHERE id IN (SELECT id FROM old)
), attempt AS (
    UPDATE {EVENT} SET status = '{Event.Status.SUCCESS.value}', result = %(result)s
    WHERE event_id = %(event_id)s AND EXISTS (SELECT 1 FROM old)
), celery_result AS ({_insert_celery_result("EXISTS (SELECT 1 FROM old)")}
), freed AS (
    SELECT count(*) AS slots FROM old WHERE holds_slot
), free AS (
    SELECT type.name,
        type.concurrency - type.held
            + CASE WHEN type.name = %(event_type)s THEN (SELECT slots FROM freed) ELSE 0 END AS slots,
        NOT EXISTS (
            SELECT 1 FROM {TASK} WHERE event_type_id = type.name AND status = '{S.QUEUED.value}' AND holds_slot = false
        ) AS line_empty
    FROM {EVENT_TYPE} AS type WHERE type.name = ANY(%(lock)s::varchar[])
), next AS (
    SELECT new.node_key, new.event_id, new.event_type, free.line_empty AND
        row_number() OVER (PARTITION BY new.event_type ORDER BY new.place) <= free.slots AS admitted
    FROM ROWS FROM (jsonb_to_recordset(%(next)s) AS (node_key varchar, event_id uuid, event_type varchar))
        WITH ORDINALITY AS new(node_key, event_id, event_type, place)
    JOIN free ON free.name = new.event_type
), queued AS (
    UPDATE {TASK} AS task
    SET status = '{S.QUEUED.value}', queued_at = %(now)s, current_event_id = next.event_id,
        holds_slot = next.admitted, lease_expires_at = CASE WHEN next.admitted THEN %(deadline)s::timestamptz END
    FROM next
    WHERE task.run_id = %(run_id)s AND task.node_key = next.node_key AND task.status = '{S.WAITING.value}'
      AND EXISTS (SELECT 1 FROM old)
    RETURNING next.event_id, next.event_type, next.admitted
), change AS (
    SELECT free.name,
        (SELECT count(*) FROM queued WHERE queued.event_type = free.name AND queued.admitted)
            - CASE WHEN free.name = %(event_type)s THEN (SELECT slots FROM freed) ELSE 0 END AS held
    FROM free
), counted AS (
    UPDATE {EVENT_TYPE} AS type SET held = GREATEST(type.held + change.held, 0)
    FROM change WHERE type.name = change.name AND change.held <> 0
), events AS (
    INSERT INTO {EVENT}
        (event_id, trace_id, event_type, task_name, payload, result, context, status, timestamp, updated_at)
    SELECT new.event_id, %(run_id)s, new.event_type, new.task_name,
        (SELECT payload FROM {RUN} WHERE trace_id = %(run_id)s) || new.params, '{{}}', new.context,
        '{Event.Status.PENDING.value}', %(now)s, %(now)s
    FROM jsonb_to_recordset(%(next)s)
        AS new(event_id uuid, event_type varchar, task_name varchar, params jsonb, context jsonb)
    WHERE new.event_id IN (SELECT event_id FROM queued)
)
SELECT (SELECT count(*) FROM old),
       coalesce((SELECT version_id FROM {RUN} WHERE trace_id = %(run_id)s) = %(version_id)s, false),
       ARRAY(SELECT event_id FROM queued), ARRAY(SELECT event_id FROM queued WHERE admitted),
       ARRAY(SELECT name FROM free WHERE NOT line_empty ORDER BY name)
"""

# A run ends once none of its tasks is left to finish: FAILED when one failed or could not run for
# it, else SUCCESS (`engine._finish_run_if_done`, in one statement after the writes that end it).
FINISH_RUN = f"""
UPDATE {RUN}
SET status = CASE WHEN EXISTS (
        SELECT 1 FROM {TASK} WHERE run_id = %(run_id)s
        AND status IN ('{S.FAILURE.value}', '{S.UPSTREAM_FAILED.value}')
    ) THEN '{WorkflowRun.Status.FAILED.value}' ELSE '{WorkflowRun.Status.SUCCESS.value}' END,
    finished_at = %(now)s
WHERE trace_id = %(run_id)s AND status = '{WorkflowRun.Status.RUNNING.value}' AND NOT EXISTS (
    SELECT 1 FROM {TASK} WHERE run_id = %(run_id)s AND status NOT IN ({", ".join(f"'{s}'" for s in TaskRun.FINAL)})
)
RETURNING status, finished_at
"""

# New events, one JSON array of rows (`rows_json`); a CTE of the statements below.
INSERT_EVENTS = f"""
INSERT INTO {EVENT} ({columns(Event)})
SELECT {columns(Event)} FROM jsonb_populate_recordset(NULL::{EVENT}, %(events)s)
"""

# Locks the event types named in `lock`, in name order, so admission can follow (`ADMIT`); alone, or
# ending the two statements below, which then take the lock in the same statement as their writes.
LOCK_EVENT_TYPES = f"SELECT 1 FROM {EVENT_TYPE} WHERE name = ANY(%(lock)s::varchar[]) ORDER BY name FOR UPDATE"


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value JSON can carry")


def as_json(value: Any) -> Jsonb:
    """A parameter PostgreSQL reads as jsonb, with dates and ids as the text their columns parse.

    Rows go to a statement as one JSON document, read back by `jsonb_populate_recordset` or
    `jsonb_to_recordset`, rather than as an array parameter per column: psycopg adapts an array
    element by element in Python, which cost a trigger more than the rest of its inserts.
    """
    return Jsonb(value, dumps=functools.partial(json.dumps, default=_json_value))


def new_row(instance: models.Model) -> dict[str, Any]:
    """A new instance's row, column by column, as the ORM's insert prepares it (`pre_save` fills
    `auto_now` dates), for `as_json`."""
    return {f.column: f.pre_save(instance, True) for f in instance._meta.concrete_fields}


def rows_json(instances: Iterable[models.Model]) -> Jsonb:
    return as_json([new_row(instance) for instance in instances])


# A run's task rows (`tasks`, a JSON array), QUEUED with their events for the roots and WAITING for
# the rest.
_INSERT_TASKS = f"""
INSERT INTO {TASK}
    (run_id, node_key, event_type_id, task_name, status, queued_at, current_event_id,
     attempts, holds_slot, error, worker)
SELECT %(run_id)s, new.*, 0, false, '', '' FROM jsonb_to_recordset(%(tasks)s)
    AS new(node_key varchar, event_type varchar, task_name varchar, status varchar, queued_at timestamptz,
           event_id uuid)
"""

# A new run: its row (`run`, `new_row`), its task rows, its roots' events and the lock of their
# types, in one statement; the ORM's inserts cost more Python than the rest of a trigger's
# transaction. START_TASKS is the same for a run already written.
START_RUN = f"""
WITH run AS (
    INSERT INTO {RUN} ({columns(WorkflowRun)})
    SELECT {columns(WorkflowRun)} FROM jsonb_populate_record(NULL::{RUN}, %(run)s)
), events AS ({INSERT_EVENTS}), tasks AS ({_INSERT_TASKS})
{LOCK_EVENT_TYPES}
"""
START_TASKS = f"""
WITH events AS ({INSERT_EVENTS}), tasks AS ({_INSERT_TASKS})
{LOCK_EVENT_TYPES}
"""

# Rows the engine advanced (queued, skipped, upstream failed; `advanced`, a JSON array), all at once,
# with the events of those it queued, and the lock of the types in `lock`; bulk_update's CASE per
# field costs more Python than the rest of a finish together. The task rows' foreign key to their
# new event is checked at commit (Django makes it deferrable).
SAVE_ADVANCED = f"""
WITH events AS ({INSERT_EVENTS}), advanced AS (
UPDATE {TASK} AS task
SET status = new.status, queued_at = new.queued_at, finished_at = new.finished_at, current_event_id = new.event_id
FROM jsonb_to_recordset(%(advanced)s)
    AS new(id bigint, status varchar, queued_at timestamptz, finished_at timestamptz, event_id uuid)
WHERE task.id = new.id
)
{LOCK_EVENT_TYPES}
"""

# Admission after the type's lock: take the head of the line while slots are free, mark it, and
# keep the type's count of held slots (`EventType.held`), less the `released` slots this transaction
# gave back, plus those it takes; never below zero, so a count that drifted low (the reconciler
# recounts it) cannot fail a finish on the column's check. A statement after the lock's: one taken
# in the locking statement would read a snapshot from before the wait, missing the slots the
# previous holder just took. An unknown type admits nothing (GREATEST skips the NULL). The picked
# rows are matched by `= ANY` of an array, and their runs by a subquery, so both are index lookups
# whatever the planner guesses of the LIMIT: a join it sized from the guess read every task row
# once the table outgrew its plan.
ADMIT = f"""
WITH picked AS (
    SELECT id FROM {TASK}
    WHERE event_type_id = %(name)s AND status = '{S.QUEUED.value}' AND holds_slot = false
    ORDER BY queued_at, id
    LIMIT GREATEST((SELECT concurrency - held + %(released)s FROM {EVENT_TYPE} WHERE name = %(name)s), 0)
    FOR UPDATE SKIP LOCKED
), admitted AS (
    UPDATE {TASK} SET holds_slot = true, lease_expires_at = %(deadline)s
    WHERE id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING queued_at, id, current_event_id, node_key, run_id
), counted AS (
    UPDATE {EVENT_TYPE} SET held = GREATEST(held - %(released)s + (SELECT count(*) FROM admitted), 0)
    WHERE name = %(name)s AND (%(released)s > 0 OR EXISTS (SELECT 1 FROM admitted))
)
SELECT queued_at, id, current_event_id, node_key, (SELECT version_id FROM {RUN} WHERE trace_id = run_id)
FROM admitted ORDER BY queued_at, id
"""


def _in_function(sql: str) -> str:
    """A statement above as a PL/pgSQL function runs it: its parameter `%(name)s` is the function's
    argument or variable `p_name` (prefixed, so no name can be taken for a column's)."""
    return re.sub(r"%\((\w+)\)s", r"p_\1", sql)


FUNCTION_PREFIX = "eventflow_"


def _function(name: str, definition: str) -> tuple[str, str]:
    """A function's name, made of `name` and a digest of its `definition` (arguments, results and
    body), and the statement that creates it.

    The name changes with the definition, so a process calls only the function its own code
    defines: on a database migrated by older or newer code, it creates its own at the first call
    (`call`), rather than run another's statements under the same name.
    """
    digest = hashlib.sha256(definition.encode()).hexdigest()[:12]
    named = f"{FUNCTION_PREFIX}{name}_{digest}"
    return named, f"CREATE OR REPLACE FUNCTION {named}{definition}"


# What admission took, as the functions below answer it.
_ADMITTED_OUT = "OUT admitted_events uuid[], OUT admitted_nodes varchar[], OUT admitted_versions bigint[]"


def _admit_in_function(types: str) -> str:
    """`ADMIT` for each event type of the array `types`, in a function with `_ADMITTED_OUT`, whose
    variables `p_name`, `p_released` and `taken` it uses."""
    return f"""
    admitted_events := '{{}}'; admitted_nodes := '{{}}'; admitted_versions := '{{}}';
    FOREACH p_name IN ARRAY {types} LOOP
        FOR taken IN {_in_function(ADMIT).strip()} LOOP
            admitted_events := admitted_events || taken.current_event_id;
            admitted_nodes := admitted_nodes || taken.node_key;
            admitted_versions := admitted_versions || taken.version_id;
        END LOOP;
    END LOOP;"""


# A success whose successors wait on it alone (`engine._finish_success_in_one_trip`), as one call:
# the locks of the run and of the event types (`LOCK_RUN_AND_TYPES`, every row of it read, so every
# type is locked), `FINISH_SUCCESS`, then `ADMIT` for the types whose line it found not empty (only a
# line can hold a task a freed slot lets in: a successor that found none was admitted at once or the
# slots were full), then `FINISH_RUN` when the node is a leaf, or when a successor was no longer
# WAITING. Each statement of a function called in READ COMMITTED takes a snapshot of its own, so
# FINISH_SUCCESS and ADMIT see the counts as the locks left them, as when they were sent one by one.
# Sent one by one, the five statements with BEGIN and COMMIT cost a worker more to send than
# PostgreSQL spends running them. Answers FINISH_SUCCESS's answer, the run's payload, and what ADMIT
# took.
FINISH_SUCCESS_FUNCTION, _CREATE_FINISH_SUCCESS = _function(
    "finish_success",
    f"""(
    p_run_id uuid, p_event_id uuid, p_node varchar, p_version_id bigint, p_event_type varchar,
    p_now timestamptz, p_result jsonb, p_celery_result jsonb, p_next jsonb, p_lock varchar[],
    p_deadline timestamptz,
    OUT recorded bigint, OUT version_matched boolean, OUT queued_events uuid[], OUT admitted_at_once uuid[],
    OUT run_payload jsonb, {_ADMITTED_OUT}
) LANGUAGE plpgsql AS $function$
DECLARE
    p_name varchar;
    p_released integer := 0;
    lines varchar[];
    taken record;
BEGIN
    SELECT (array_agg(locked.payload))[1] INTO run_payload FROM ({_in_function(LOCK_RUN_AND_TYPES)}) AS locked;
    {_in_function(FINISH_SUCCESS).strip()}
    INTO recorded, version_matched, queued_events, admitted_at_once, lines;
    {_admit_in_function("lines")}
    IF jsonb_array_length(p_next) = 0 OR (recorded > 0 AND cardinality(queued_events) < jsonb_array_length(p_next)) THEN
        {_in_function(FINISH_RUN).replace("RETURNING status, finished_at", "").strip()};
    END IF;
END
$function$""",
)
CALL_FINISH_SUCCESS = f"""
SELECT * FROM {FINISH_SUCCESS_FUNCTION}(
    %(run_id)s, %(event_id)s, %(node)s, %(version_id)s, %(event_type)s, %(now)s, %(result)s,
    %(celery_result)s, %(next)s, %(lock)s, %(deadline)s)
"""

# A new run as a trigger without an Idempotency-Key writes it, as one call: `START_RUN` (every row
# of its answer read, so every type is locked), then `ADMIT` for the types in `lock` (the roots').
# Answers what admission took.
START_RUN_FUNCTION, _CREATE_START_RUN = _function(
    "start_run",
    f"""(
    p_run jsonb, p_run_id uuid, p_tasks jsonb, p_events jsonb, p_lock varchar[], p_deadline timestamptz,
    {_ADMITTED_OUT}
) LANGUAGE plpgsql AS $function$
DECLARE
    p_name varchar;
    p_released integer := 0;
    taken record;
BEGIN
    FOR taken IN {_in_function(START_RUN).strip()} LOOP
    END LOOP;
    {_admit_in_function("p_lock")}
END
$function$""",
)
CALL_START_RUN = f"""
SELECT * FROM {START_RUN_FUNCTION}(%(run)s, %(run_id)s, %(tasks)s, %(events)s, %(lock)s, %(deadline)s)
"""

_FUNCTIONS = {FINISH_SUCCESS_FUNCTION: _CREATE_FINISH_SUCCESS, START_RUN_FUNCTION: _CREATE_START_RUN}


def install_functions(using: str = "default", *, drop_others: bool = True) -> None:
    """Create the engine's functions in the database `using`, and drop those of other code (their
    names differ; `_function`) unless told not to. Run after each `migrate` (the app's
    `post_migrate` handler); a process still running older code creates its own again at its next
    call, and drops none."""
    from django.db import connections

    target = connections[using]
    if target.vendor != "postgresql":
        return
    with target.cursor() as cursor:
        for create in _FUNCTIONS.values():
            cursor.execute(create)
        if not drop_others:
            return
        cursor.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = current_schema() AND p.proname LIKE %s AND NOT p.proname = ANY(%s)",
            [FUNCTION_PREFIX.replace("_", r"\_") + "%", list(_FUNCTIONS)],
        )
        for (signature,) in cursor.fetchall():
            cursor.execute(f"DROP FUNCTION IF EXISTS {signature}")


def call(sql: str, params: Mapping[str, Any]) -> psycopg.Cursor:
    """`execute` a statement calling one of the engine's functions, creating them first when the
    database has not got them (it was migrated by other code, or not since this code was deployed).
    Within a transaction the error stands: the transaction cannot go on after it."""
    try:
        return execute(sql, params)
    except ProgrammingError as exc:
        if not isinstance(exc.__cause__, psycopg.errors.UndefinedFunction) or not connection.get_autocommit():
            raise
    try:
        install_functions(connection.alias, drop_others=False)
    except DatabaseError:
        pass  # another process was creating it at the same moment; the call below tells
    return execute(sql, params)
