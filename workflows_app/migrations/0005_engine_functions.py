"""Installs the engine's database functions as `workflows_app.engine.sql` defines them (written by
`manage.py engine_functions --migration`)."""

from django.db import migrations

FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION eventflow_admit(p_types varchar[], p_released integer[], p_ready bigint[], p_ready_events uuid[], p_grace double precision) RETURNS jsonb LANGUAGE plpgsql AS $function$
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
    PERFORM 1 FROM events_app_eventtype WHERE name = ANY(p_types) ORDER BY name FOR UPDATE;
    FOR v_i IN 1 .. coalesce(cardinality(p_types), 0) LOOP
        SELECT concurrency - held + p_released[v_i] INTO v_free FROM events_app_eventtype WHERE name = p_types[v_i];
        CONTINUE WHEN v_free IS NULL;
        SELECT array_agg(head.id) INTO v_head FROM (
            SELECT id FROM workflows_app_taskrun
            WHERE event_type_id = p_types[v_i] AND status = 'QUEUED' AND NOT holds_slot
            ORDER BY workflows_app_taskrun.queued_at, workflows_app_taskrun.id LIMIT GREATEST(v_free, 0) FOR UPDATE SKIP LOCKED
        ) AS head;
        SELECT array_agg(c.id ORDER BY c.n), array_agg(c.event_id ORDER BY c.n), array_agg(c.n <= v_free ORDER BY c.n)
        INTO v_ids, v_events, v_admitted
        FROM (
            SELECT u.id, u.event_id, row_number() OVER (ORDER BY u.queued_at, u.id) AS n FROM (
                SELECT task.id, ready.event_id, now() AS queued_at
                FROM unnest(p_ready, p_ready_events) AS ready(id, event_id)
                JOIN workflows_app_taskrun AS task ON task.id = ready.id
                WHERE task.event_type_id = p_types[v_i] AND task.status = 'WAITING'
                UNION ALL
                SELECT task.id, NULL, task.queued_at FROM workflows_app_taskrun AS task WHERE task.id = ANY(v_head)
            ) AS u
        ) AS c
        WHERE c.event_id IS NOT NULL OR c.n <= v_free;
        v_taken := 0;
        IF v_ids IS NOT NULL THEN
            WITH written AS (
                UPDATE workflows_app_taskrun AS task
                SET status = 'QUEUED',
                    queued_at = CASE WHEN c.event_id IS NULL THEN task.queued_at ELSE now() END,
                    current_event_id = coalesce(c.event_id, task.current_event_id),
                    holds_slot = c.admitted,
                    lease_expires_at = CASE WHEN c.admitted THEN now() + make_interval(secs => p_grace) END
                FROM unnest(v_ids, v_events, v_admitted) AS c(id, event_id, admitted)
                WHERE task.id = c.id AND task.id = ANY(v_ids)
                RETURNING task.id, task.run_id, task.node_key, task.current_event_id, task.queued_at, c.admitted
            )
            SELECT count(*),
                coalesce(jsonb_agg(jsonb_build_object(
                    'node', w.node_key, 'version_id', run.version_id, 'event', to_jsonb(event)
                ) ORDER BY w.queued_at, w.id), '[]')
            INTO v_taken, v_batch
            FROM written AS w
            JOIN workflows_app_workflowrun AS run ON run.trace_id = w.run_id
            JOIN events_app_event AS event ON event.event_id = w.current_event_id
            WHERE w.admitted;
            v_sent := v_sent || v_batch;
        END IF;
        IF p_released[v_i] > 0 OR v_taken > 0 THEN
            UPDATE events_app_eventtype SET held = GREATEST(held - p_released[v_i] + v_taken, 0) WHERE name = p_types[v_i];
        END IF;
    END LOOP;
    RETURN v_sent;
END
$function$;
CREATE OR REPLACE FUNCTION eventflow_end_run(p_run uuid) RETURNS varchar LANGUAGE plpgsql AS $function$
DECLARE
    v_status varchar;
BEGIN
    UPDATE workflows_app_workflowrun
    SET status = CASE WHEN EXISTS (
            SELECT 1 FROM workflows_app_taskrun WHERE run_id = p_run AND status IN ('FAILURE', 'UPSTREAM_FAILED')
        ) THEN 'FAILED' ELSE 'SUCCESS' END,
        finished_at = now()
    WHERE trace_id = p_run AND status = 'RUNNING'
      AND NOT EXISTS (SELECT 1 FROM workflows_app_taskrun WHERE run_id = p_run AND status NOT IN ('FAILURE', 'REVOKED', 'SKIPPED', 'SUCCESS', 'UPSTREAM_FAILED'))
    RETURNING status INTO v_status;
    RETURN v_status;
END
$function$;
CREATE OR REPLACE FUNCTION eventflow_advance(p_run uuid, p_version bigint, p_event uuid, p_lost boolean, p_outcome varchar, p_result jsonb, p_error text, p_event_result jsonb, p_celery_result jsonb, p_retry_event uuid, p_retry_in double precision, p_expect jsonb, p_steps jsonb, p_events jsonb, p_types varchar[], p_may_end boolean, p_grace double precision, OUT code integer, OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar) RETURNS record LANGUAGE plpgsql AS $function$
DECLARE
    v_version bigint;
    v_task record;
    v_types varchar[] := coalesce(p_types, '{}');
    v_freed varchar;
    v_released integer[];
    v_ready bigint[];
    v_ready_events uuid[];
BEGIN
    clock := now();
    sent := '[]';
    SELECT version_id INTO v_version FROM workflows_app_workflowrun WHERE trace_id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        code := 4;
        RETURN;
    END IF;
    IF p_version IS NOT NULL AND v_version <> p_version THEN
        code := 3;
        RETURN;
    END IF;
    IF p_event IS NOT NULL THEN
        SELECT id, node_key, holds_slot, event_type_id INTO v_task FROM workflows_app_taskrun
        WHERE run_id = p_run AND current_event_id = p_event AND status IN ('QUEUED', 'RETRY', 'STARTED')
          AND (NOT p_lost OR (status = 'STARTED' AND lease_expires_at < now()));
        IF NOT FOUND THEN
            code := 1;
            RETURN;
        END IF;
    END IF;
    IF (SELECT count(*) FROM jsonb_to_recordset(p_expect) AS e(node varchar, status varchar)
        JOIN workflows_app_taskrun AS task ON task.run_id = p_run AND task.node_key = e.node AND task.status = e.status
       ) <> jsonb_array_length(p_expect) THEN
        code := 2;
        RETURN;
    END IF;
    code := 0;
    INSERT INTO events_app_event (event_id, trace_id, event_type, task_name, payload, result, context, status, timestamp, updated_at)
    SELECT e.event_id, e.trace_id, e.event_type, e.task_name, e.payload, e.result, e.context, e.status, now(), now()
    FROM jsonb_to_recordset(p_events) AS e(event_id uuid, trace_id uuid, event_type varchar, task_name varchar, payload jsonb, result jsonb, context jsonb, status varchar);
    IF p_event IS NOT NULL THEN
        UPDATE events_app_event
        SET status = CASE WHEN p_outcome = 'RETRY' THEN 'FAILURE' ELSE p_outcome END,
            result = p_event_result
        WHERE event_id = p_event;
        IF p_outcome = 'RETRY' THEN
            UPDATE workflows_app_taskrun
            SET status = 'RETRY', error = p_error, current_event_id = p_retry_event,
                due_at = now() + make_interval(secs => p_retry_in),
                lease_expires_at = now() + make_interval(secs => p_retry_in + p_grace)
            WHERE id = v_task.id;
            SELECT jsonb_build_array(jsonb_build_object(
                'node', v_task.node_key, 'version_id', v_version, 'event', to_jsonb(event),
                'due_in', p_retry_in))
            INTO sent FROM events_app_event AS event WHERE event.event_id = p_retry_event;
            RETURN;
        END IF;
        UPDATE workflows_app_taskrun
        SET status = p_outcome, result = p_result, error = p_error, finished_at = now(),
            holds_slot = false, lease_expires_at = NULL, due_at = NULL
        WHERE id = v_task.id;
        INSERT INTO django_celery_results_taskresult (task_id, status, result, content_type, content_encoding, meta, traceback, periodic_task_name, task_name, task_args, task_kwargs, worker, date_created, date_done)
        SELECT task_id, status, result, content_type, content_encoding, meta, traceback, periodic_task_name, task_name, task_args, task_kwargs, worker, date_created, date_done FROM jsonb_populate_record(
            NULL::django_celery_results_taskresult, p_celery_result || jsonb_build_object('date_created', now(), 'date_done', now()))
        WHERE p_celery_result IS NOT NULL
        ON CONFLICT (task_id) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, content_type = EXCLUDED.content_type, content_encoding = EXCLUDED.content_encoding, meta = EXCLUDED.meta, traceback = EXCLUDED.traceback, periodic_task_name = EXCLUDED.periodic_task_name, task_name = EXCLUDED.task_name, task_args = EXCLUDED.task_args, task_kwargs = EXCLUDED.task_kwargs, worker = EXCLUDED.worker, date_done = EXCLUDED.date_done;
        IF v_task.holds_slot AND v_task.event_type_id IS NOT NULL THEN
            v_freed := v_task.event_type_id;
            SELECT array_agg(DISTINCT t ORDER BY t) INTO v_types FROM unnest(v_types || v_freed) AS t;
        END IF;
    END IF;
    UPDATE workflows_app_taskrun AS task
    SET status = s.status, result = s.result, error = coalesce(s.error, ''),
        finished_at = CASE WHEN s.status IN ('FAILURE', 'REVOKED', 'SKIPPED', 'SUCCESS', 'UPSTREAM_FAILED') THEN now() END
    FROM jsonb_to_recordset(p_steps) AS s(node varchar, status varchar, result jsonb, error text)
    WHERE task.run_id = p_run AND task.node_key = s.node AND s.status <> 'QUEUED';
    SELECT array_agg(task.id), array_agg(s.event_id) INTO v_ready, v_ready_events
    FROM jsonb_to_recordset(p_steps) AS s(node varchar, status varchar, event_id uuid)
    JOIN workflows_app_taskrun AS task ON task.run_id = p_run AND task.node_key = s.node
    WHERE s.status = 'QUEUED';
    IF cardinality(v_types) > 0 THEN
        SELECT array_agg(CASE WHEN t = v_freed THEN 1 ELSE 0 END ORDER BY i)
        INTO v_released FROM unnest(v_types) WITH ORDINALITY AS u(t, i);
        sent := eventflow_admit(
            v_types, v_released, coalesce(v_ready, '{}'), coalesce(v_ready_events, '{}'), p_grace);
    END IF;
    IF p_may_end THEN
        run_status := eventflow_end_run(p_run);
    END IF;
END
$function$;
CREATE OR REPLACE FUNCTION eventflow_start_run(p_run jsonb, p_tasks jsonb, p_steps jsonb, p_events jsonb, p_types varchar[], p_may_end boolean, p_grace double precision, OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar) RETURNS record LANGUAGE plpgsql AS $function$
DECLARE
    v_run uuid := (p_run ->> 'trace_id')::uuid;
    v_code integer;
BEGIN
    INSERT INTO workflows_app_workflowrun (trace_id, workflow_id, version_id, workflow_version, status, payload, idempotency_key, source, created_by_id, trigger_event_id, created_at, finished_at)
    SELECT trace_id, workflow_id, version_id, workflow_version, status, payload, idempotency_key, source, created_by_id, trigger_event_id, created_at, finished_at
    FROM jsonb_populate_record(NULL::workflows_app_workflowrun, p_run || jsonb_build_object('created_at', now()));
    INSERT INTO workflows_app_taskrun
        (run_id, node_key, map_index, event_type_id, task_name, status, attempts, holds_slot, error, worker)
    SELECT v_run, t.node_key, NULL, t.event_type, t.task_name, 'WAITING', 0, false, '', ''
    FROM jsonb_to_recordset(p_tasks) AS t(node_key varchar, event_type varchar, task_name varchar);
    SELECT a.code, a.clock, a.sent, a.run_status INTO v_code, clock, sent, run_status
    FROM eventflow_advance(
        v_run, NULL, NULL, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '[]', p_steps, p_events, p_types,
        p_may_end, p_grace) AS a;
END
$function$;
CREATE OR REPLACE FUNCTION eventflow_cancel_run(p_run uuid, p_grace double precision, OUT run_status varchar, OUT revoked uuid[], OUT sent jsonb) RETURNS record LANGUAGE plpgsql AS $function$
DECLARE
    v_types varchar[];
    v_released integer[];
BEGIN
    sent := '[]';
    revoked := '{}';
    SELECT status INTO run_status FROM workflows_app_workflowrun WHERE trace_id = p_run FOR UPDATE;
    IF NOT FOUND OR run_status <> 'RUNNING' THEN
        RETURN;
    END IF;
    WITH open AS (
        SELECT id, event_type_id, current_event_id, holds_slot FROM workflows_app_taskrun
        WHERE run_id = p_run AND status NOT IN ('FAILURE', 'REVOKED', 'SKIPPED', 'SUCCESS', 'UPSTREAM_FAILED') FOR UPDATE
    ), ended AS (
        UPDATE workflows_app_taskrun
        SET status = 'REVOKED', finished_at = now(), holds_slot = false, lease_expires_at = NULL, due_at = NULL
        WHERE id IN (SELECT id FROM open)
    ), attempts AS (
        UPDATE events_app_event SET status = 'REVOKED'
        WHERE event_id IN (SELECT current_event_id FROM open)
          AND status NOT IN ('SUCCESS', 'FAILURE')
    ), per_type AS (
        SELECT event_type_id AS name, count(*) FILTER (WHERE holds_slot)::integer AS freed
        FROM open WHERE event_type_id IS NOT NULL GROUP BY event_type_id
    )
    SELECT (SELECT coalesce(array_agg(current_event_id), '{}') FROM open WHERE current_event_id IS NOT NULL),
           (SELECT array_agg(name ORDER BY name) FROM per_type),
           (SELECT array_agg(freed ORDER BY name) FROM per_type)
    INTO revoked, v_types, v_released;
    UPDATE workflows_app_workflowrun SET status = 'CANCELED', finished_at = now() WHERE trace_id = p_run;
    run_status := 'CANCELED';
    IF v_types IS NOT NULL THEN
        sent := eventflow_admit(v_types, v_released, '{}', '{}', p_grace);
    END IF;
END
$function$;
"""

DROP = r"""
DROP FUNCTION IF EXISTS eventflow_admit(varchar[], integer[], bigint[], uuid[], double precision);
DROP FUNCTION IF EXISTS eventflow_end_run(uuid);
DROP FUNCTION IF EXISTS eventflow_advance(uuid, bigint, uuid, boolean, varchar, jsonb, text, jsonb, jsonb, uuid, double precision, jsonb, jsonb, jsonb, varchar[], boolean, double precision);
DROP FUNCTION IF EXISTS eventflow_start_run(jsonb, jsonb, jsonb, jsonb, varchar[], boolean, double precision);
DROP FUNCTION IF EXISTS eventflow_cancel_run(uuid, double precision);
"""


class Migration(migrations.Migration):
    dependencies = [("workflows_app", '0004_kinds_and_instances')]

    operations = [migrations.RunSQL(FUNCTIONS, DROP)]
