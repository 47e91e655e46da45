"""The engine's statements and database functions: they carry out what `rules` decided, in as few
round trips as it takes, on the database's clock.

Every time another process compares (a lease, a dispatch deadline, a retry's due time) and every time
stored with a transition is the database's `now()`, never a host's. The functions are installed by
migrations (`install_functions`; after a change here, `manage.py engine_functions --migration NAME`
writes the next one); the suite checks that the latest of them names these definitions' digest and
that the migrated database holds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from django_celery_results.models import TaskResult

from events_app.models import Event, EventType

from ..models import TaskRun, WorkflowRun
from ..pgsql import columns
from .rules import FINAL, LINE_ORDER, RERUN, RESOLVABLE, RUN_FAILS_ON, R, S

TASK = TaskRun._meta.db_table
RUN = WorkflowRun._meta.db_table
EVENT = Event._meta.db_table
EVENT_TYPE = EventType._meta.db_table
CELERY_RESULT = TaskResult._meta.db_table


def _in(statuses: Iterable[str]) -> str:
    return ", ".join(f"'{s}'" for s in sorted(statuses))


def _line_order(alias: str) -> str:
    return ", ".join(f"{alias}.{column}" for column in LINE_ORDER)


def _seconds(parameter: str) -> str:
    return f"make_interval(secs => {parameter})"


# The lock a waiter of an event type and key takes when it is reached, and a publisher of such an event
# before it looks for waiters: one of the two sees the other.
WAIT_LOCK = "hashtextextended({type} || E'\\n' || {key}, 0)"
# The most events a waiter reached late reads back (the first that matches resumes it).
WAIT_CANDIDATES = 100

# What `eventflow_advance` answers in `code`.
APPLIED, NOT_CURRENT, STALE, OTHER_VERSION, GONE = range(5)

# --------------------------------------------------------------------------- statements

# A start: the task row and its attempt's Event, in one statement. A redelivered attempt still STARTED
# starts again only once its lease lapsed; a retry does not start before its due time, and the answer
# says how long is left (a worker whose clock runs ahead of the database's got it early). Answers how
# many rows started, the run's payload (a finish composes its successors' Events from it), and the
# seconds left before the attempt is due. Its commit does not wait for the disk: a start lost to a
# server crash leaves the task QUEUED, which a finish accepts, and the dispatch deadline sends again.
START = f"""
WITH started AS (
    UPDATE {TASK}
    SET status = '{S.STARTED}', attempts = %(attempt)s, started_at = now(), worker = %(worker)s,
        lease_expires_at = now() + {_seconds("%(lease)s")}, due_at = NULL
    WHERE current_event_id = %(event_id)s
      AND (status IN ('{S.QUEUED}', '{S.RETRY}') OR (status = '{S.STARTED}' AND lease_expires_at < now()))
      AND (due_at IS NULL OR due_at <= now())
    RETURNING run_id
), marked AS (
    UPDATE {EVENT} SET status = '{Event.Status.STARTED}'
    WHERE event_id = %(event_id)s AND EXISTS (SELECT 1 FROM started)
)
SELECT (SELECT count(*) FROM started),
       (SELECT payload FROM {RUN} WHERE trace_id = (SELECT run_id FROM started)),
       CASE WHEN NOT EXISTS (SELECT 1 FROM started) THEN (
           SELECT extract(epoch FROM due_at - now()) FROM {TASK}
           WHERE current_event_id = %(event_id)s AND status = '{S.RETRY}' AND due_at > now()
       ) END,
       set_config('synchronous_commit', 'off', true)
"""

RENEW = f"""
UPDATE {TASK} SET lease_expires_at = now() + {_seconds("%(lease)s")}
WHERE current_event_id = ANY(%(event_ids)s::uuid[]) AND status = '{S.STARTED}'
"""

RETRYING = f"""
WITH marked AS (
    UPDATE {TASK} SET status = '{S.RETRY}', error = %(error)s
    WHERE current_event_id = %(event_id)s AND status = '{S.STARTED}'
)
UPDATE {EVENT} SET status = '{Event.Status.RETRY}' WHERE event_id = %(event_id)s
"""

# What a transition reads when it cannot decide from what its worker knows: the run's version and
# payload, the states of some of its nodes, the attempt of `event_id` (its node, its instance, its
# number and its Event), and the states of the instances of the mapped node `mapped`. Read without a
# lock: the decision it feeds is carried out only if the database still agrees (`eventflow_advance`'s
# `p_expect`).
READ = f"""
SELECT run.version_id, run.payload,
    (SELECT coalesce(jsonb_agg(jsonb_build_object('node', t.node_key, 'status', t.status, 'result', t.result)), '[]')
     FROM {TASK} AS t WHERE t.run_id = run.trace_id AND t.node_key = ANY(%(nodes)s::varchar[]) AND t.map_index IS NULL),
    (SELECT jsonb_build_object(
        'node', t.node_key, 'map_index', t.map_index, 'attempts', t.attempts, 'event', to_jsonb(e))
     FROM {TASK} AS t JOIN {EVENT} AS e ON e.event_id = t.current_event_id
     WHERE t.run_id = run.trace_id AND t.current_event_id = %(event_id)s),
    (SELECT coalesce(jsonb_agg(jsonb_build_object('status', t.status, 'result', t.result) ORDER BY t.map_index), '[]')
     FROM {TASK} AS t WHERE t.run_id = run.trace_id AND t.node_key = %(mapped)s AND t.map_index IS NOT NULL)
FROM {RUN} AS run WHERE run.trace_id = %(run_id)s
"""

# Slot holders past their deadline on the database's clock, oldest first: started attempts whose
# lease lapsed, and sent ones that never started.
OVERDUE = f"""
SELECT id, run_id, current_event_id, status, worker FROM {TASK}
WHERE holds_slot AND lease_expires_at < now() ORDER BY lease_expires_at LIMIT %(limit)s
"""

# Sent again: tasks holding a slot that never started by their deadline. A concurrent reconciler
# waiting on the same rows finds the deadline moved and skips them.
REDISPATCH = f"""
WITH moved AS (
    UPDATE {TASK} SET lease_expires_at = now() + {_seconds("%(grace)s")}
    WHERE id = ANY(%(ids)s::bigint[]) AND holds_slot AND status IN ('{S.QUEUED}', '{S.RETRY}')
      AND lease_expires_at < now()
    RETURNING run_id, node_key, current_event_id
)
SELECT moved.node_key, run.version_id, to_jsonb(event) FROM moved
JOIN {RUN} AS run ON run.trace_id = moved.run_id JOIN {EVENT} AS event ON event.event_id = moved.current_event_id
"""

# The waiters of a published event, under its type and key's lock: DEFERRED nodes of runs started before it.
LOCK_WAIT = f"SELECT pg_advisory_xact_lock({WAIT_LOCK.format(type='%(type)s', key='%(key)s')})"
WAITERS = f"""
SELECT task.run_id, task.node_key, task.current_event_id, run.version_id FROM {TASK} AS task
JOIN {RUN} AS run ON run.trace_id = task.run_id
WHERE task.status = '{S.DEFERRED}' AND task.wait_type = %(type)s AND task.wait_key = %(key)s
  AND run.created_at <= %(timestamp)s
ORDER BY run.created_at, task.id
"""
# Waiting nodes whose wait ended on the database's clock (a timeout, a delay), oldest first.
DUE = f"""
SELECT run_id, current_event_id FROM {TASK}
WHERE status = '{S.DEFERRED}' AND due_at <= now() ORDER BY due_at LIMIT %(limit)s
"""

# A retried run: its run row locked, then its nodes that ended without success WAITING again (a
# mapped node's instances are kept: the plan says which run again).
LOCK_RUN = f"SELECT status, version_id, payload FROM {RUN} WHERE trace_id = %(run_id)s FOR UPDATE"
RERUN = f"""
WITH reset AS (
    UPDATE {TASK}
    SET status = '{S.WAITING}', queued_at = NULL, started_at = NULL, finished_at = NULL, result = NULL, error = '',
        holds_slot = false, attempts = 0, lease_expires_at = NULL, due_at = NULL
    WHERE run_id = %(run_id)s AND map_index IS NULL AND status IN ({_in(RERUN)})
    RETURNING node_key
), running AS (
    UPDATE {RUN} SET status = '{R.RUNNING}', finished_at = NULL WHERE trace_id = %(run_id)s
)
SELECT array_agg(node_key) FROM reset
"""
STATES = f"""
SELECT node_key, map_index, status, result FROM {TASK} WHERE run_id = %(run_id)s ORDER BY node_key, map_index
"""

# The count of held slots of each event type whose rows hold another number, in one snapshot.
DRIFTED = f"""
SELECT type.name FROM {EVENT_TYPE} AS type
WHERE type.held <> (SELECT count(*) FROM {TASK} WHERE event_type_id = type.name AND holds_slot)
"""
RECOUNT = f"""
WITH counted AS (SELECT count(*) AS n FROM {TASK} WHERE event_type_id = %(name)s AND holds_slot)
UPDATE {EVENT_TYPE} SET held = (SELECT n FROM counted)
WHERE name = %(name)s AND held <> (SELECT n FROM counted)
RETURNING held
"""
LOCK_TYPE = f"SELECT held FROM {EVENT_TYPE} WHERE name = %(name)s FOR UPDATE"

ADMIT = "SELECT eventflow_admit(%(types)s::varchar[], %(released)s::integer[], '{}', '{}', '{}', %(grace)s)"
CANCEL = "SELECT * FROM eventflow_cancel_run(%(run_id)s, %(grace)s)"
ADVANCE = """
SELECT * FROM eventflow_advance(
    %(run_id)s, %(version_id)s, %(event_id)s, %(lost)s, %(due)s, %(outcome)s, %(result)s, %(error)s, %(event_result)s,
    %(celery_result)s, %(retry_event)s, %(retry_in)s, %(expect)s, %(steps)s, %(events)s, %(instances)s,
    %(open)s, %(ready_nodes)s::varchar[], %(ready_events)s::uuid[], %(ready_types)s::varchar[], %(types)s::varchar[],
    %(may_end)s, %(grace)s)
"""
START_RUN = """
SELECT * FROM eventflow_start_run(
    %(run)s, %(tasks)s, %(expect)s, %(steps)s, %(events)s, %(instances)s, %(ready_nodes)s::varchar[],
    %(ready_events)s::uuid[], %(ready_types)s::varchar[], %(types)s::varchar[], %(may_end)s, %(grace)s)
"""

# --------------------------------------------------------------------------- functions

# The columns of Celery's result row for a success (`celery_task.celery_result_row`).
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
_CELERY_RESULT_REPLACED = ", ".join(
    f"{c} = EXCLUDED.{c}" for c in CELERY_RESULT_COLUMNS if c not in ("task_id", "date_created")
)
_EVENT_RECORD = (
    "event_id uuid, trace_id uuid, event_type varchar, task_name varchar, payload jsonb, result jsonb, "
    "context jsonb, status varchar"
)

# Admission: the one place a task is handed a slot. For each event type (locked in name order, so
# concurrent transitions never wait on each other's types): the slots free are its `concurrency` less
# its count of held slots (`EventType.held`, written only here and by the recount, under that lock),
# counting the slots the caller gave back (`p_released`); the candidates are the head of its line
# (QUEUED tasks not holding a slot, read through a partial index in `rules.LINE_ORDER`, so the cost
# depends neither on the line's length nor on the slots held) and the tasks becoming ready in the
# caller's transition (`p_ready`, with their new Events and types), which join the line; the first
# ones take the free slots. Each task is written once: QUEUED, holding a slot or not. The line is read
# after the lock, in a statement of its own, so it sees the tasks the previous holder of the lock
# admitted. Answers the admitted tasks, in order: with the Event of each already waiting in the line
# (to send once the transaction commits), and the Event id of each the caller made ready.
ADMIT_FUNCTION = (
    "eventflow_admit",
    "p_types varchar[], p_released integer[], p_ready bigint[], p_ready_events uuid[], p_ready_types varchar[], "
    "p_grace double precision",
    "jsonb",
    f"""
DECLARE
    v_names varchar[];
    v_frees integer[];
    v_i integer;
    v_name varchar;
    v_free integer;
    v_released integer;
    v_head bigint[];
    v_fresh bigint[];
    v_ids bigint[];
    v_taken integer;
    v_batch jsonb;
    v_sent jsonb := '[]';
BEGIN
    -- A row locked FOR UPDATE is read as the lock's previous holder left it.
    SELECT array_agg(t.name ORDER BY t.name), array_agg(t.concurrency - t.held ORDER BY t.name)
    INTO v_names, v_frees
    FROM (SELECT name, concurrency, held FROM {EVENT_TYPE} WHERE name = ANY(p_types) ORDER BY name FOR UPDATE) AS t;
    FOR v_i IN 1 .. coalesce(cardinality(v_names), 0) LOOP
        v_name := v_names[v_i];
        v_released := coalesce(p_released[array_position(p_types, v_name)], 0);
        v_free := v_frees[v_i] + v_released;
        v_head := ARRAY(
            SELECT id FROM {TASK}
            WHERE event_type_id = v_name AND status = '{S.QUEUED}' AND holds_slot = false
            ORDER BY {_line_order(TASK)} LIMIT GREATEST(v_free, 0) FOR UPDATE SKIP LOCKED);
        IF cardinality(p_ready) < 2 THEN  -- the common case, without a query
            v_fresh := CASE WHEN p_ready_types[1] = v_name THEN p_ready ELSE '{{}}' END;
        ELSE
            v_fresh := ARRAY(
                SELECT r.id FROM unnest(p_ready, p_ready_types) AS r(id, t) WHERE r.t = v_name ORDER BY r.id);
        END IF;
        -- Tasks becoming ready now share their `queued_at`: they come after the line's head, in id
        -- order, unless the head holds a task that joined it in this very transaction: then the
        -- line's order decides.
        IF cardinality(v_head) = 0 OR cardinality(v_fresh) = 0 OR NOT EXISTS (
            SELECT 1 FROM {TASK} WHERE id = ANY(v_head) AND queued_at >= now()
        ) THEN
            v_ids := v_head || v_fresh;
        ELSE
            v_ids := ARRAY(
                SELECT u.id FROM (
                    SELECT id, queued_at FROM {TASK} WHERE id = ANY(v_head)
                    UNION ALL
                    SELECT id, now() FROM unnest(v_fresh) AS id
                ) AS u ORDER BY {_line_order("u")});
        END IF;
        IF cardinality(v_ids) = 0 THEN
            IF v_released > 0 THEN
                UPDATE {EVENT_TYPE} SET held = GREATEST(held - v_released, 0) WHERE name = v_name;
            END IF;
            CONTINUE;
        END IF;
        -- Rows are found by id (`= ANY` of an array: index lookups whatever the plan guesses).
        WITH written AS (
            UPDATE {TASK} AS task
            SET status = '{S.QUEUED}',
                queued_at = CASE WHEN c.id = ANY(v_fresh) THEN now() ELSE task.queued_at END,
                current_event_id = CASE
                    WHEN c.id = ANY(v_fresh) THEN p_ready_events[array_position(p_ready, c.id)]
                    ELSE task.current_event_id
                END,
                holds_slot = c.n <= v_free,
                lease_expires_at = CASE WHEN c.n <= v_free THEN now() + {_seconds("p_grace")} END
            FROM unnest(v_ids) WITH ORDINALITY AS c(id, n)
            WHERE task.id = c.id AND task.id = ANY(v_ids) AND (c.id = ANY(v_fresh) OR c.n <= v_free)
            RETURNING task.id, task.run_id, task.node_key, task.current_event_id, task.holds_slot, c.n
        ), counted AS (
            UPDATE {EVENT_TYPE}
            SET held = GREATEST(held - v_released + (SELECT count(*) FROM written WHERE holds_slot), 0)
            WHERE name = v_name AND (SELECT count(*) FROM written WHERE holds_slot) <> v_released
        )
        SELECT count(*), coalesce(jsonb_agg(CASE WHEN w.id = ANY(v_fresh)
            THEN jsonb_build_object('event_id', w.current_event_id)
            ELSE jsonb_build_object(
                'node', w.node_key,
                'version_id', (SELECT version_id FROM {RUN} WHERE trace_id = w.run_id),
                'event', (SELECT to_jsonb(event) FROM {EVENT} AS event WHERE event.event_id = w.current_event_id))
            END ORDER BY w.n), '[]')
        INTO v_taken, v_batch
        FROM written AS w WHERE w.holds_slot;
        v_sent := v_sent || v_batch;
    END LOOP;
    RETURN v_sent;
END
""",
)

# A run ends once none of its tasks is left to finish: FAILED when one of them ended in
# `rules.RUN_FAILS_ON`, else SUCCESS (`rules.run_outcome`). Answers the run's new status, or NULL.
END_RUN_FUNCTION = (
    "eventflow_end_run",
    "p_run uuid",
    "varchar",
    f"""
DECLARE
    v_status varchar;
BEGIN
    UPDATE {RUN}
    SET status = CASE WHEN EXISTS (
            SELECT 1 FROM {TASK} WHERE run_id = p_run AND status IN ({_in(RUN_FAILS_ON)})
        ) THEN '{R.FAILED}' ELSE '{R.SUCCESS}' END,
        finished_at = now()
    WHERE trace_id = p_run AND status = '{R.RUNNING}'
      AND NOT EXISTS (SELECT 1 FROM {TASK} WHERE run_id = p_run AND status NOT IN ({_in(FINAL)}))
    RETURNING status INTO v_status;
    RETURN v_status;
END
""",
)

# A transition decided by `rules`, carried out under the run's lock, or not at all. With `p_event`,
# it ends that attempt: refused (NOT_CURRENT) unless the attempt is its task's current one and not
# final (and, for a lost one, STARTED with its lease lapsed); otherwise its task takes `p_outcome`
# (SUCCESS or FAILURE, freeing its slot, with Celery's result row when given), or RETRY with its next
# attempt's Event (in `p_events`, due in `p_retry_in` seconds, keeping the slot); the attempt's
# Event takes the result, or `p_event_result` (its error) when it failed. Nothing is written
# unless the run's version is `p_version` (when given; OTHER_VERSION), every node of `p_expect` still
# has the status the decision read, and, with `p_open`, that mapped node still has an unfinished
# instance besides the attempt's (STALE). Then the steps: new Events, nodes that end at once or start
# (a mapped node's row, keeping `keep` instance rows when given), its instances (`p_instances`, new
# or started again, each QUEUED in its type's line), and the QUEUED ones through admission
# (`eventflow_admit`, with the slot given back), and the run's end when `p_may_end`. Answers the code,
# the database's clock, what admission sent, and the run's status if it ended. The checks read after
# the run's lock, in a statement of their own: they see what the lock's previous holder wrote.
ADVANCE_FUNCTION = (
    "eventflow_advance",
    "p_run uuid, p_version bigint, p_event uuid, p_lost boolean, p_due boolean, p_outcome varchar, p_result jsonb, "
    "p_error text, p_event_result jsonb, p_celery_result jsonb, p_retry_event uuid, "
    "p_retry_in double precision, p_expect jsonb, p_steps jsonb, p_events jsonb, p_instances jsonb, p_open varchar, "
    "p_ready_nodes varchar[], p_ready_events uuid[], p_ready_types varchar[], p_types varchar[], p_may_end boolean, "
    "p_grace double precision, OUT code integer, OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar, "
    "OUT waiting jsonb",
    "record",
    f"""
DECLARE
    v_version bigint;
    v_created timestamptz;
    v_wait record;
    v_task bigint;
    v_holds boolean;
    v_type varchar;
    v_agrees boolean;
    v_ready bigint[];
    v_released integer[];
    v_retry boolean := p_outcome = '{S.RETRY}';
BEGIN
    clock := now();
    sent := '[]';
    waiting := '[]';
    SELECT version_id, created_at INTO v_version, v_created FROM {RUN} WHERE trace_id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        code := {GONE};
        RETURN;
    END IF;
    IF p_version IS NOT NULL AND v_version <> p_version THEN
        code := {OTHER_VERSION};
        RETURN;
    END IF;
    -- The nodes the plan read or writes (its ready nodes among them, expected WAITING), each in one
    -- lookup: whether each still has the status read, and the ready ones' rows.
    SELECT attempt.id, attempt.holds_slot, attempt.event_type_id,
        expected.agreeing = jsonb_array_length(p_expect), coalesce(expected.ready, '{{}}')
    INTO v_task, v_holds, v_type, v_agrees, v_ready
    FROM (
        SELECT count(*) FILTER (WHERE task.status = e.status) AS agreeing,
            array_agg(task.id ORDER BY array_position(p_ready_nodes, e.node))
                FILTER (WHERE e.node = ANY(p_ready_nodes)) AS ready
        FROM jsonb_to_recordset(p_expect) AS e(node varchar, status varchar)
        JOIN {TASK} AS task ON task.run_id = p_run AND task.node_key = e.node AND task.map_index IS NULL
    ) AS expected LEFT JOIN {TASK} AS attempt
        ON attempt.run_id = p_run AND attempt.current_event_id = p_event AND attempt.status IN ({_in(RESOLVABLE)})
        AND (NOT p_lost OR (attempt.status = '{S.STARTED}' AND attempt.lease_expires_at < now()))
        AND (NOT p_due OR (attempt.status = '{S.DEFERRED}' AND attempt.due_at <= now()));
    IF p_event IS NOT NULL AND v_task IS NULL THEN
        code := {NOT_CURRENT};
        RETURN;
    END IF;
    -- The last instance to end is likely among the last admitted: look from the highest index down.
    IF NOT v_agrees OR (p_open IS NOT NULL AND (
        SELECT 1 FROM {TASK}
        WHERE run_id = p_run AND node_key = p_open AND map_index IS NOT NULL AND status NOT IN ({_in(FINAL)})
          AND id IS DISTINCT FROM v_task
        ORDER BY map_index DESC LIMIT 1
    ) IS NULL) THEN
        code := {STALE};
        RETURN;
    END IF;
    code := {APPLIED};
    -- Every write in one statement: the new Events, the attempt's Event and task, Celery's result
    -- row, and the nodes that end at once. The task row's key to its new Event is checked at commit.
    WITH new_events AS (
        INSERT INTO {EVENT}
            (event_id, trace_id, event_type, task_name, payload, result, context, status, timestamp, updated_at)
        SELECT e.event_id, e.trace_id, e.event_type, e.task_name, e.payload, e.result, e.context, e.status,
            now(), now()
        FROM jsonb_to_recordset(p_events) AS e({_EVENT_RECORD})
    ), attempt_event AS (
        UPDATE {EVENT}
        SET status = CASE
                WHEN v_retry THEN '{Event.Status.FAILURE}'
                WHEN p_outcome = '{S.SKIPPED}' THEN '{Event.Status.REVOKED}'
                ELSE p_outcome
            END,
            result = CASE WHEN p_outcome = '{S.SUCCESS}' THEN p_result ELSE p_event_result END
        WHERE event_id = p_event
    ), outcome AS (
        UPDATE {TASK}
        SET status = p_outcome, error = p_error,
            result = CASE WHEN v_retry THEN result ELSE p_result END,
            finished_at = CASE WHEN v_retry THEN NULL ELSE now() END,
            holds_slot = v_retry AND holds_slot,
            current_event_id = CASE WHEN v_retry THEN p_retry_event ELSE current_event_id END,
            due_at = CASE WHEN v_retry THEN now() + {_seconds("p_retry_in")} END,
            lease_expires_at = CASE WHEN v_retry THEN now() + {_seconds("p_retry_in + p_grace")} END
        WHERE id = v_task
    ), celery_result AS (
        INSERT INTO {CELERY_RESULT} ({", ".join(CELERY_RESULT_COLUMNS)})
        SELECT {", ".join(CELERY_RESULT_COLUMNS)} FROM jsonb_populate_record(
            NULL::{CELERY_RESULT}, p_celery_result || jsonb_build_object('date_created', now(), 'date_done', now()))
        WHERE p_celery_result IS NOT NULL AND NOT v_retry
        ON CONFLICT (task_id) DO UPDATE SET {_CELERY_RESULT_REPLACED}
    ), instances AS (
        INSERT INTO {TASK} AS task
            (run_id, node_key, map_index, event_type_id, task_name, status, attempts, holds_slot, error, worker,
             queued_at, current_event_id)
        SELECT p_run, i.node, i.map_index, i.event_type, i.task_name, '{S.QUEUED}', 0, false, '', '', now(), i.event_id
        FROM jsonb_to_recordset(p_instances)
            AS i(node varchar, map_index integer, event_type varchar, task_name varchar, event_id uuid)
        ON CONFLICT (run_id, node_key, map_index) DO UPDATE
        SET status = '{S.QUEUED}', attempts = 0, holds_slot = false, error = '', worker = '', queued_at = now(),
            current_event_id = EXCLUDED.current_event_id, result = NULL, started_at = NULL, finished_at = NULL,
            lease_expires_at = NULL, due_at = NULL
    ), trimmed AS (
        DELETE FROM {TASK} AS task USING jsonb_to_recordset(p_steps) AS s(node varchar, keep integer)
        WHERE s.keep IS NOT NULL AND task.run_id = p_run AND task.node_key = s.node AND task.map_index >= s.keep
    )
    UPDATE {TASK} AS task
    SET status = s.status, result = s.result, error = coalesce(s.error, ''),
        started_at = CASE WHEN s.status = '{S.STARTED}' THEN now() ELSE task.started_at END,
        finished_at = CASE WHEN s.status IN ({_in(FINAL)}) THEN now() END,
        queued_at = CASE WHEN s.status = '{S.DEFERRED}' THEN now() ELSE task.queued_at END,
        attempts = CASE WHEN s.status = '{S.DEFERRED}' THEN 1 ELSE task.attempts END,
        current_event_id = coalesce(s.event_id, task.current_event_id),
        due_at = CASE WHEN s.due_in IS NOT NULL THEN now() + {_seconds("s.due_in")} END,
        wait_type = coalesce(s.wait_type, ''), wait_key = coalesce(s.wait_key, '')
    FROM jsonb_to_recordset(p_steps) AS s(
        node varchar, status varchar, result jsonb, error text, event_id uuid, due_in double precision,
        wait_type varchar, wait_key varchar)
    WHERE task.run_id = p_run AND task.node_key = s.node AND task.map_index IS NULL AND s.status <> '{S.QUEUED}';
    -- A wait_event reached now: under its type and key's lock (which a publisher of such an event takes
    -- too), the events of that type and key published since the run started, so none is missed.
    FOR v_wait IN
        SELECT s.node, s.event_id, s.wait_type, s.wait_key
        FROM jsonb_to_recordset(p_steps) AS s(node varchar, status varchar, event_id uuid, wait_type varchar,
            wait_key varchar)
        WHERE s.status = '{S.DEFERRED}' AND coalesce(s.wait_type, '') <> '' ORDER BY s.wait_type, s.wait_key
    LOOP
        PERFORM pg_advisory_xact_lock({WAIT_LOCK.format(type="v_wait.wait_type", key="v_wait.wait_key")});
        waiting := waiting || jsonb_build_object('node', v_wait.node, 'event_id', v_wait.event_id, 'events', (
            SELECT coalesce(jsonb_agg(jsonb_build_object(
                'event_id', e.event_id, 'event_type', e.event_type, 'key', e.key, 'payload', e.payload)
                ORDER BY e.timestamp, e.event_id), '[]')
            FROM (SELECT * FROM {EVENT}
                  WHERE event_type = v_wait.wait_type AND key = v_wait.wait_key AND timestamp >= v_created
                  ORDER BY timestamp, event_id LIMIT {WAIT_CANDIDATES}) AS e));
    END LOOP;
    IF cardinality(p_types) > 0 THEN
        v_released := array_fill(0, ARRAY[cardinality(p_types)]);
        IF v_holds AND NOT v_retry AND v_type = ANY(p_types) THEN
            v_released[array_position(p_types, v_type)] := 1;
        END IF;
        sent := eventflow_admit(p_types, v_released, v_ready, p_ready_events, p_ready_types, p_grace);
    END IF;
    IF p_may_end THEN
        run_status := eventflow_end_run(p_run);
    END IF;
END
""",
)

# A new run: its row (`p_run`, created now), a WAITING task row per node (`p_tasks`), then its first
# steps through `eventflow_advance`. One call: the trigger's inserts, admission and commit were
# statements each costing the web process more to send than PostgreSQL spends on them.
START_RUN_FUNCTION = (
    "eventflow_start_run",
    "p_run jsonb, p_tasks jsonb, p_expect jsonb, p_steps jsonb, p_events jsonb, p_instances jsonb, "
    "p_ready_nodes varchar[], p_ready_events uuid[], p_ready_types varchar[], p_types varchar[], p_may_end boolean, "
    "p_grace double precision, "
    "OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar, OUT waiting jsonb",
    "record",
    f"""
DECLARE
    v_run uuid := (p_run ->> 'trace_id')::uuid;
    v_code integer;
BEGIN
    INSERT INTO {RUN} ({columns(WorkflowRun)})
    SELECT {columns(WorkflowRun)}
    FROM jsonb_populate_record(NULL::{RUN}, p_run || jsonb_build_object('created_at', now()));
    INSERT INTO {TASK}
        (run_id, node_key, map_index, event_type_id, task_name, status, attempts, holds_slot, error, worker)
    SELECT v_run, t.node_key, NULL, t.event_type, t.task_name, '{S.WAITING}', 0, false, '', ''
    FROM jsonb_to_recordset(p_tasks) AS t(node_key varchar, event_type varchar, task_name varchar);
    SELECT a.code, a.clock, a.sent, a.run_status, a.waiting INTO v_code, clock, sent, run_status, waiting
    FROM eventflow_advance(
        v_run, NULL, NULL, false, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, p_expect, p_steps, p_events,
        p_instances, NULL, p_ready_nodes, p_ready_events, p_ready_types, p_types, p_may_end, p_grace) AS a;
END
""",
)

# A cancel: every unfinished task of a running run REVOKED (with its Event), the run CANCELED, and the
# slots given back admitted from the lines. Answers the run's status, the revoked attempts' Event ids
# (to revoke in Celery), and the Events admission sent.
CANCEL_FUNCTION = (
    "eventflow_cancel_run",
    "p_run uuid, p_grace double precision, OUT run_status varchar, OUT revoked uuid[], OUT sent jsonb",
    "record",
    f"""
DECLARE
    v_types varchar[];
    v_released integer[];
BEGIN
    sent := '[]';
    revoked := '{{}}';
    SELECT status INTO run_status FROM {RUN} WHERE trace_id = p_run FOR UPDATE;
    IF NOT FOUND OR run_status <> '{R.RUNNING}' THEN
        RETURN;
    END IF;
    WITH open AS (
        SELECT id, event_type_id, current_event_id, holds_slot FROM {TASK}
        WHERE run_id = p_run AND status NOT IN ({_in(FINAL)}) FOR UPDATE
    ), ended AS (
        UPDATE {TASK}
        SET status = '{S.REVOKED}', finished_at = now(), holds_slot = false, lease_expires_at = NULL, due_at = NULL
        WHERE id IN (SELECT id FROM open)
    ), attempts AS (
        UPDATE {EVENT} SET status = '{Event.Status.REVOKED}'
        WHERE event_id IN (SELECT current_event_id FROM open)
          AND status NOT IN ('{Event.Status.SUCCESS}', '{Event.Status.FAILURE}')
    ), per_type AS (
        SELECT event_type_id AS name, count(*) FILTER (WHERE holds_slot)::integer AS freed
        FROM open WHERE event_type_id IS NOT NULL GROUP BY event_type_id
    )
    SELECT (SELECT coalesce(array_agg(current_event_id), '{{}}') FROM open WHERE current_event_id IS NOT NULL),
           (SELECT array_agg(name ORDER BY name) FROM per_type),
           (SELECT array_agg(freed ORDER BY name) FROM per_type)
    INTO revoked, v_types, v_released;
    UPDATE {RUN} SET status = '{R.CANCELED}', finished_at = now() WHERE trace_id = p_run;
    run_status := '{R.CANCELED}';
    IF v_types IS NOT NULL THEN
        sent := eventflow_admit(v_types, v_released, '{{}}', '{{}}', '{{}}', p_grace);
    END IF;
END
""",
)

FUNCTIONS = (ADMIT_FUNCTION, END_RUN_FUNCTION, ADVANCE_FUNCTION, START_RUN_FUNCTION, CANCEL_FUNCTION)


# PL/pgSQL plans each statement of a function anew at every call while it finds a custom plan cheaper
# than a generic one, and planning these statements costs more than running them (0.4 to 0.6 ms of a
# finish's 0.8 to 1.4 here). Every statement here finds its rows through a key or a partial index
# whatever the values, so one plan serves every call; sequential scans are ruled out, so a plan made
# while a table was nearly empty (or its statistics stale) still reads it through its indexes.
FUNCTION_SETTINGS = "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off"


def create_function(name: str, arguments: str, returns: str, body: str) -> str:
    head = f"CREATE OR REPLACE FUNCTION {name}({arguments}) RETURNS {returns} LANGUAGE plpgsql {FUNCTION_SETTINGS}"
    return f"{head} AS $function${body}$function$"


def signature(name: str, arguments: str) -> str:
    """A function's name with its argument types, as DROP FUNCTION and `regprocedure` name it."""
    kept = [a.split(None, 1)[1] for a in (p.strip() for p in arguments.split(",")) if not a.startswith("OUT ")]
    return f"{name}({', '.join(kept)})"


def functions_sql() -> str:
    """The statements that install the engine's functions, in an order where each one's callees exist."""
    return ";\n".join(create_function(*function) for function in FUNCTIONS) + ";\n"


def functions_digest() -> str:
    """What a migration that installs the functions names (`DIGEST`), so the suite can tell that the
    latest such migration installs the functions defined here."""
    return hashlib.sha256(functions_sql().encode()).hexdigest()[:16]


# Every function of these names, whatever its arguments: a changed signature would otherwise leave the
# old one beside the new.
_DROP_ALL = """
DO $drop$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
             WHERE n.nspname = current_schema() AND p.proname = ANY(%s) LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$drop$
"""


def install_functions(apps: Any, schema_editor: Any) -> None:
    """A migration's operation: create the engine's functions as this code defines them, dropping any
    of their names first."""
    names = "ARRAY[" + ", ".join(f"'{name}'" for name, *_ in FUNCTIONS) + "]"
    schema_editor.execute(_DROP_ALL % names)
    schema_editor.execute(functions_sql())


def drop_functions(apps: Any, schema_editor: Any) -> None:
    """The reverse of `install_functions`."""
    for name, arguments, *_ in FUNCTIONS:
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {signature(name, arguments)}")
