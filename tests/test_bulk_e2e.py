"""End to end: bulk retry and cancel through the API while real workers run the runs."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.e2e_tasks import _redis
from workflows_app import engine
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

FLAKY, ECHO = "tests.e2e_tasks.flaky", "workflows_app.tasks.echo"


@pytest.fixture
def counters(monkeypatch, settings) -> dict[str, str]:
    """The flags the flaky task reads, kept in this test's own broker database: the default counter
    database is shared with whatever else runs on this Redis."""
    env = {"E2E_COUNTER_URL": settings.CELERY_BROKER_URL}
    monkeypatch.setenv("E2E_COUNTER_URL", settings.CELERY_BROKER_URL)
    return env


def test_bulk_retry_of_300_failed_runs_runs_them_again_and_a_repeat_changes_nothing(workers, api, counters):
    factories.workflow(
        factories.spec(
            "bulk_flaky", [("charge", FLAKY)], event_type="bulk_e2e", event_types={"bulk_e2e": {"concurrency": 16}}
        )
    )
    # Started before any worker runs, so each run's `broken` flag is set before its task can run.
    trace_ids = [trigger(api, "bulk_flaky", {"sku": f"A-{i}"}) for i in range(300)]
    redis = _redis()
    redis.mset({f"broken:{t}": 1 for t in trace_ids})
    try:
        workers(["bulk_e2e"], concurrency=4, name="a", env=counters)
        workers(["bulk_e2e"], concurrency=4, name="b", env=counters)
        assert set(wait_final(trace_ids, timeout=180).values()) == {"FAILED"}
    finally:
        redis.delete(*(f"broken:{t}" for t in trace_ids))

    body = {"workflow": "bulk_flaky", "status": "FAILED"}
    response = api.post("/api/runs/retry/", body, format="json")
    assert response.status_code == 200, response.content
    assert response.json() == {"matched": 300, "changed": 300}
    again = api.post("/api/runs/retry/", body, format="json").json()
    assert again["changed"] == 0, again

    assert set(wait_final(trace_ids, timeout=180).values()) == {"SUCCESS"}
    tasks = TaskRun.objects.filter(run_id__in=trace_ids)
    assert tasks.count() == 300 and set(tasks.values_list("status", flat=True)) == {"SUCCESS"}
    # Named by id, succeeded runs are matched and left alone.
    assert api.post("/api/runs/retry/", {"trace_ids": trace_ids}, format="json").json() == {
        "matched": 300,
        "changed": 0,
    }


def test_bulk_cancel_of_1000_runs_goes_batch_by_batch_while_new_runs_finish(workers, api):
    # A run with park=true waits an hour in its delay node (RUNNING, holding no worker); one with park=false
    # ends SUCCESS as soon as its intake has run.
    workflow = factories.workflow(
        factories.spec(
            "bulk_park",
            [("intake", ECHO), {"key": "park", "kind": "delay", "seconds": 3600, "event_type": None}],
            [{"from": "intake", "to": "park", "when": "payload.park"}],
            event_type="bulk_park_q",
            event_types={"bulk_park_q": {"concurrency": 16}},
        )
    )
    workers(["bulk_park_q"], concurrency=4, name="a")
    workers(["bulk_park_q"], concurrency=4, name="b")
    parked = [
        str(engine.workflow_run_start(workflow=workflow, payload={"park": True, "n": i})[0].trace_id)
        for i in range(1000)
    ]

    def all_parked() -> bool:
        return TaskRun.objects.filter(run_id__in=parked, node_key="park", status="DEFERRED").count() == 1000

    wait_for(all_parked, timeout=240, interval=0.5, what="1,000 runs to wait in their delay")

    answer: dict = {}

    def bulk_cancel() -> None:
        try:
            response = api.post("/api/runs/cancel/", {"workflow": "bulk_park", "status": "RUNNING"}, format="json")
            answer.update(status=response.status_code, body=response.json(), ended=time.monotonic())
        finally:
            connection.close()

    def canceled() -> int:
        return WorkflowRun.objects.filter(trace_id__in=parked, status="CANCELED").count()

    thread = threading.Thread(target=bulk_cancel)
    thread.start()
    try:
        wait_for(lambda: canceled() > 0, timeout=60, interval=0.02, what="the bulk cancel to commit its first runs")
        # New runs of the same workflow, started while the bulk works: they must not wait for it.
        fresh = [trigger(api, "bulk_park", {"park": False, "n": i}) for i in range(5)]
        progress = {canceled()}
        finished_while_bulk: list[int] = []

        def fresh_done() -> bool:
            n = canceled()
            progress.add(n)
            done = WorkflowRun.objects.filter(trace_id__in=fresh, status="SUCCESS").count()
            if done and n < 1000:
                finished_while_bulk.append(done)
            return done == len(fresh)

        wait_for(fresh_done, timeout=60, interval=0.05, what="the new runs to finish")
        while thread.is_alive():
            progress.add(canceled())
            time.sleep(0.05)
    finally:
        thread.join(timeout=300)

    assert answer["status"] == 200, answer
    assert answer["body"] == {"matched": 1000, "changed": 1000}
    assert finished_while_bulk, "no new run finished before the bulk cancel ended"
    # Committed run by run: the count was seen part-way, not jumping from none to all.
    assert len([n for n in progress if 0 < n < 1000]) >= 3, sorted(progress)
    assert wait_final(fresh, timeout=30) == dict.fromkeys(fresh, "SUCCESS")
    for run in WorkflowRun.objects.filter(trace_id__in=fresh):
        assert (run.finished_at - run.created_at).total_seconds() < 10, run
    assert set(WorkflowRun.objects.filter(trace_id__in=parked).values_list("status", flat=True)) == {"CANCELED"}
    park_statuses = TaskRun.objects.filter(run_id__in=parked, node_key="park").values_list("status", flat=True)
    assert set(park_statuses) == {"REVOKED"}
    again = api.post("/api/runs/cancel/", {"workflow": "bulk_park"}, format="json").json()
    assert again == {"matched": 1005, "changed": 0}
