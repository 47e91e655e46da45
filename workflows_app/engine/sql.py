"""The engine's statements and database functions: they carry out what `rules` decided, in as few
round trips as it takes, on the database's clock.

Every time another process compares (a lease, a dispatch deadline, a retry's due time) and every time
stored with a transition is the database's `now()`, never a host's. The functions are installed by
migrations (`manage.py engine_functions` writes the migration of a changed definition); the test
suite checks that the database holds the functions defined here.
"""

from __future__ import annotations

from collections.abc import Iterable

from django_celery_results.models import TaskResult

from events_app.models import Event, EventType

from ..models import TaskRun, WorkflowRun
from ..pgsql import columns
from .rules import FINAL, LINE_ORDER, LIVE, RERUN, RUN_FAILS_ON, R, S

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
       (SELECT extract(epoch FROM due_at - now()) FROM {TASK}
        WHERE current_event_id = %(event_id)s AND status = '{S.RETRY}' AND due_at > now()),
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
# payload, the states of some of its nodes, and the attempt of `event_id` (its node, its number and
# its Event). Read without a lock: the decision it feeds is carried out only if the database still
# agrees (`eventflow_advance`'s `p_expect`).
READ = f"""
SELECT run.version_id, run.payload,
    (SELECT coalesce(jsonb_agg(jsonb_build_object('node', t.node_key, 'status', t.status, 'result', t.result)), '[]')
     FROM {TASK} AS t WHERE t.run_id = run.trace_id AND t.node_key = ANY(%(nodes)s::varchar[])),
    (SELECT jsonb_build_object('node', t.node_key, 'attempts', t.attempts, 'event', to_jsonb(e))
     FROM {TASK} AS t JOIN {EVENT} AS e ON e.event_id = t.current_event_id
     WHERE t.run_id = run.trace_id AND t.current_event_id = %(event_id)s)
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

# A retried run: its run row locked, then its tasks that ended without success WAITING again.
LOCK_RUN = f"SELECT status, version_id, payload FROM {RUN} WHERE trace_id = %(run_id)s FOR UPDATE"
RERUN = f"""
WITH reset AS (
    UPDATE {TASK}
    SET status = '{S.WAITING}', queued_at = NULL, started_at = NULL, finished_at = NULL, result = NULL, error = '',
        holds_slot = false, attempts = 0, lease_expires_at = NULL, due_at = NULL
    WHERE run_id = %(run_id)s AND status IN ({_in(RERUN)})
    RETURNING node_key
), running AS (
    UPDATE {RUN} SET status = '{R.RUNNING}', finished_at = NULL WHERE trace_id = %(run_id)s
)
SELECT array_agg(node_key) FROM reset
"""
STATES = f"SELECT node_key, status, result FROM {TASK} WHERE run_id = %(run_id)s"

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

ADMIT = "SELECT eventflow_admit(%(types)s::varchar[], %(released)s::integer[], '{}', '{}', %(grace)s)"
CANCEL = "SELECT * FROM eventflow_cancel_run(%(run_id)s, %(grace)s)"
ADVANCE = """
SELECT * FROM eventflow_advance(
    %(run_id)s, %(version_id)s, %(event_id)s, %(lost)s, %(outcome)s, %(result)s, %(error)s, %(event_result)s,
    %(celery_result)s, %(retry_event)s, %(retry_in)s, %(expect)s, %(steps)s, %(events)s, %(types)s::varchar[],
    %(may_end)s, %(grace)s)
"""
START_RUN = """
SELECT * FROM eventflow_start_run(
    %(run)s, %(tasks)s, %(steps)s, %(events)s, %(types)s::varchar[], %(may_end)s, %(grace)s)
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
_EVENT_RECORD = (
    "event_id uuid, trace_id uuid, event_type varchar, task_name varchar, payload jsonb, result jsonb, "
    "context jsonb, status varchar"
)

# Admission: the one place a task is handed a slot. For each event type (locked in name order, so
# concurrent transitions never wait on each other's types): the slots free are its `concurrency` less
# its count of held slots (`EventType.held`, written only here, under that lock), counting the slots
# the caller gave back (`p_released`); the candidates are the head of its line (QUEUED tasks not
# holding a slot, read through a partial index in `rules.LINE_ORDER`, so the cost depends neither on
# the line's length nor on the slots held) and the tasks becoming ready in the caller's transition
# (`p_ready`, WAITING, with their new Events), which join the line in that order; the first ones take
# the free slots. Each task is written once: QUEUED, holding a slot or not. Answers the admitted
# tasks' Events, as messages to send once the transaction commits. The line is read after the lock,
# in a statement of its own, so it sees the slots the previous holder of the lock just took.
ADMIT_FUNCTION = (
    "eventflow_admit",
    "p_types varchar[], p_released integer[], p_ready bigint[], p_ready_events uuid[], p_grace double precision",
    "jsonb",
    f"""
DECLARE
    v_i integer;
    v_free integer;
    v_head bigint[];
    v_ids bigint[];
    v_events uuid[];
    v_admitted boolean[];
    v_taken integer;
    v_batch jsonb;
    v_sent jsonb := '[]';
BEGIN
    PERFORM 1 FROM {EVENT_TYPE} WHERE name = ANY(p_types) ORDER BY name FOR UPDATE;
    FOR v_i IN 1 .. coalesce(cardinality(p_types), 0) LOOP
        SELECT concurrency - held + p_released[v_i] INTO v_free FROM {EVENT_TYPE} WHERE name = p_types[v_i];
        CONTINUE WHEN v_free IS NULL;
        SELECT array_agg(head.id) INTO v_head FROM (
            SELECT id FROM {TASK}
            WHERE event_type_id = p_types[v_i] AND status = '{S.QUEUED}' AND NOT holds_slot
            ORDER BY {_line_order(TASK)} LIMIT GREATEST(v_free, 0) FOR UPDATE SKIP LOCKED
        ) AS head;
        SELECT array_agg(c.id ORDER BY c.n), array_agg(c.event_id ORDER BY c.n), array_agg(c.n <= v_free ORDER BY c.n)
        INTO v_ids, v_events, v_admitted
        FROM (
            SELECT u.id, u.event_id, row_number() OVER (ORDER BY {_line_order("u")}) AS n FROM (
                SELECT task.id, ready.event_id, now() AS queued_at
                FROM unnest(p_ready, p_ready_events) AS ready(id, event_id)
                JOIN {TASK} AS task ON task.id = ready.id
                WHERE task.event_type_id = p_types[v_i] AND task.status = '{S.WAITING}'
                UNION ALL
                SELECT task.id, NULL, task.queued_at FROM {TASK} AS task WHERE task.id = ANY(v_head)
            ) AS u
        ) AS c
        WHERE c.event_id IS NOT NULL OR c.n <= v_free;
        v_taken := 0;
        IF v_ids IS NOT NULL THEN
            WITH written AS (
                UPDATE {TASK} AS task
                SET status = '{S.QUEUED}',
                    queued_at = CASE WHEN c.event_id IS NULL THEN task.queued_at ELSE now() END,
                    current_event_id = coalesce(c.event_id, task.current_event_id),
                    holds_slot = c.admitted,
                    lease_expires_at = CASE WHEN c.admitted THEN now() + {_seconds("p_grace")} END
                FROM unnest(v_ids, v_events, v_admitted) AS c(id, event_id, admitted)
                WHERE task.id = c.id AND task.id = ANY(v_ids)
                RETURNING task.id, task.run_id, task.node_key, task.current_event_id, task.queued_at, c.admitted
            )
            SELECT count(*),
                coalesce(jsonb_agg(jsonb_build_object(
                    'node', w.node_key, 'version_id', run.version_id, 'event', to_jsonb(event)
                ) ORDER BY {_line_order("w")}), '[]')
            INTO v_taken, v_batch
            FROM written AS w
            JOIN {RUN} AS run ON run.trace_id = w.run_id
            JOIN {EVENT} AS event ON event.event_id = w.current_event_id
            WHERE w.admitted;
            v_sent := v_sent || v_batch;
        END IF;
        IF p_released[v_i] > 0 OR v_taken > 0 THEN
            UPDATE {EVENT_TYPE} SET held = GREATEST(held - p_released[v_i] + v_taken, 0) WHERE name = p_types[v_i];
        END IF;
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
# attempt's Event (the first of `p_events`, due in `p_retry_in` seconds, keeping the slot). Nothing is
# written unless the run's version is `p_version` (when given; OTHER_VERSION) and every node of
# `p_expect` still has the status the decision read (STALE). Then the steps: new Events, nodes that
# end at once, and the QUEUED ones through admission (`eventflow_admit`, with the slot given back),
# and the run's end when `p_may_end`. Answers the code, the database's clock, the Events to send (with
# the node and version of each), and the run's status if it ended.
ADVANCE_FUNCTION = (
    "eventflow_advance",
    "p_run uuid, p_version bigint, p_event uuid, p_lost boolean, p_outcome varchar, p_result jsonb, "
    "p_error text, p_event_result jsonb, p_celery_result jsonb, p_retry_event uuid, "
    "p_retry_in double precision, p_expect jsonb, p_steps jsonb, p_events jsonb, p_types varchar[], "
    "p_may_end boolean, p_grace double precision, "
    "OUT code integer, OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar",
    "record",
    f"""
DECLARE
    v_version bigint;
    v_task record;
    v_types varchar[] := coalesce(p_types, '{{}}');
    v_freed varchar;
    v_released integer[];
    v_ready bigint[];
    v_ready_events uuid[];
BEGIN
    clock := now();
    sent := '[]';
    SELECT version_id INTO v_version FROM {RUN} WHERE trace_id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        code := {GONE};
        RETURN;
    END IF;
    IF p_version IS NOT NULL AND v_version <> p_version THEN
        code := {OTHER_VERSION};
        RETURN;
    END IF;
    IF p_event IS NOT NULL THEN
        SELECT id, node_key, holds_slot, event_type_id INTO v_task FROM {TASK}
        WHERE run_id = p_run AND current_event_id = p_event AND status IN ({_in(LIVE)})
          AND (NOT p_lost OR (status = '{S.STARTED}' AND lease_expires_at < now()));
        IF NOT FOUND THEN
            code := {NOT_CURRENT};
            RETURN;
        END IF;
    END IF;
    IF (SELECT count(*) FROM jsonb_to_recordset(p_expect) AS e(node varchar, status varchar)
        JOIN {TASK} AS task ON task.run_id = p_run AND task.node_key = e.node AND task.status = e.status
       ) <> jsonb_array_length(p_expect) THEN
        code := {STALE};
        RETURN;
    END IF;
    code := {APPLIED};
    INSERT INTO {
        EVENT
    } (event_id, trace_id, event_type, task_name, payload, result, context, status, timestamp, updated_at)
    SELECT e.event_id, e.trace_id, e.event_type, e.task_name, e.payload, e.result, e.context, e.status, now(), now()
    FROM jsonb_to_recordset(p_events) AS e({_EVENT_RECORD});
    IF p_event IS NOT NULL THEN
        UPDATE {EVENT}
        SET status = CASE WHEN p_outcome = '{S.RETRY}' THEN '{Event.Status.FAILURE}' ELSE p_outcome END,
            result = p_event_result
        WHERE event_id = p_event;
        IF p_outcome = '{S.RETRY}' THEN
            UPDATE {TASK}
            SET status = '{S.RETRY}', error = p_error, current_event_id = p_retry_event,
                due_at = now() + {_seconds("p_retry_in")},
                lease_expires_at = now() + {_seconds("p_retry_in + p_grace")}
            WHERE id = v_task.id;
            SELECT jsonb_build_array(jsonb_build_object(
                'node', v_task.node_key, 'version_id', v_version, 'event', to_jsonb(event),
                'due_in', p_retry_in))
            INTO sent FROM {EVENT} AS event WHERE event.event_id = p_retry_event;
            RETURN;
        END IF;
        UPDATE {TASK}
        SET status = p_outcome, result = p_result, error = p_error, finished_at = now(),
            holds_slot = false, lease_expires_at = NULL, due_at = NULL
        WHERE id = v_task.id;
        INSERT INTO {CELERY_RESULT} ({", ".join(CELERY_RESULT_COLUMNS)})
        SELECT {", ".join(CELERY_RESULT_COLUMNS)} FROM jsonb_populate_record(
            NULL::{CELERY_RESULT}, p_celery_result || jsonb_build_object('date_created', now(), 'date_done', now()))
        WHERE p_celery_result IS NOT NULL
        ON CONFLICT (task_id) DO UPDATE SET {
        ", ".join(f"{c} = EXCLUDED.{c}" for c in CELERY_RESULT_COLUMNS if c not in ("task_id", "date_created"))
    };
        IF v_task.holds_slot AND v_task.event_type_id IS NOT NULL THEN
            v_freed := v_task.event_type_id;
            SELECT array_agg(DISTINCT t ORDER BY t) INTO v_types FROM unnest(v_types || v_freed) AS t;
        END IF;
    END IF;
    UPDATE {TASK} AS task
    SET status = s.status, result = s.result, error = coalesce(s.error, ''),
        finished_at = CASE WHEN s.status IN ({_in(FINAL)}) THEN now() END
    FROM jsonb_to_recordset(p_steps) AS s(node varchar, status varchar, result jsonb, error text)
    WHERE task.run_id = p_run AND task.node_key = s.node AND s.status <> '{S.QUEUED}';
    SELECT array_agg(task.id), array_agg(s.event_id) INTO v_ready, v_ready_events
    FROM jsonb_to_recordset(p_steps) AS s(node varchar, status varchar, event_id uuid)
    JOIN {TASK} AS task ON task.run_id = p_run AND task.node_key = s.node
    WHERE s.status = '{S.QUEUED}';
    IF cardinality(v_types) > 0 THEN
        SELECT array_agg(CASE WHEN t = v_freed THEN 1 ELSE 0 END ORDER BY i)
        INTO v_released FROM unnest(v_types) WITH ORDINALITY AS u(t, i);
        sent := eventflow_admit(
            v_types, v_released, coalesce(v_ready, '{{}}'), coalesce(v_ready_events, '{{}}'), p_grace);
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
    "p_run jsonb, p_tasks jsonb, p_steps jsonb, p_events jsonb, p_types varchar[], p_may_end boolean, "
    "p_grace double precision, OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar",
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
    SELECT a.code, a.clock, a.sent, a.run_status INTO v_code, clock, sent, run_status
    FROM eventflow_advance(
        v_run, NULL, NULL, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '[]', p_steps, p_events, p_types,
        p_may_end, p_grace) AS a;
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
        sent := eventflow_admit(v_types, v_released, '{{}}', '{{}}', p_grace);
    END IF;
END
""",
)

FUNCTIONS = (ADMIT_FUNCTION, END_RUN_FUNCTION, ADVANCE_FUNCTION, START_RUN_FUNCTION, CANCEL_FUNCTION)


def create_function(name: str, arguments: str, returns: str, body: str) -> str:
    head = f"CREATE OR REPLACE FUNCTION {name}({arguments}) RETURNS {returns} LANGUAGE plpgsql"
    return f"{head} AS $function${body}$function$"


def signature(name: str, arguments: str) -> str:
    """A function's name with its argument types, as DROP FUNCTION and `regprocedure` name it."""
    kept = [a.split(None, 1)[1] for a in (p.strip() for p in arguments.split(",")) if not a.startswith("OUT ")]
    return f"{name}({', '.join(kept)})"


def functions_sql() -> str:
    """The statements that install the engine's functions, in an order where each one's callees exist."""
    return ";\n".join(create_function(*function) for function in FUNCTIONS) + ";\n"
