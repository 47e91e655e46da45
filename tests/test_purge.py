"""purge_runs: old finished runs, their task runs, events and results go in short batches; new runs carry on."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from django_celery_results.models import TaskResult

from events_app.models import Event
from tests import factories
from tests.e2e import trigger, wait_for
from tests.workers import ROOT, worker_env
from workflows_app import engine, tasks
from workflows_app.models import TaskRun, WorkflowRun
from workflows_app.retention import runs_purge

ECHO = "workflows_app.tasks.echo"
QUEUE = "e2e_purge"
OLD_RUNS = 100_000
OLD_TASKS = 20_000


def age(run: WorkflowRun, days: float) -> None:
    """Make a run look as if it started and finished `days` ago (its events too)."""
    when = timezone.now() - timedelta(days=days)
    WorkflowRun.objects.filter(pk=run.pk).update(created_at=when, finished_at=when if run.is_final else None)
    Event.objects.filter(trace_id=run.trace_id).update(timestamp=when)


def finished_run(workflow, *, days: float, trigger_event: Event | None = None) -> WorkflowRun:
    run, _ = engine.workflow_run_start(workflow=workflow, payload={}, trigger_event=trigger_event)
    engine.workflow_run_cancel(trace_id=str(run.trace_id))
    run.refresh_from_db()
    age(run, days)
    return run


@pytest.mark.django_db
def test_purge_keeps_recent_and_unfinished_runs_and_shared_events(capsys):
    workflow = factories.workflow(factories.spec("keep", [("a", ECHO), ("b", ECHO)], [["a", "b"]]))
    old = [finished_run(workflow, days=40) for _ in range(3)]
    recent = finished_run(workflow, days=1)
    running, _ = engine.workflow_run_start(workflow=workflow, payload={})
    age(running, 40)
    # One published event started an old run and a recent one: it stays while the recent run does.
    shared = Event.objects.create(event_type="stock.low", timestamp=timezone.now() - timedelta(days=40))
    old_triggered = finished_run(workflow, days=40, trigger_event=shared)
    recent_triggered = finished_run(workflow, days=1, trigger_event=shared)
    # A published event nobody listened to, and one whose only run is old: both go.
    unheard = Event.objects.create(event_type="nobody.listens", timestamp=timezone.now() - timedelta(days=40))
    lone = Event.objects.create(event_type="stock.low", timestamp=timezone.now() - timedelta(days=40))
    finished_run(workflow, days=40, trigger_event=lone)
    old_event = Event.objects.filter(trace_id=old[0].trace_id).first()
    TaskResult.objects.create(task_id=str(old_event.event_id), status="REVOKED")

    call_command("purge_runs", "--older-than", "30", "--dry-run")
    assert capsys.readouterr().out.strip() == "would remove 5 run(s), 10 task run(s), 7 event(s)"
    assert WorkflowRun.objects.count() == 8

    call_command("purge_runs", "--older-than", "30", "--batch-size", "2")
    out = capsys.readouterr().out
    assert re.match(r"removed 5 run\(s\), 10 task run\(s\), 7 event\(s\), 1 Celery result\(s\) in \d+ batch", out), out

    remaining = set(WorkflowRun.objects.values_list("trace_id", flat=True))
    assert remaining == {recent.trace_id, running.trace_id, recent_triggered.trace_id}
    assert old_triggered.trace_id not in remaining
    assert not Event.objects.filter(trace_id__in=[r.trace_id for r in old]).exists()
    assert Event.objects.filter(pk=shared.pk).exists()
    assert not Event.objects.filter(pk__in=[unheard.pk, lone.pk]).exists()
    assert not TaskResult.objects.exists()
    assert TaskRun.objects.filter(run=running).count() == 2


@pytest.mark.django_db
def test_purge_task_for_beat_returns_the_counts():
    workflow = factories.workflow(factories.spec("beat_purged"))
    finished_run(workflow, days=10)
    assert tasks.purge_runs(older_than_days=7) == {"runs": 1, "task_runs": 1, "events": 1, "results": 0, "batches": 1}
    assert runs_purge(older_than=timedelta(days=7)).runs == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args", [[], ["--older-than", "0"], ["--older-than", "x"], ["--older-than", "3", "--batch-size", "0"]]
)
def test_purge_arguments_are_checked(args):
    with pytest.raises(BaseException):  # noqa: B017 - argparse exits, CommandError raises: both refuse
        call_command("purge_runs", *args)


def bulk_old_runs(workflow, count: int, *, with_tasks: int) -> None:
    """`count` finished runs 40 days old, `with_tasks` of them with a task run and its event, inserted by the
    database itself (a row at a time through the ORM would take minutes)."""
    version = workflow.versions.get()
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO workflows_app_workflowrun
                (trace_id, workflow_id, version_id, workflow_version, status, payload, source, created_at, finished_at)
            SELECT gen_random_uuid(), %s, %s, 1, 'SUCCESS', '{}', 'api',
                   now() - interval '40 days' - g * interval '1 second',
                   now() - interval '40 days' - g * interval '1 second' + interval '1 second'
            FROM generate_series(1, %s) AS g
            """,
            [workflow.pk, version.pk, count],
        )
        cursor.execute(
            """
            INSERT INTO events_app_event
                (event_id, trace_id, event_type, task_name, payload, result, context, status, timestamp, updated_at)
            SELECT gen_random_uuid(), trace_id, %s, %s, '{}', '{}', '{}', 'SUCCESS', created_at, created_at
            FROM workflows_app_workflowrun WHERE workflow_id = %s ORDER BY created_at LIMIT %s
            """,
            [QUEUE, ECHO, workflow.pk, with_tasks],
        )
        cursor.execute(
            """
            INSERT INTO workflows_app_taskrun
                (run_id, node_key, event_type_id, task_name, status, attempts, holds_slot, current_event_id,
                 queued_at, started_at, finished_at, result, error, worker)
            SELECT e.trace_id, 'a', %s, %s, 'SUCCESS', 1, false, e.event_id,
                   e.timestamp, e.timestamp, e.timestamp, '{}', '', ''
            FROM events_app_event e WHERE e.event_type = %s AND e.trace_id IS NOT NULL
            """,
            [QUEUE, ECHO, QUEUE],
        )
        cursor.execute("ANALYZE workflows_app_workflowrun, workflows_app_taskrun, events_app_event")


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_purging_100k_runs_goes_in_batches_while_a_new_run_completes(workers, api, tmp_path):
    old_workflow = factories.workflow(factories.spec("archived", event_type=QUEUE))
    started = time.monotonic()
    bulk_old_runs(old_workflow, OLD_RUNS, with_tasks=OLD_TASKS)
    inserted = time.monotonic() - started
    assert TaskRun.objects.count() == OLD_TASKS and Event.objects.count() == OLD_TASKS
    factories.workflow(factories.spec("live", [("a", ECHO), ("b", ECHO)], [["a", "b"]], event_type=QUEUE))
    workers([QUEUE], concurrency=2)

    log_path = tmp_path / "purge.log"
    with open(log_path, "w") as log:
        purge = subprocess.Popen(
            [sys.executable, "manage.py", "purge_runs", "--older-than", "30", "--batch-size", "1000", "-v", "2"],
            cwd=ROOT,
            env=worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: "batch 2:" in log_path.read_text(), timeout=60, what="the purge's second batch")
            trace_id = trigger(api, "live", {"n": 1})
            final = wait_for(
                lambda: WorkflowRun.objects.filter(trace_id=trace_id).exclude(status="RUNNING").first(),
                timeout=30,
                what="the run started during the purge to finish",
            )
            overlapped = purge.poll() is None
            assert purge.wait(timeout=80) == 0, log_path.read_text()[-3000:]
        finally:
            if purge.poll() is None:
                purge.kill()
    output = log_path.read_text()

    assert final.status == "SUCCESS"
    assert overlapped, "the purge was over before the new run finished; the overlap was not tested"
    summary = output.strip().splitlines()[-1]
    match = re.match(
        r"removed (\d+) run\(s\), (\d+) task run\(s\), (\d+) event\(s\), 0 Celery result\(s\) in (\d+) batch", summary
    )
    assert match, output[-2000:]
    assert [int(g) for g in match.groups()] == [OLD_RUNS, OLD_TASKS, OLD_TASKS, OLD_RUNS // 1000]
    assert output.count("batch ") == OLD_RUNS // 1000
    assert WorkflowRun.objects.filter(workflow=old_workflow).count() == 0
    assert list(WorkflowRun.objects.values_list("trace_id", flat=True)) == [final.trace_id]
    assert Event.objects.filter(trace_id=final.trace_id).count() == 2
    print(f"inserted {OLD_RUNS} runs, {OLD_TASKS} task runs and events in {inserted:.1f}s; {summary}")
