CREATE OR REPLACE FUNCTION eventflow_admit(p_types varchar[], p_released integer[], p_ready bigint[], p_ready_events uuid[], p_ready_types varchar[], p_grace double precision) RETURNS jsonb LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $function$
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
    FROM (SELECT name, concurrency, held FROM events_app_eventtype WHERE name = ANY(p_types) ORDER BY name FOR UPDATE) AS t;
    FOR v_i IN 1 .. coalesce(cardinality(v_names), 0) LOOP
        v_name := v_names[v_i];
        v_released := coalesce(p_released[array_position(p_types, v_name)], 0);
        v_free := v_frees[v_i] + v_released;
        v_head := ARRAY(
            SELECT id FROM workflows_app_taskrun
            WHERE event_type_id = v_name AND status = 'QUEUED' AND holds_slot = false
            ORDER BY workflows_app_taskrun.queued_at, workflows_app_taskrun.id LIMIT GREATEST(v_free, 0) FOR UPDATE SKIP LOCKED);
        IF cardinality(p_ready) < 2 THEN  -- the common case, without a query
            v_fresh := CASE WHEN p_ready_types[1] = v_name THEN p_ready ELSE '{}' END;
        ELSE
            v_fresh := ARRAY(
                SELECT r.id FROM unnest(p_ready, p_ready_types) AS r(id, t) WHERE r.t = v_name ORDER BY r.id);
        END IF;
        -- Tasks becoming ready now share their `queued_at`: they come after the line's head, in id
        -- order, unless the head holds a task that joined it in this very transaction: then the
        -- line's order decides.
        IF cardinality(v_head) = 0 OR cardinality(v_fresh) = 0 OR NOT EXISTS (
            SELECT 1 FROM workflows_app_taskrun WHERE id = ANY(v_head) AND queued_at >= now()
        ) THEN
            v_ids := v_head || v_fresh;
        ELSE
            v_ids := ARRAY(
                SELECT u.id FROM (
                    SELECT id, queued_at FROM workflows_app_taskrun WHERE id = ANY(v_head)
                    UNION ALL
                    SELECT id, now() FROM unnest(v_fresh) AS id
                ) AS u ORDER BY u.queued_at, u.id);
        END IF;
        IF cardinality(v_ids) = 0 THEN
            IF v_released > 0 THEN
                UPDATE events_app_eventtype SET held = GREATEST(held - v_released, 0) WHERE name = v_name;
            END IF;
            CONTINUE;
        END IF;
        -- Rows are found by id (`= ANY` of an array: index lookups whatever the plan guesses).
        WITH written AS (
            UPDATE workflows_app_taskrun AS task
            SET status = 'QUEUED',
                queued_at = CASE WHEN c.id = ANY(v_fresh) THEN now() ELSE task.queued_at END,
                current_event_id = CASE
                    WHEN c.id = ANY(v_fresh) THEN p_ready_events[array_position(p_ready, c.id)]
                    ELSE task.current_event_id
                END,
                holds_slot = c.n <= v_free,
                lease_expires_at = CASE WHEN c.n <= v_free THEN now() + make_interval(secs => p_grace) END
            FROM unnest(v_ids) WITH ORDINALITY AS c(id, n)
            WHERE task.id = c.id AND task.id = ANY(v_ids) AND (c.id = ANY(v_fresh) OR c.n <= v_free)
            RETURNING task.id, task.run_id, task.node_key, task.current_event_id, task.holds_slot, c.n
        ), counted AS (
            UPDATE events_app_eventtype
            SET held = GREATEST(held - v_released + (SELECT count(*) FROM written WHERE holds_slot), 0)
            WHERE name = v_name AND (SELECT count(*) FROM written WHERE holds_slot) <> v_released
        )
        SELECT count(*), coalesce(jsonb_agg(CASE WHEN w.id = ANY(v_fresh)
            THEN jsonb_build_object('event_id', w.current_event_id)
            ELSE jsonb_build_object(
                'node', w.node_key,
                'version_id', (SELECT version_id FROM workflows_app_workflowrun WHERE trace_id = w.run_id),
                'event', (SELECT to_jsonb(event) FROM events_app_event AS event WHERE event.event_id = w.current_event_id))
            END ORDER BY w.n), '[]')
        INTO v_taken, v_batch
        FROM written AS w WHERE w.holds_slot;
        v_sent := v_sent || v_batch;
    END LOOP;
    RETURN v_sent;
END
$function$;
CREATE OR REPLACE FUNCTION eventflow_end_run(p_run uuid) RETURNS varchar LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $function$
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
CREATE OR REPLACE FUNCTION eventflow_advance(p_run uuid, p_version bigint, p_event uuid, p_lost boolean, p_outcome varchar, p_result jsonb, p_error text, p_event_result jsonb, p_celery_result jsonb, p_retry_event uuid, p_retry_in double precision, p_expect jsonb, p_steps jsonb, p_events jsonb, p_ready_nodes varchar[], p_ready_events uuid[], p_ready_types varchar[], p_types varchar[], p_may_end boolean, p_grace double precision, OUT code integer, OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar) RETURNS record LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $function$
DECLARE
    v_version bigint;
    v_task bigint;
    v_holds boolean;
    v_type varchar;
    v_agrees boolean;
    v_ready bigint[];
    v_released integer[];
    v_retry boolean := p_outcome = 'RETRY';
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
    -- The nodes the plan read or writes (its ready nodes among them, expected WAITING), each in one
    -- lookup: whether each still has the status read, and the ready ones' rows.
    SELECT attempt.id, attempt.holds_slot, attempt.event_type_id,
        expected.agreeing = jsonb_array_length(p_expect), coalesce(expected.ready, '{}')
    INTO v_task, v_holds, v_type, v_agrees, v_ready
    FROM (
        SELECT count(*) FILTER (WHERE task.status = e.status) AS agreeing,
            array_agg(task.id ORDER BY array_position(p_ready_nodes, e.node))
                FILTER (WHERE e.node = ANY(p_ready_nodes)) AS ready
        FROM jsonb_to_recordset(p_expect) AS e(node varchar, status varchar)
        JOIN workflows_app_taskrun AS task ON task.run_id = p_run AND task.node_key = e.node
    ) AS expected LEFT JOIN workflows_app_taskrun AS attempt
        ON attempt.run_id = p_run AND attempt.current_event_id = p_event AND attempt.status IN ('QUEUED', 'RETRY', 'STARTED')
        AND (NOT p_lost OR (attempt.status = 'STARTED' AND attempt.lease_expires_at < now()));
    IF p_event IS NOT NULL AND v_task IS NULL THEN
        code := 1;
        RETURN;
    END IF;
    IF NOT v_agrees THEN
        code := 2;
        RETURN;
    END IF;
    code := 0;
    -- Every write in one statement: the new Events, the attempt's Event and task, Celery's result
    -- row, and the nodes that end at once. The task row's key to its new Event is checked at commit.
    WITH new_events AS (
        INSERT INTO events_app_event
            (event_id, trace_id, event_type, task_name, payload, result, context, status, timestamp, updated_at)
        SELECT e.event_id, e.trace_id, e.event_type, e.task_name, e.payload, e.result, e.context, e.status,
            now(), now()
        FROM jsonb_to_recordset(p_events) AS e(event_id uuid, trace_id uuid, event_type varchar, task_name varchar, payload jsonb, result jsonb, context jsonb, status varchar)
    ), attempt_event AS (
        UPDATE events_app_event
        SET status = CASE WHEN v_retry THEN 'FAILURE' ELSE p_outcome END,
            result = CASE WHEN p_outcome = 'SUCCESS' THEN p_result ELSE p_event_result END
        WHERE event_id = p_event
    ), outcome AS (
        UPDATE workflows_app_taskrun
        SET status = p_outcome, error = p_error,
            result = CASE WHEN v_retry THEN result ELSE p_result END,
            finished_at = CASE WHEN v_retry THEN NULL ELSE now() END,
            holds_slot = v_retry AND holds_slot,
            current_event_id = CASE WHEN v_retry THEN p_retry_event ELSE current_event_id END,
            due_at = CASE WHEN v_retry THEN now() + make_interval(secs => p_retry_in) END,
            lease_expires_at = CASE WHEN v_retry THEN now() + make_interval(secs => p_retry_in + p_grace) END
        WHERE id = v_task
    ), celery_result AS (
        INSERT INTO django_celery_results_taskresult (task_id, status, result, content_type, content_encoding, meta, traceback, periodic_task_name, task_name, task_args, task_kwargs, worker, date_created, date_done)
        SELECT task_id, status, result, content_type, content_encoding, meta, traceback, periodic_task_name, task_name, task_args, task_kwargs, worker, date_created, date_done FROM jsonb_populate_record(
            NULL::django_celery_results_taskresult, p_celery_result || jsonb_build_object('date_created', now(), 'date_done', now()))
        WHERE p_celery_result IS NOT NULL AND NOT v_retry
        ON CONFLICT (task_id) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, content_type = EXCLUDED.content_type, content_encoding = EXCLUDED.content_encoding, meta = EXCLUDED.meta, traceback = EXCLUDED.traceback, periodic_task_name = EXCLUDED.periodic_task_name, task_name = EXCLUDED.task_name, task_args = EXCLUDED.task_args, task_kwargs = EXCLUDED.task_kwargs, worker = EXCLUDED.worker, date_done = EXCLUDED.date_done
    )
    UPDATE workflows_app_taskrun AS task
    SET status = s.status, result = s.result, error = coalesce(s.error, ''),
        finished_at = CASE WHEN s.status IN ('FAILURE', 'REVOKED', 'SKIPPED', 'SUCCESS', 'UPSTREAM_FAILED') THEN now() END
    FROM jsonb_to_recordset(p_steps) AS s(node varchar, status varchar, result jsonb, error text)
    WHERE task.run_id = p_run AND task.node_key = s.node AND s.status <> 'QUEUED';
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
$function$;
CREATE OR REPLACE FUNCTION eventflow_start_run(p_run jsonb, p_tasks jsonb, p_expect jsonb, p_steps jsonb, p_events jsonb, p_ready_nodes varchar[], p_ready_events uuid[], p_ready_types varchar[], p_types varchar[], p_may_end boolean, p_grace double precision, OUT clock timestamptz, OUT sent jsonb, OUT run_status varchar) RETURNS record LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $function$
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
        v_run, NULL, NULL, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, p_expect, p_steps, p_events, p_ready_nodes,
        p_ready_events, p_ready_types, p_types, p_may_end, p_grace) AS a;
END
$function$;
CREATE OR REPLACE FUNCTION eventflow_cancel_run(p_run uuid, p_grace double precision, OUT run_status varchar, OUT revoked uuid[], OUT sent jsonb) RETURNS record LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $function$
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
        sent := eventflow_admit(v_types, v_released, '{}', '{}', '{}', p_grace);
    END IF;
END
$function$;
