"""The operators' pages in process: /workers/ from heartbeat rows, and the workflow page's per-node trends."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests import factories
from workflows_app import engine
from workflows_app.leases import worker_heartbeat
from workflows_app.models import TaskRun, Worker, WorkflowRun

pytestmark = pytest.mark.django_db

SLEEP = "workflows_app.tasks.sleep"


def start_task(run: WorkflowRun, node: str, worker: str) -> TaskRun:
    task = TaskRun.objects.select_related("current_event").get(run=run, node_key=node, map_index=None)
    assert engine.task_run_start(event_id=str(task.current_event_id), attempt=1, worker=worker)
    return task


def test_heartbeat_is_one_upsert_that_keeps_the_start_of_a_process(django_assert_num_queries):
    with django_assert_num_queries(1):
        worker_heartbeat(name="w1@host", queues=["b", "a"], pool_size=4, attempts=["e1"])
    first = Worker.objects.get(name="w1@host")
    assert (first.queues, first.pool_size, first.attempts) == (["a", "b"], 4, ["e1"])
    worker_heartbeat(name="w1@host", queues=["a"], pool_size=4, attempts=[])
    again = Worker.objects.get(name="w1@host")
    assert again.started_at == first.started_at and again.attempts == [] and again.last_seen >= first.last_seen
    # As if another process had written it an hour ago: this one is a restart, and starts anew.
    an_hour_ago = first.started_at - timedelta(hours=1)
    Worker.objects.filter(pk=again.pk).update(pid=1, started_at=an_hour_ago, last_seen=an_hour_ago)
    worker_heartbeat(name="w1@host", queues=["a"], pool_size=4, attempts=[])
    restarted = Worker.objects.get(name="w1@host")
    assert restarted.started_at == restarted.last_seen == first.started_at


def test_workers_page_lists_live_and_silent_workers_with_their_attempts_in_constant_queries(client, trigger_user):
    client.force_login(trigger_user)
    workflow = factories.workflow(
        factories.spec("busy", [("work", SLEEP)], event_type="busy_q", event_types={"busy_q": {"concurrency": 50}})
    )
    runs = [engine.workflow_run_start(workflow=workflow, payload={"n": i})[0] for i in range(3)]
    start_task(runs[0], "work", "live@host")
    lost = start_task(runs[1], "work", "gone@host")
    worker_heartbeat(name="live@host", queues=["busy_q"], pool_size=2, attempts=[])
    worker_heartbeat(name="gone@host", queues=["busy_q"], pool_size=2, attempts=[str(lost.current_event_id)])
    # Unheard for an hour and a minute: no longer listed.
    worker_heartbeat(name="old@host", queues=["busy_q"], pool_size=1, attempts=[])
    Worker.objects.filter(name="old@host").update(last_seen=timezone.now() - timedelta(minutes=61))
    Worker.objects.filter(name="gone@host").update(last_seen=timezone.now() - timedelta(minutes=5))

    with CaptureQueriesContext(connection) as few:
        html = client.get("/workers/").content.decode()
    assert 'data-worker="live@host" data-state="live" data-running="1"' in html
    assert 'data-worker="gone@host" data-state="silent"' in html
    assert "old@host" not in html
    assert f'data-run="{runs[0].trace_id}"' in html
    assert re.search(rf'data-attempt="{lost.current_event_id}" data-fate="pending"', html), html
    assert 'href="/workers/" class="active"' in html

    for i in range(3, 8):
        run = engine.workflow_run_start(workflow=workflow, payload={"n": i})[0]
        start_task(run, "work", f"more{i}@host")
        worker_heartbeat(name=f"more{i}@host", queues=["busy_q"], pool_size=1, attempts=[])
    with CaptureQueriesContext(connection) as many:
        html = client.get("/workers/").content.decode()
    assert html.count('data-state="live"') == 6
    assert len(many.captured_queries) == len(few.captured_queries)


def test_other_pages_link_to_workers(client, trigger_user):
    client.force_login(trigger_user)
    for url in ("/runs/", "/queues/", "/workflows/", "/approvals/"):
        assert 'href="/workers/"' in client.get(url).content.decode(), url


def test_workflow_page_shows_each_nodes_percentiles_and_failed_share_in_one_query(client, trigger_user):
    client.force_login(trigger_user)
    nodes = [(f"n{i}", SLEEP) for i in range(4)]
    workflow = factories.workflow(
        factories.spec("trend", nodes, event_type="trend_q", event_types={"trend_q": {"concurrency": 500}})
    )
    base = timezone.now()
    for i in range(10):
        run = engine.workflow_run_start(workflow=workflow, payload={"n": i})[0]
        for key, _ in nodes:
            failed = key == "n1" and i < 3
            TaskRun.objects.filter(run=run, node_key=key).update(
                status="FAILURE" if failed else "SUCCESS",
                queued_at=base,
                started_at=base + timedelta(seconds=1),
                finished_at=base + timedelta(seconds=1 + (i + 1)),
            )

    html = client.get("/workflows/trend/").content.decode()
    row = html.split('data-trend-node="n1"')[1].split("</tr>")[0]
    assert 'data-failed-share="0.3000"' in row and "30.0% (3 of 10)" in row
    # Durations 1..10 s: the median 5.5 s, the 95th percentile 9.55 s; each waited 1 s.
    cells = re.findall(r"<td class=\"num\" data-(\w+-p\d+)>([^<]*)</td>", row)
    assert dict(cells) == {"duration-p50": "5.5 s", "duration-p95": "9.5 s", "wait-p50": "1.0 s", "wait-p95": "1.0 s"}
    assert 'data-failed-share="0.0000"' in html.split('data-trend-node="n0"')[1].split("</tr>")[0]

    with CaptureQueriesContext(connection) as four:
        client.get("/workflows/trend/")
    more = factories.workflow(
        factories.spec(
            "trend", [(f"n{i}", SLEEP) for i in range(12)], event_type="trend_q", event_types={"trend_q": {}}
        )
    )
    engine.workflow_run_start(workflow=more, payload={})
    with CaptureQueriesContext(connection) as twelve:
        client.get("/workflows/trend/")
    assert len(twelve.captured_queries) == len(four.captured_queries)
    trend_queries = [q["sql"] for q in twelve.captured_queries if "percentile_cont" in q["sql"]]
    assert len(trend_queries) == 1
