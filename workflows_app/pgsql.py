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
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from django.db import connection, models, transaction
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
            # Within `one_trip`: psycopg would sync the outer pipeline at each end of a nested one.
            yield
            return
        with raw.pipeline():
            yield


@contextlib.contextmanager
def one_trip() -> Iterator[None]:
    """A transaction whose BEGIN, statements and COMMIT go to PostgreSQL in one round trip: `execute`
    the statements in the block, and read their results after it, once the transaction committed.

    In pipeline mode, Django's `atomic` and psycopg's `transaction()` each cost round trips of their
    own (psycopg syncs the pipeline to switch autocommit, and at each end of a transaction block),
    so outside any transaction the block sends BEGIN and COMMIT itself, on a connection Django
    keeps in autocommit mode. Inside a caller's transaction it is a savepoint of it, committed with
    it (and `transaction.on_commit` waits for that), as is the whole block elsewhere than on
    PostgreSQL. Only statements whose results can wait belong here; an error is raised at the
    block's end, after which nothing of it is written.
    """
    if connection.in_atomic_block or not available() or not connection.get_autocommit():
        with transaction.atomic(), together():
            yield
        return
    with connection.wrap_database_errors:
        connection.ensure_connection()
        raw = connection.connection
        try:
            with raw.pipeline():
                psycopg.Cursor(raw).execute("BEGIN")
                yield
                psycopg.Cursor(raw).execute("COMMIT")
        except BaseException:
            # A statement's error leaves the transaction aborted once the pipeline synced.
            if not raw.closed and raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                raw.rollback()
            raise


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
# `version_id` (the graph the caller read the successors from).
#
# The event types in `lock` are locked before (so this statement's snapshot has their counts of held
# slots after the wait, as admission's has; `ADMIT`). A successor whose type has nobody waiting in
# line and a slot free (counting the one this finish gives back) takes the slot at once, in the write
# that queues it, and its type's count follows in the same statement: one row version each, where
# queueing, then admitting from the line, wrote two. Successors of a type with a line join its end,
# for `ADMIT` to take in turn. Answers how many tasks it recorded, whether the version matched, the
# Event ids of the successors it queued, and those of them it admitted.
FINISH_SUCCESS = f"""
WITH old AS (
    SELECT id, holds_slot FROM {TASK}
    WHERE run_id = %(run_id)s AND current_event_id = %(event_id)s AND node_key = %(node)s
      AND status IN ('{S.QUEUED.value}', '{S.STARTED.value}', '{S.RETRY.value}')
      AND EXISTS (SELECT 1 FROM {RUN} WHERE trace_id = %(run_id)s AND version_id = %(version_id)s)
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
), counted AS (
    UPDATE {EVENT_TYPE} AS type
    SET held = GREATEST(
        type.held - CASE WHEN type.name = %(event_type)s THEN (SELECT slots FROM freed) ELSE 0 END
            + (SELECT count(*) FROM queued WHERE queued.event_type = type.name AND queued.admitted),
        0)
    WHERE type.name = ANY(%(lock)s::varchar[])
      AND ((type.name = %(event_type)s AND (SELECT slots FROM freed) > 0)
           OR EXISTS (SELECT 1 FROM queued WHERE queued.event_type = type.name AND queued.admitted))
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
       EXISTS (SELECT 1 FROM {RUN} WHERE trace_id = %(run_id)s AND version_id = %(version_id)s),
       ARRAY(SELECT event_id FROM queued), ARRAY(SELECT event_id FROM queued WHERE admitted)
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
FROM admitted
"""
