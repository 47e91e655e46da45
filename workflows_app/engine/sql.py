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

from events_app.models import Event, EventType, EventTypeKey
from webhooks_app.models import Delivery, Notification, Webhook

from ..models import TaskRun, WorkflowDefinition, WorkflowRun
from ..pgsql import columns
from .rules import FINAL, LINE_ORDER, RATE_RESOLUTION, RERUN, RESOLVABLE, RUN_FAILS_ON, R, S

TASK = TaskRun._meta.db_table
RUN = WorkflowRun._meta.db_table
EVENT = Event._meta.db_table
EVENT_TYPE = EventType._meta.db_table
CELERY_RESULT = TaskResult._meta.db_table
KEY = EventTypeKey._meta.db_table
WEBHOOK = Webhook._meta.db_table
DELIVERY = Delivery._meta.db_table
WORKFLOW = WorkflowDefinition._meta.db_table


def _in(statuses: Iterable[str]) -> str:
    return ", ".join(f"'{s}'" for s in sorted(statuses))


def _line_order(alias: str) -> str:
    return ", ".join(f"{alias}.{column}" for column in LINE_ORDER)


# A key's line (`task_run_key_line_idx`): its type's QUEUED tasks of that key not holding a slot.
def _key_line(task: str, type_: str, key: str) -> str:
    return (
        f"{task}.event_type_id = {type_} AND {task}.fair_key = {key} AND {task}.status = '{S.QUEUED}' "
        f"AND NOT {task}.holds_slot"
    )


def _key_head(type_: str, key: str) -> str:
    """The priority of a key's best waiting task, or NULL."""
    return (
        f"(SELECT h.priority FROM {TASK} AS h WHERE {_key_line('h', type_, key)} ORDER BY {_line_order('h')} LIMIT 1)"
    )


def _seconds(parameter: str) -> str:
    return f"make_interval(secs => {parameter})"


# The lock a waiter of an event type and key takes when it is reached, and a publisher of such an event
# before it looks for waiters: one of the two sees the other.
WAIT_LOCK = "hashtextextended({type} || E'\\n' || {key}, 0)"
# The most events a waiter reached late reads back (the first that matches resumes it).
WAIT_CANDIDATES = 100

# The notifications a transition raises for webhooks (`webhooks_app.models.Notification`).
NOTIFY_TASK_FAILED = Notification.TASK_FAILED.value
NOTIFY_RUN = {
    R.SUCCESS: Notification.RUN_SUCCEEDED.value,
    R.FAILED: Notification.RUN_FAILED.value,
    R.CANCELED: Notification.RUN_CANCELED.value,
}
_RUN_NOTIFICATIONS = " ".join(f"WHEN '{status}' THEN '{name}'" for status, name in NOTIFY_RUN.items())

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
# An event type's lock, as admission takes it: NO KEY, so a transaction that inserted rows referring to
# the type (a task, a key) and checks their foreign key at commit (FOR KEY SHARE) never waits on it.
LOCK_TYPE = f"SELECT held FROM {EVENT_TYPE} WHERE name = %(name)s FOR NO KEY UPDATE"

# Event types whose fairness keys' counts disagree with their tasks: a key's slots held (kept while
# the type has a share), a key missing for tasks holding slots or waiting, or a key that may be served
# but is not marked so.
KEYS_DRIFTED = f"""
WITH held AS (
    SELECT event_type_id AS type, fair_key AS key, count(*) AS n FROM {TASK} WHERE holds_slot GROUP BY 1, 2
), waiting AS (
    SELECT DISTINCT event_type_id AS type, fair_key AS key FROM {TASK}
    WHERE status = '{S.QUEUED}' AND NOT holds_slot AND event_type_id IS NOT NULL
)
SELECT DISTINCT type FROM (
    SELECT k.event_type_id AS type FROM {KEY} AS k JOIN {EVENT_TYPE} AS et ON et.name = k.event_type_id
    LEFT JOIN held AS h ON h.type = k.event_type_id AND h.key = k.key
    WHERE et.per_key_concurrency IS NOT NULL AND k.held <> coalesce(h.n, 0)
    UNION ALL
    SELECT h.type FROM held AS h JOIN {EVENT_TYPE} AS et ON et.name = h.type
    LEFT JOIN {KEY} AS k ON k.event_type_id = h.type AND k.key = h.key
    WHERE et.per_key_concurrency IS NOT NULL AND k.id IS NULL
    UNION ALL
    SELECT w.type FROM waiting AS w JOIN {EVENT_TYPE} AS et ON et.name = w.type
    LEFT JOIN {KEY} AS k ON k.event_type_id = w.type AND k.key = w.key
    WHERE k.id IS NULL
       OR (k.head_priority IS NULL AND (et.per_key_concurrency IS NULL OR k.held < et.per_key_concurrency))
) AS drifted
"""
# A type's fairness keys set to what its tasks say (under the type's lock): how many keys changed.
RECOUNT_KEYS = f"""
WITH found AS (
    SELECT key FROM {KEY} WHERE event_type_id = %(name)s
    UNION
    SELECT fair_key FROM {TASK}
    WHERE event_type_id = %(name)s AND (holds_slot OR status = '{S.QUEUED}')
), counted AS (
    SELECT f.key, (SELECT count(*) FROM {TASK} AS t WHERE t.event_type_id = %(name)s AND t.fair_key = f.key
                   AND t.holds_slot)::integer AS held
    FROM found AS f
), fixed AS (
    INSERT INTO {KEY} AS k (event_type_id, key, held, head_priority, turn)
    SELECT %(name)s, c.key, c.held, CASE
            WHEN et.per_key_concurrency IS NULL OR c.held < et.per_key_concurrency THEN {_key_head("%(name)s", "c.key")}
        END, 0
    FROM counted AS c JOIN {EVENT_TYPE} AS et ON et.name = %(name)s
    ON CONFLICT (event_type_id, key) DO UPDATE SET held = EXCLUDED.held, head_priority = EXCLUDED.head_priority
    WHERE k.held IS DISTINCT FROM EXCLUDED.held OR k.head_priority IS DISTINCT FROM EXCLUDED.head_priority
    RETURNING 1
)
SELECT count(*) FROM fixed
"""
# Types whose rate-held line was due to be woken and was not (its message lost, or a worker whose clock
# runs behind took it early).
RATE_OVERDUE = f"SELECT name FROM {EVENT_TYPE} WHERE rate_wake_at < now() ORDER BY name"
# Tasks that waited QUEUED past their type's `queue_timeout`, oldest first (`task_run_line_idx`).
EXPIRED = f"""
SELECT t.run_id, t.current_event_id, et.name, et.queue_timeout FROM {EVENT_TYPE} AS et
CROSS JOIN LATERAL (
    SELECT run_id, current_event_id FROM {TASK}
    WHERE event_type_id = et.name AND status = '{S.QUEUED}' AND NOT holds_slot
      AND queued_at <= now() - {_seconds("et.queue_timeout")}
    ORDER BY queued_at, id LIMIT %(limit)s
) AS t
WHERE et.queue_timeout IS NOT NULL
"""

ADMIT = "SELECT eventflow_admit(%(types)s::varchar[], '[]', '{}', '{}', '{}', NULL, NULL, %(grace)s)"
CANCEL = "SELECT * FROM eventflow_cancel_run(%(run_id)s, %(grace)s)"
ADVANCE = """
SELECT * FROM eventflow_advance(
    %(run_id)s, %(version_id)s, %(event_id)s, %(lost)s, %(due)s, %(expired)s, %(outcome)s, %(result)s, %(error)s,
    %(event_result)s,
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

# A rate window's arithmetic (`rules.rate_used`, `rate_opens`, `rate_record`) on a type's record of
# dispatches: `p_times` ascending, `p_counts` how many at each.
RATE_USED_FUNCTION = (
    "eventflow_rate_used",
    "p_times timestamptz[], p_counts integer[], p_now timestamptz, p_period interval",
    "integer",
    """
BEGIN
    RETURN (SELECT coalesce(sum(u.c), 0) FROM unnest(p_times, p_counts) AS u(t, c) WHERE u.t > p_now - p_period);
END
""",
)
RATE_OPENS_FUNCTION = (
    "eventflow_rate_opens",
    "p_times timestamptz[], p_counts integer[], p_at timestamptz, p_count integer, p_period interval",
    "timestamptz",
    """
BEGIN
    RETURN GREATEST(p_at, (
        SELECT s.t + p_period FROM (
            SELECT u.t, sum(u.c) OVER (ORDER BY u.t DESC ROWS UNBOUNDED PRECEDING) AS total
            FROM unnest(p_times, p_counts) AS u(t, c)
        ) AS s WHERE s.total >= p_count ORDER BY s.t DESC LIMIT 1));
END
""",
)
RATE_RECORD_FUNCTION = (
    "eventflow_rate_record",
    "p_times timestamptz[], p_counts integer[], p_now timestamptz, p_at timestamptz, p_count integer, "
    "p_period interval, OUT times timestamptz[], OUT counts integer[]",
    "record",
    f"""
DECLARE
    v_i integer;
BEGIN
    SELECT coalesce(array_agg(u.t ORDER BY u.t), '{{}}'), coalesce(array_agg(u.c ORDER BY u.t), '{{}}')
    INTO times, counts
    FROM unnest(p_times, p_counts) AS u(t, c) WHERE u.t > p_now - p_period;
    IF p_count > 0 THEN
        SELECT max(u.n) INTO v_i FROM unnest(times) WITH ORDINALITY AS u(t, n)
        WHERE u.t BETWEEN p_at - p_period / {RATE_RESOLUTION} AND p_at;
        IF v_i IS NOT NULL THEN
            times[v_i] := p_at;
            counts[v_i] := counts[v_i] + p_count;
        ELSE
            SELECT array_agg(u.t ORDER BY u.t), array_agg(u.c ORDER BY u.t) INTO times, counts
            FROM (SELECT * FROM unnest(times, counts) UNION ALL SELECT p_at, p_count) AS u(t, c);
        END IF;
    END IF;
END
""",
)

# Admission: the one place a task is handed a slot (`rules.admit`, `rules.free_slots`). For each event
# type (locked in name order, so concurrent transitions never wait on each other's types, and NO KEY:
# a start's deferred foreign keys to its types, checked at its commit, take FOR KEY SHARE, which this
# lock lets through, where FOR UPDATE would deadlock a start with a finish holding another type; its
# row read after the lock, in a statement of its own, so it sees what the lock's previous holder wrote):
# 1. the slots the caller gave back (`p_released`: type, fairness key, count) leave their keys' counts;
# 2. a retry of this type (`p_retry`, due in `p_retry_in` seconds) is due once its backoff ends and the
#    rate window has room, and counts in it from then;
# 3. the tasks becoming ready in the caller's transition (`p_ready`, with their new Events and types)
#    join the line, and their keys become servable;
# 4. the free slots (its `concurrency` less its count of held slots, `EventType.held`, and no more than
#    its rate window's room) go to its keys in turn (`EventTypeKey`, found through a partial index of
#    the keys that may be served, so the cost depends neither on the number of keys nor on the lines'
#    lengths), each to the head of its key's line (`task_run_key_line_idx`);
# 5. a line held back by the rate window alone asks to be woken when the window next has room.
# Answers, in order: the admitted tasks (with the Event of each already waiting in the line, to send
# once the transaction commits, and the Event id of each the caller made ready), `{"retry_at"}` for a
# retry's due time, and `{"wake", "at"}` for a line to admit from again then.
ADMIT_FUNCTION = (
    "eventflow_admit",
    "p_types varchar[], p_released jsonb, p_ready bigint[], p_ready_events uuid[], p_ready_types varchar[], "
    "p_retry bigint, p_retry_in double precision, p_grace double precision",
    "jsonb",
    f"""
DECLARE
    v_type record;
    v_clock timestamptz;
    v_cap integer;
    v_rate integer;
    v_period interval;
    v_times timestamptz[];
    v_counts integer[];
    v_released integer;
    v_free integer;
    v_turn bigint;
    v_fresh bigint[];
    v_direct boolean;
    v_fkey varchar;
    v_key record;
    v_head record;
    v_skip varchar[];
    v_ids bigint[];
    v_at timestamptz;
    v_wake timestamptz;
    v_sent jsonb := '[]';
BEGIN
    PERFORM 1 FROM {EVENT_TYPE} WHERE name = ANY(p_types) ORDER BY name FOR NO KEY UPDATE;
    FOR v_type IN SELECT * FROM {EVENT_TYPE} WHERE name = ANY(p_types) ORDER BY name LOOP
        v_clock := clock_timestamp();
        v_cap := v_type.per_key_concurrency;
        -- Turns are the clock's microseconds, unique within a call: later than any earlier call's.
        v_turn := (extract(epoch FROM v_clock) * 1000000)::bigint;
        v_rate := NULL;
        v_times := v_type.rate_times;
        v_counts := v_type.rate_counts;
        IF v_type.rate_limit IS NOT NULL THEN
            v_rate := split_part(v_type.rate_limit, '/', 1)::integer;
            v_period := make_interval(secs => CASE split_part(v_type.rate_limit, '/', 2)
                WHEN 'second' THEN 1 WHEN 'minute' THEN 60 ELSE 3600 END);
        END IF;
        -- 1. Slots given back. A key's count of slots held is kept only while its type has a share
        -- (`per_key_concurrency`): setting one recounts them (`RECOUNT_KEYS`).
        v_released := 0;
        IF jsonb_array_length(p_released) = 1 AND v_cap IS NULL THEN  -- a finish's: without a query
            v_released := CASE WHEN p_released -> 0 ->> 'type' = v_type.name THEN (p_released -> 0 ->> 'n')::integer
                ELSE 0 END;
        ELSIF jsonb_array_length(p_released) > 0 AND v_cap IS NULL THEN
            SELECT coalesce(sum(r.n), 0) INTO v_released
            FROM jsonb_to_recordset(p_released) AS r(type varchar, key varchar, n integer) WHERE r.type = v_type.name;
        ELSIF jsonb_array_length(p_released) > 0 THEN
            WITH given AS (
                SELECT r.key, sum(r.n)::integer AS n
                FROM jsonb_to_recordset(p_released) AS r(type varchar, key varchar, n integer)
                WHERE r.type = v_type.name GROUP BY r.key
            ), back AS (
                UPDATE {KEY} AS k
                SET held = GREATEST(k.held - g.n, 0),
                    head_priority = CASE
                        WHEN v_cap IS NOT NULL AND k.held - g.n >= v_cap THEN NULL
                        WHEN k.head_priority IS NOT NULL THEN k.head_priority
                        ELSE {_key_head("v_type.name", "g.key")}
                    END
                FROM given AS g WHERE k.event_type_id = v_type.name AND k.key = g.key
            )
            SELECT coalesce(sum(g.n), 0) INTO v_released FROM given AS g;
        END IF;
        -- 2. A retry of this type.
        IF p_retry IS NOT NULL AND v_rate IS NOT NULL
           AND EXISTS (SELECT 1 FROM {TASK} WHERE id = p_retry AND event_type_id = v_type.name) THEN
            v_at := eventflow_rate_opens(v_times, v_counts, v_clock + {_seconds("p_retry_in")}, v_rate, v_period);
            SELECT r.times, r.counts INTO v_times, v_counts
            FROM eventflow_rate_record(v_times, v_counts, v_clock, v_at, 1, v_period) AS r;
            UPDATE {TASK}
            SET due_at = v_at, dispatched_at = v_at, lease_expires_at = v_at + {_seconds("p_grace")}
            WHERE id = p_retry;
            v_sent := v_sent || jsonb_build_object('retry_at', v_at);
        END IF;
        v_free := v_type.concurrency - v_type.held + v_released;
        IF v_rate IS NOT NULL THEN
            v_free := LEAST(v_free, v_rate - eventflow_rate_used(v_times, v_counts, v_clock, v_period));
        END IF;
        -- 3. Tasks becoming ready. They are one run's, so of one key (a run's key is its type's), unless
        -- a caller mixes runs. When nothing else of the type may be served, the free slots take them
        -- all and their key has room for them, they are what `rules.admit` picks, in their line's
        -- order: each is written once, holding its slot. Otherwise they join the line.
        v_fresh := '{{}}';
        v_ids := '{{}}';
        v_direct := false;
        IF cardinality(p_ready) = 1 AND p_ready_types[1] = v_type.name AND v_cap IS NULL
           AND v_type.fairness_key IS NULL THEN  -- a hop's: one task, no key to count, a single query
            v_fresh := p_ready;
            v_direct := v_free >= 1
                AND NOT EXISTS (SELECT 1 FROM {KEY} WHERE event_type_id = v_type.name AND head_priority IS NOT NULL);
        ELSIF v_type.name = ANY(p_ready_types) THEN
            v_fresh := ARRAY(
                SELECT f.id FROM unnest(p_ready, p_ready_types) AS f(id, type) WHERE f.type = v_type.name
                ORDER BY f.id);
            SELECT count(DISTINCT t.fair_key) = 1 AND v_free >= cardinality(v_fresh)
                AND NOT EXISTS (SELECT 1 FROM {KEY} WHERE event_type_id = v_type.name AND head_priority IS NOT NULL)
                AND (v_cap IS NULL OR coalesce((
                    SELECT k.held FROM {KEY} AS k WHERE k.event_type_id = v_type.name AND k.key = min(t.fair_key)
                ), 0) + cardinality(v_fresh) <= v_cap),
                min(t.fair_key)
            INTO v_direct, v_fkey
            FROM {TASK} AS t WHERE t.id = ANY(v_fresh);
        END IF;
        IF v_direct THEN
            WITH admitted AS (
                UPDATE {TASK} AS task
                SET status = '{S.QUEUED}', queued_at = now(), current_event_id = f.event_id, holds_slot = true,
                    lease_expires_at = now() + {_seconds("p_grace")}, dispatched_at = v_clock
                FROM unnest(p_ready, p_ready_events, p_ready_types) AS f(id, event_id, type)
                WHERE f.type = v_type.name AND task.id = f.id
                RETURNING task.id, task.priority, task.run_created_at
            )
            SELECT array_agg(a.id ORDER BY a.priority DESC, a.run_created_at, a.id) INTO v_ids FROM admitted AS a;
            IF v_cap IS NOT NULL OR v_type.fairness_key IS NOT NULL THEN
                v_turn := v_turn + cardinality(v_ids);
                INSERT INTO {KEY} AS k (event_type_id, key, held, head_priority, turn)
                VALUES (v_type.name, v_fkey, cardinality(v_ids), NULL, v_turn)
                ON CONFLICT (event_type_id, key) DO UPDATE SET held = k.held + EXCLUDED.held, turn = EXCLUDED.turn;
            END IF;
            v_free := 0;  -- nothing else may be served
        ELSIF cardinality(v_fresh) > 0 THEN
            WITH joined AS (
                UPDATE {TASK} AS task
                SET status = '{S.QUEUED}', queued_at = now(), current_event_id = f.event_id, holds_slot = false
                FROM unnest(p_ready, p_ready_events, p_ready_types) AS f(id, event_id, type)
                WHERE f.type = v_type.name AND task.id = f.id
                RETURNING task.id, task.fair_key, task.priority
            )
            INSERT INTO {KEY} AS k (event_type_id, key, held, head_priority, turn)
            SELECT v_type.name, j.fair_key, 0, max(j.priority), 0 FROM joined AS j GROUP BY j.fair_key
            ON CONFLICT (event_type_id, key) DO UPDATE
            SET head_priority = CASE
                WHEN v_cap IS NOT NULL AND k.held >= v_cap THEN NULL
                ELSE GREATEST(k.head_priority, EXCLUDED.head_priority)
            END;
        END IF;
        -- 4. The free slots, to the keys in turn.
        v_skip := '{{}}';
        WHILE v_free > 0 LOOP
            SELECT k.key, k.head_priority, k.held INTO v_key FROM {KEY} AS k
            WHERE k.event_type_id = v_type.name AND k.head_priority IS NOT NULL AND k.key <> ALL(v_skip)
            ORDER BY k.head_priority DESC, k.turn, k.key LIMIT 1;
            EXIT WHEN NOT FOUND;
            IF v_cap IS NOT NULL AND v_key.held >= v_cap THEN  -- its share was lowered meanwhile
                UPDATE {KEY} SET head_priority = NULL WHERE event_type_id = v_type.name AND key = v_key.key;
                CONTINUE;
            END IF;
            SELECT t.id, t.priority INTO v_head FROM {TASK} AS t
            WHERE {_key_line("t", "v_type.name", "v_key.key")}
            ORDER BY {_line_order("t")} LIMIT 1 FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                IF EXISTS (SELECT 1 FROM {TASK} AS t WHERE {_key_line("t", "v_type.name", "v_key.key")}) THEN
                    v_skip := v_skip || v_key.key;  -- its head is another transaction's: not this time
                ELSE
                    UPDATE {KEY} SET head_priority = NULL WHERE event_type_id = v_type.name AND key = v_key.key;
                END IF;
                CONTINUE;
            END IF;
            IF v_head.priority < v_key.head_priority THEN  -- its best task left the line meanwhile
                UPDATE {KEY} SET head_priority = v_head.priority WHERE event_type_id = v_type.name AND key = v_key.key;
                CONTINUE;
            END IF;
            v_turn := v_turn + 1;
            UPDATE {TASK}
            SET holds_slot = true, lease_expires_at = now() + {_seconds("p_grace")}, dispatched_at = v_clock
            WHERE id = v_head.id;
            UPDATE {KEY} AS k
            SET held = k.held + 1, turn = v_turn,
                head_priority = CASE
                    WHEN v_cap IS NOT NULL AND k.held + 1 >= v_cap THEN NULL
                    ELSE {_key_head("v_type.name", "v_key.key")}
                END
            WHERE k.event_type_id = v_type.name AND k.key = v_key.key;
            v_ids := v_ids || v_head.id;
            v_free := v_free - 1;
        END LOOP;
        -- 5. What was admitted, the type's counts, and a wake-up for a line the rate holds back.
        IF cardinality(v_ids) > 0 THEN
            v_sent := v_sent || (
                SELECT jsonb_agg(CASE WHEN t.id = ANY(v_fresh)
                    THEN jsonb_build_object('event_id', t.current_event_id)
                    ELSE jsonb_build_object(
                        'node', t.node_key,
                        'version_id', (SELECT version_id FROM {RUN} WHERE trace_id = t.run_id),
                        'event', (SELECT to_jsonb(event) FROM {EVENT} AS event
                                  WHERE event.event_id = t.current_event_id))
                    END ORDER BY c.n)
                FROM unnest(v_ids) WITH ORDINALITY AS c(id, n) JOIN {TASK} AS t ON t.id = c.id);
            IF v_rate IS NOT NULL THEN
                SELECT r.times, r.counts INTO v_times, v_counts
                FROM eventflow_rate_record(v_times, v_counts, v_clock, v_clock, cardinality(v_ids), v_period) AS r;
            END IF;
        END IF;
        v_wake := CASE WHEN v_type.rate_wake_at > v_clock THEN v_type.rate_wake_at END;
        IF v_rate IS NOT NULL AND eventflow_rate_used(v_times, v_counts, v_clock, v_period) >= v_rate
           AND v_type.held - v_released + cardinality(v_ids) < v_type.concurrency
           AND EXISTS (SELECT 1 FROM {KEY} WHERE event_type_id = v_type.name AND head_priority IS NOT NULL) THEN
            v_at := eventflow_rate_opens(v_times, v_counts, v_clock, v_rate, v_period);
            IF v_wake IS NULL OR v_wake > v_at THEN
                v_wake := v_at;
                v_sent := v_sent || jsonb_build_object('wake', v_type.name, 'at', v_at);
            END IF;
        END IF;
        IF cardinality(v_ids) <> v_released OR v_rate IS NOT NULL OR v_wake IS DISTINCT FROM v_type.rate_wake_at THEN
            UPDATE {EVENT_TYPE}
            SET held = GREATEST(held - v_released + cardinality(v_ids), 0),
                rate_times = v_times, rate_counts = v_counts, rate_wake_at = v_wake
            WHERE name = v_type.name;
        END IF;
    END LOOP;
    RETURN v_sent;
END
""",
)

# Webhooks' outbox: for each notification a transition raised (`p_raised`: notification, node, error),
# a Delivery per active webhook that wants it, written in the transition's transaction, with what it
# says (the run's trace_id, status and workflow, and the node and error of a task's), due now and
# claimed for `p_grace` seconds by the message the caller sends once it commits (past that, the
# reconciler sends it). Answers `{"deliver": id}` for each, to send.
NOTIFY_FUNCTION = (
    "eventflow_notify",
    "p_run uuid, p_raised jsonb, p_status varchar, p_grace double precision",
    "jsonb",
    f"""
DECLARE
    v_made jsonb;
BEGIN
    WITH made AS (
        INSERT INTO {DELIVERY}
            (id, webhook_id, notification, trace_id, data, created_at, state, attempts, next_attempt_at, claimed_until)
        SELECT gen_random_uuid(), w.id, r.notification, p_run, jsonb_strip_nulls(jsonb_build_object(
                'trace_id', p_run, 'status', p_status, 'node', r.node, 'error', r.error,
                'workflow', (SELECT wf.name FROM {RUN} AS run JOIN {WORKFLOW} AS wf ON wf.id = run.workflow_id
                             WHERE run.trace_id = p_run))),
            now(), 'pending', 0, now(), now() + {_seconds("p_grace")}
        FROM jsonb_to_recordset(p_raised) AS r(notification varchar, node varchar, error text)
        JOIN {WEBHOOK} AS w ON w.is_active AND r.notification = ANY(w.notifications)
        RETURNING id
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('deliver', id)), '[]') INTO v_made FROM made;
    RETURN v_made;
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
    "p_run uuid, p_version bigint, p_event uuid, p_lost boolean, p_due boolean, p_expired boolean, p_outcome varchar, "
    "p_result jsonb, "
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
    v_priority smallint;
    v_wait record;
    v_task bigint;
    v_holds boolean;
    v_type varchar;
    v_key varchar;
    v_node varchar;
    v_raised jsonb;
    v_agrees boolean;
    v_ready bigint[];
    v_ready_events uuid[];
    v_ready_types varchar[];
    v_released jsonb := '[]';
    v_retry boolean := p_outcome = '{S.RETRY}';
BEGIN
    clock := now();
    sent := '[]';
    waiting := '[]';
    SELECT version_id, created_at, priority INTO v_version, v_created, v_priority
    FROM {RUN} WHERE trace_id = p_run FOR UPDATE;
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
    SELECT attempt.id, attempt.holds_slot, attempt.event_type_id, attempt.fair_key, attempt.node_key,
        expected.agreeing = jsonb_array_length(p_expect), coalesce(expected.ready, '{{}}')
    INTO v_task, v_holds, v_type, v_key, v_node, v_agrees, v_ready
    FROM (
        SELECT count(*) FILTER (WHERE task.status = e.status) AS agreeing,
            array_agg(task.id ORDER BY array_position(p_ready_nodes, e.node))
                FILTER (WHERE e.node = ANY(p_ready_nodes)) AS ready
        FROM jsonb_to_recordset(p_expect) AS e(node varchar, status varchar)
        JOIN {TASK} AS task ON task.run_id = p_run AND task.node_key = e.node AND task.map_index IS NULL
    ) AS expected LEFT JOIN {TASK} AS attempt
        ON attempt.run_id = p_run AND attempt.current_event_id = p_event AND attempt.status IN ({_in(RESOLVABLE)})
        AND (NOT p_lost OR (attempt.status = '{S.STARTED}' AND attempt.lease_expires_at < now()))
        AND (NOT p_due OR (attempt.status = '{S.DEFERRED}' AND attempt.due_at <= now()))
        AND (NOT p_expired OR (attempt.status = '{S.QUEUED}' AND NOT attempt.holds_slot AND attempt.queued_at <= now()
            - {_seconds(f"(SELECT queue_timeout FROM {EVENT_TYPE} WHERE name = attempt.event_type_id)")}));
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
            lease_expires_at = CASE WHEN v_retry THEN now() + {_seconds("p_retry_in + p_grace")} END,
            dispatched_at = CASE WHEN v_retry THEN now() + {_seconds("p_retry_in")} ELSE dispatched_at END
        WHERE id = v_task
    ), celery_result AS (
        INSERT INTO {CELERY_RESULT} ({", ".join(CELERY_RESULT_COLUMNS)})
        SELECT {", ".join(CELERY_RESULT_COLUMNS)} FROM jsonb_populate_record(
            NULL::{CELERY_RESULT}, p_celery_result || jsonb_build_object('date_created', now(), 'date_done', now()))
        WHERE p_celery_result IS NOT NULL AND NOT v_retry
        ON CONFLICT (task_id) DO UPDATE SET {_CELERY_RESULT_REPLACED}
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
    -- Instances, new or started again, WAITING with their Events: admission makes them QUEUED with the
    -- other tasks becoming ready. Each takes its node row's fairness key.
    IF jsonb_array_length(p_instances) > 0 THEN
        WITH instances AS (
            INSERT INTO {TASK} AS task
                (run_id, node_key, map_index, event_type_id, task_name, status, attempts, holds_slot, error, worker,
                 current_event_id, priority, run_created_at, fair_key)
            SELECT p_run, i.node, i.map_index, i.event_type, i.task_name, '{S.WAITING}', 0, false, '', '', i.event_id,
                v_priority, v_created, coalesce((
                    SELECT n.fair_key FROM {TASK} AS n
                    WHERE n.run_id = p_run AND n.node_key = i.node AND n.map_index IS NULL
                ), '')
            FROM jsonb_to_recordset(p_instances)
                AS i(node varchar, map_index integer, event_type varchar, task_name varchar, event_id uuid)
            ON CONFLICT (run_id, node_key, map_index) DO UPDATE
            SET status = '{S.WAITING}', attempts = 0, holds_slot = false, error = '', worker = '', queued_at = NULL,
                current_event_id = EXCLUDED.current_event_id, result = NULL, started_at = NULL, finished_at = NULL,
                lease_expires_at = NULL, due_at = NULL, dispatched_at = NULL
            RETURNING task.id, task.current_event_id, task.event_type_id, task.map_index, task.node_key
        )
        SELECT v_ready || array_agg(id ORDER BY node_key, map_index),
            p_ready_events || array_agg(current_event_id ORDER BY node_key, map_index),
            p_ready_types || array_agg(event_type_id ORDER BY node_key, map_index)
        INTO v_ready, v_ready_events, v_ready_types FROM instances;
    ELSE
        v_ready_events := p_ready_events;
        v_ready_types := p_ready_types;
    END IF;
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
        IF v_holds AND NOT v_retry THEN
            v_released := jsonb_build_array(jsonb_build_object('type', v_type, 'key', v_key, 'n', 1));
        END IF;
        sent := eventflow_admit(p_types, v_released, v_ready, v_ready_events, v_ready_types,
            CASE WHEN v_retry THEN v_task END, p_retry_in, p_grace);
    END IF;
    IF p_may_end THEN
        run_status := eventflow_end_run(p_run);
    END IF;
    -- What it raises for webhooks: a task that failed, an approval reached, the run's end.
    IF p_outcome = '{S.FAILURE}' OR run_status IS NOT NULL
       OR jsonb_path_exists(p_steps, '$[*] ? (@.status == "{S.FAILURE}" || @.notify != null)') THEN
        SELECT coalesce(jsonb_agg(r), '[]') INTO v_raised FROM (
            SELECT '{NOTIFY_TASK_FAILED}' AS notification, v_node AS node, p_error AS error
            WHERE p_outcome = '{S.FAILURE}'
            UNION ALL
            SELECT CASE WHEN s.status = '{S.FAILURE}' THEN '{NOTIFY_TASK_FAILED}' ELSE s.notify END, s.node, s.error
            FROM jsonb_to_recordset(p_steps) AS s(node varchar, status varchar, error text, notify varchar)
            WHERE s.status = '{S.FAILURE}' OR s.notify IS NOT NULL
            UNION ALL
            SELECT CASE run_status {_RUN_NOTIFICATIONS} END, NULL, NULL WHERE run_status IS NOT NULL
        ) AS r;
        IF jsonb_array_length(v_raised) > 0 THEN
            sent := sent || eventflow_notify(p_run, v_raised, coalesce(run_status, '{R.RUNNING}'), p_grace);
        END IF;
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
        (run_id, node_key, map_index, event_type_id, task_name, status, attempts, holds_slot, error, worker,
         priority, run_created_at, fair_key)
    SELECT v_run, t.node_key, NULL, t.event_type, t.task_name, '{S.WAITING}', 0, false, '', '',
        coalesce((p_run ->> 'priority')::smallint, 5), now(), coalesce(t.fair_key, '')
    FROM jsonb_to_recordset(p_tasks) AS t(node_key varchar, event_type varchar, task_name varchar, fair_key varchar);
    SELECT a.code, a.clock, a.sent, a.run_status, a.waiting INTO v_code, clock, sent, run_status, waiting
    FROM eventflow_advance(
        v_run, NULL, NULL, false, false, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, p_expect, p_steps, p_events,
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
    v_released jsonb;
BEGIN
    sent := '[]';
    revoked := '{{}}';
    SELECT status INTO run_status FROM {RUN} WHERE trace_id = p_run FOR UPDATE;
    IF NOT FOUND OR run_status <> '{R.RUNNING}' THEN
        RETURN;
    END IF;
    WITH open AS (
        SELECT id, event_type_id, fair_key, current_event_id, holds_slot FROM {TASK}
        WHERE run_id = p_run AND status NOT IN ({_in(FINAL)}) FOR UPDATE
    ), ended AS (
        UPDATE {TASK}
        SET status = '{S.REVOKED}', finished_at = now(), holds_slot = false, lease_expires_at = NULL, due_at = NULL
        WHERE id IN (SELECT id FROM open)
    ), attempts AS (
        UPDATE {EVENT} SET status = '{Event.Status.REVOKED}'
        WHERE event_id IN (SELECT current_event_id FROM open)
          AND status NOT IN ('{Event.Status.SUCCESS}', '{Event.Status.FAILURE}')
    ), freed AS (
        SELECT event_type_id AS type, fair_key AS key, count(*)::integer AS n
        FROM open WHERE holds_slot AND event_type_id IS NOT NULL GROUP BY event_type_id, fair_key
    )
    SELECT (SELECT coalesce(array_agg(current_event_id), '{{}}') FROM open WHERE current_event_id IS NOT NULL),
           (SELECT array_agg(DISTINCT type ORDER BY type) FROM freed),
           (SELECT coalesce(jsonb_agg(to_jsonb(freed)), '[]') FROM freed)
    INTO revoked, v_types, v_released;
    UPDATE {RUN} SET status = '{R.CANCELED}', finished_at = now() WHERE trace_id = p_run;
    run_status := '{R.CANCELED}';
    sent := sent || eventflow_notify(
        p_run, jsonb_build_array(jsonb_build_object('notification', '{NOTIFY_RUN[R.CANCELED]}')), run_status, p_grace);
    IF v_types IS NOT NULL THEN
        sent := sent || eventflow_admit(v_types, v_released, '{{}}', '{{}}', '{{}}', NULL, NULL, p_grace);
    END IF;
END
""",
)

FUNCTIONS = (
    RATE_USED_FUNCTION,
    RATE_OPENS_FUNCTION,
    RATE_RECORD_FUNCTION,
    ADMIT_FUNCTION,
    NOTIFY_FUNCTION,
    END_RUN_FUNCTION,
    ADVANCE_FUNCTION,
    START_RUN_FUNCTION,
    CANCEL_FUNCTION,
)


# PL/pgSQL plans each statement of a function anew at every call while it finds a custom plan cheaper
# than a generic one, and planning these statements costs more than running them (0.4 to 0.6 ms of a
# finish's 0.8 to 1.4 here). Every statement here finds its rows through a key or a partial index
# whatever the values, so one plan serves every call; sequential scans are ruled out, so a plan made
# while a table was nearly empty (or its statistics stale) still reads it through its indexes. Ruling
# them out prices a scan of a tiny table (the webhooks) past the JIT's thresholds, and compiling one
# statement cost 0.5 s: no JIT for statements this short.
FUNCTION_SETTINGS = "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off"


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
