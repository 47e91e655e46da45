"""End to end: real worker processes, driven through the public API, on PostgreSQL and the test broker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest
from django.core.management import call_command
from django_celery_results.models import TaskResult

import tests.e2e_tasks  # noqa: F401 - registers the capture task here as the workers' --include does there
from events_app.models import Event
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.workers import ROOT, worker_env
from workflows_app.engine import graph_for_version
from workflows_app.models import TaskRun, WorkflowRun
from workflows_app.tasks import echo

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PIPELINE_QUEUES = [
    "product_src",
    "product_listing",
    "product_image",
    "product_upload_ali",
    "product_upload_1688",
    "product_public_ali",
    "product_public_1688",
]
ECHO, FAIL, SLEEP, CAPTURE = (
    "workflows_app.tasks.echo",
    "workflows_app.tasks.fail",
    "workflows_app.tasks.sleep",
    "tests.e2e_tasks.capture",
)
EVENT_FIELDS = {
    "event_id",
    "trace_id",
    "event_type",
    "task_name",
    "payload",
    "result",
    "context",
    "status",
    "timestamp",
}


def tasks_of(trace_id: str) -> dict[str, TaskRun]:
    return {t.node_key: t for t in TaskRun.objects.filter(run_id=trace_id)}


def test_product_pipeline_ten_runs_through_the_api(workers, api, admin_client):
    call_command("import_workflows", str(factories.EXAMPLES / "product_pipeline.yaml"))
    workers(PIPELINE_QUEUES[:3], concurrency=2, name="intake")
    workers(PIPELINE_QUEUES[3:], concurrency=2, name="publish")
    trace_ids = [trigger(api, "product_pipeline", {"product": f"sku-{i}"}) for i in range(10)]

    assert set(wait_final(trace_ids).values()) == {"SUCCESS"}

    for trace_id in trace_ids:
        run = WorkflowRun.objects.get(trace_id=trace_id)
        graph = graph_for_version(run.version_id)
        tasks = tasks_of(trace_id)
        assert set(tasks) == set(graph.nodes)
        for key, task in tasks.items():
            assert task.status == "SUCCESS" and task.attempts == 1
            for pred in graph.preds[key]:
                assert task.started_at > tasks[pred].finished_at, f"{key} started before {pred} finished"

        body = api.get(f"/api/runs/{trace_id}/").json()
        assert {t["node"]: t["status"] for t in body["tasks"]} == dict.fromkeys(graph.nodes, "SUCCESS")
        page = admin_client.get(f"/runs/{trace_id}/").content.decode()
        for key in graph.nodes:
            assert re.search(rf'data-node="{key}"[^>]*data-status="SUCCESS"', page), f"{key} missing on the page"


def test_failing_node_fails_the_run_but_independent_branches_finish(workers, api):
    factories.workflow(
        factories.spec(
            "branchy",
            [
                ("a", ECHO),
                ("b", FAIL),
                ("c", ECHO),
                ("c2", ECHO),
                ("d", ECHO),
                ("e", ECHO),
                {"key": "g", "task": ECHO, "trigger_rule": "all_done"},
                {"key": "h", "task": ECHO, "trigger_rule": "one_success"},
            ],
            [["a", "b"], ["b", "c"], ["c", "c2"], ["a", "d"], ["d", "e"], ["b", "g"], ["b", "h"], ["d", "h"]],
            event_type="e2e",
        )
    )
    workers(["e2e"], concurrency=2)
    trace_id = trigger(api, "branchy", {"message": "card declined"})

    assert wait_final([trace_id]) == {trace_id: "FAILED"}
    statuses = {k: t.status for k, t in tasks_of(trace_id).items()}
    assert statuses == {
        "a": "SUCCESS",
        "b": "FAILURE",
        "c": "UPSTREAM_FAILED",
        "c2": "UPSTREAM_FAILED",
        "d": "SUCCESS",
        "e": "SUCCESS",
        "g": "SUCCESS",
        "h": "SUCCESS",
    }
    assert "RuntimeError: card declined" in tasks_of(trace_id)["b"].error
    assert not TaskRun.objects.filter(holds_slot=True).exists()


def test_every_event_has_exactly_the_spec_fields(workers, api):
    factories.workflow(
        factories.spec(
            "capture",
            [("first", CAPTURE), {"key": "second", "task": CAPTURE, "params": {"extra": 1}}],
            [["first", "second"]],
            event_type="e2e",
        )
    )
    workers(["e2e"], concurrency=1)
    trace_id = trigger(api, "capture", {"order": 7})
    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}

    tasks = tasks_of(trace_id)
    received = tasks["second"].result["event"]
    assert set(received) == EVENT_FIELDS
    assert received["event_id"] == str(tasks["second"].current_event_id)
    assert received["trace_id"] == trace_id
    assert received["event_type"] == "e2e" and received["task_name"] == CAPTURE
    assert received["payload"] == {"order": 7, "extra": 1}
    assert received["result"] == {} and received["status"] == "PENDING"
    assert received["context"] == {
        "workflow": "capture",
        "workflow_version": 1,
        "node": "second",
        "attempt": 1,
        "upstream": {"first": tasks["first"].result},
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", received["timestamp"])
    uuid.UUID(received["event_id"])

    events = api.get(f"/api/runs/{trace_id}/events/").json()
    assert [e["context"]["node"] for e in events["results"]] == ["first", "second"]
    assert all(set(e) == EVENT_FIELDS and e["status"] == "SUCCESS" for e in events["results"])
    assert events["results"][1]["result"] == tasks["second"].result


def test_a_success_stores_the_celery_result_celery_would_store_and_only_once(workers, api):
    """The engine writes a success's Celery result row with its outcome: the row matches, column for
    column, the one Celery stores for the same call sent outside the engine, and Celery does not
    store it again afterwards (its date_done stays the outcome's time)."""
    factories.workflow(factories.spec("echoed", [("only", ECHO)], event_type="e2e"))
    workers(["e2e"], concurrency=1)
    trace_id = trigger(api, "echoed", {"n": 3})
    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}
    task = tasks_of(trace_id)["only"]

    # Not the engine's: its event id is not the task id, so Celery stores the result itself.
    outside = echo.apply_async(args=[{"event_id": "none", "payload": {"n": 3}, "context": {}}], queue="e2e")
    by_celery = wait_for(
        lambda: TaskResult.objects.filter(task_id=outside.id, status="SUCCESS").first(),
        timeout=30,
        what="Celery's own result row",
    )
    # One pool process: the engine's task was done with, Celery's bookkeeping included, before this one.
    by_engine = TaskResult.objects.get(task_id=str(task.current_event_id))
    compared = ["status", "result", "content_type", "content_encoding", "meta", "traceback", "task_name", "worker"]
    compared += ["task_kwargs", "periodic_task_name"]
    assert {c: getattr(by_engine, c) for c in compared} == {c: getattr(by_celery, c) for c in compared}
    assert by_engine.status == "SUCCESS" and json.loads(by_engine.result) == task.result
    assert str(task.current_event_id) in by_engine.task_args
    assert by_engine.date_done == task.finished_at


def test_editing_a_definition_does_not_change_a_run_in_flight(workers, api):
    factories.workflow(
        factories.spec(
            "evolving",
            [{"key": "slow", "task": SLEEP, "params": {"seconds": 1.5}}, ("after", ECHO)],
            [["slow", "after"]],
            event_type="e2e",
        )
    )
    workers(["e2e"], concurrency=2)
    first = trigger(api, "evolving")
    wait_for(lambda: tasks_of(first)["slow"].status == "STARTED", timeout=30, what="slow to start")

    definition = api.get("/api/workflows/evolving/").json()
    definition["nodes"][1]["params"] = {"new": True}
    definition["nodes"].append({"key": "added", "task": ECHO, "event_type": "e2e"})
    definition["edges"].append(["after", "added"])
    changes = {k: definition[k] for k in ("nodes", "edges")}
    assert api.patch("/api/workflows/evolving/", changes, format="json").json()["version"] == 2
    second = trigger(api, "evolving")

    assert wait_final([first, second]) == {first: "SUCCESS", second: "SUCCESS"}
    old = tasks_of(first)
    assert set(old) == {"slow", "after"}
    assert "new" not in old["after"].current_event.payload
    assert WorkflowRun.objects.get(trace_id=first).workflow_version == 1
    assert set(tasks_of(second)) == {"slow", "after", "added"}
    assert tasks_of(second)["after"].current_event.payload["new"] is True


def test_retries_with_backoff_then_failure(workers, api):
    factories.workflow(
        factories.spec("flaky", [{"key": "x", "task": FAIL, "max_retries": 2, "retry_delay": 0.2}], event_type="e2e")
    )
    workers(["e2e"], concurrency=1)
    trace_id = trigger(api, "flaky")
    assert wait_final([trace_id]) == {trace_id: "FAILED"}
    task = tasks_of(trace_id)["x"]
    assert task.status == "FAILURE" and task.attempts == 3
    attempts = list(Event.objects.filter(trace_id=trace_id).order_by("timestamp"))
    assert [e.context["attempt"] for e in attempts] == [1, 2, 3]
    assert [e.status for e in attempts] == ["FAILURE"] * 3
    # Each retry's Event is created when the previous attempt fails and sent after its backoff:
    # 0.2 s before the second attempt, then 0.4 s before the third.
    assert (attempts[2].timestamp - attempts[1].timestamp).total_seconds() >= 0.2
    assert (task.finished_at - attempts[2].timestamp).total_seconds() >= 0.4


def test_trigger_workflow_command_waits_for_success(workers):
    call_command("import_workflows", str(factories.EXAMPLES / "product_pipeline.yaml"))
    workers(PIPELINE_QUEUES, concurrency=2)
    manage = [sys.executable, "manage.py"]
    done = subprocess.run(
        [*manage, "trigger_workflow", "product_pipeline", "--payload", '{"product": "lamp"}', "--wait"],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    trace_id = done.stdout.splitlines()[0].strip()
    assert WorkflowRun.objects.get(trace_id=trace_id).status == "SUCCESS"

    status = subprocess.run(
        [*manage, "workflow_status", trace_id], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    for key in ("intake", "listing", "image", "upload_ali", "upload_1688", "publish_ali", "publish_1688"):
        assert re.search(rf"^\s*{key}\s.*SUCCESS", status.stdout, re.MULTILINE), status.stdout


def test_node_timeout_fails_the_attempt_and_retries(workers, api):
    node = {"key": "x", "task": SLEEP, "params": {"seconds": 30}, "timeout": 1, "max_retries": 1, "retry_delay": 0.1}
    factories.workflow(factories.spec("slowpoke", [node], event_type="e2e"))
    workers(["e2e"], concurrency=1)
    trace_id = trigger(api, "slowpoke")
    assert wait_final([trace_id], timeout=40) == {trace_id: "FAILED"}
    task = tasks_of(trace_id)["x"]
    assert task.status == "FAILURE" and task.attempts == 2
    assert "SoftTimeLimitExceeded" in task.error
    assert (task.finished_at - task.started_at).total_seconds() < 5
    first = Event.objects.get(trace_id=trace_id, context__attempt=1)
    assert first.status == "FAILURE" and "SoftTimeLimitExceeded" in first.result["error"]
    assert not TaskRun.objects.filter(holds_slot=True).exists()


def test_a_kind_registered_by_a_test_module_runs_between_tasks_on_real_workers(workers, api):
    """`noop` (tests/kinds.py, loaded by the workers through tests.e2e_tasks) is settled by the worker
    that finishes its predecessor: no message, no worker, and the next task gets its result."""
    factories.workflow(
        factories.spec(
            "with_noop",
            [("first", CAPTURE), {"key": "gate", "kind": "noop", "event_type": None}, ("last", CAPTURE)],
            [["first", "gate"], ["gate", "last"]],
            event_type="e2e",
        )
    )
    workers(["e2e"], concurrency=1)
    trace_id = trigger(api, "with_noop", {"sku": "A-1"})

    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}
    tasks = tasks_of(trace_id)
    assert {k: t.status for k, t in tasks.items()} == dict.fromkeys(["first", "gate", "last"], "SUCCESS")
    assert tasks["gate"].current_event_id is None and tasks["gate"].event_type_id is None
    assert tasks["last"].result["event"]["context"]["upstream"] == {"gate": {"upstream": ["first"]}}
    assert sorted(Event.objects.filter(trace_id=trace_id).values_list("context__node", flat=True)) == ["first", "last"]
