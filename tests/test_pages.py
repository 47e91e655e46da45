"""The server-rendered pages: login, run list, run status page, its live fragment and nodes, workflows, queues."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from html import escape as html_escape
from html import unescape as html_unescape

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import F
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from events_app.models import Event
from tests import factories
from workflows_app import engine, graph_svg, selectors, views
from workflows_app.models import TaskRun, WorkflowDefinition, WorkflowRun

PIPELINE_KEYS = ["intake", "listing", "image", "upload_ali", "upload_1688", "publish_ali", "publish_1688"]
NODE_ATTRS = re.compile(r'data-node="([^"]+)" data-status="([^"]+)"')
SLEEP = "workflows_app.tasks.sleep"
TRACEBACK = 'Traceback (most recent call last):\n  File "tasks.py", line 3, in fail\nRuntimeError: disk full'

pytestmark = pytest.mark.django_db


@pytest.fixture
def browser(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def operator(client, trigger_user):
    """A client signed in as a user allowed to cancel and retry runs."""
    client.force_login(trigger_user)
    return client


def start(workflow, payload: dict | None = None) -> WorkflowRun:
    """A run, dated a millisecond after the runs this test started before it: the database dates a run
    with its transaction's start, and a test is one transaction."""
    run, _ = engine.workflow_run_start(workflow=workflow, payload=payload or {})
    later = WorkflowRun.objects.count() * timedelta(milliseconds=1)
    WorkflowRun.objects.filter(pk=run.pk).update(created_at=F("created_at") + later)
    run.refresh_from_db()
    return run


def section(html: str, start_marker: str, end_marker: str) -> str:
    begin = html.index(start_marker)
    return html[begin : html.index(end_marker, begin)]


def svg_node(html: str, key: str) -> str:
    """The drawing of one node: from its group to the next node's, or to the edge labels after the boxes."""
    begin = html.index(f'<g class="dag-node" data-node="{key}"')
    ends = [html.find(marker, begin + 1) for marker in ('<g class="dag-node"', '<g class="dag-cond"', "</svg>")]
    return html[begin : min(end for end in ends if end != -1)]


def svg_nodes(html: str) -> dict[str, str]:
    return dict(NODE_ATTRS.findall(section(html, '<svg class="dag"', "</svg>")))


def table_nodes(html: str) -> dict[str, str]:
    return dict(NODE_ATTRS.findall(section(html, '<table class="grid tasks">', "</table>")))


def line_workflow(name: str = "line", size: int = 3, *, concurrency: int = 1):
    """`size` independent roots on one event type of the given concurrency: the rest wait in line."""
    return factories.workflow(
        factories.spec(
            name,
            [(f"n{i}", "workflows_app.tasks.echo") for i in range(size)],
            event_type="q_line",
            event_types={"q_line": {"concurrency": concurrency}},
        )
    )


def layered_workflow(name: str, size: int, *, width: int = 10, event_type: str = "q_layers") -> WorkflowDefinition:
    """`size` sleep nodes in layers of `width`, each after one or two nodes of the layer before it."""
    keys = [f"n{i:03d}" for i in range(size)]
    edges = []
    for i in range(width, size):
        above = (i // width - 1) * width
        edges.append([keys[above + i % width], keys[i]])
        if i % 3 == 0:
            edges.append([keys[above + (i + 1) % width], keys[i]])
    return factories.workflow(
        factories.spec(
            name,
            [{"key": key, "task": SLEEP, "params": {"seconds": 0.01}} for key in keys],
            edges,
            event_type=event_type,
            event_types={event_type: {"concurrency": 4}},
        )
    )


def run_with_history(run: WorkflowRun) -> WorkflowRun:
    """Give a just-started run a past, as a busy run would have it, straight in the rows.

    In definition order: the first half SUCCESS (every seventh after a failed first attempt), then
    FAILURE with a traceback, STARTED, QUEUED in line, and WAITING; each attempt has its Event.
    """
    now = timezone.now()
    # The events the start sent to the roots are replaced by the made-up history.
    TaskRun.objects.filter(run=run).update(current_event=None)
    Event.objects.filter(trace_id=run.trace_id).delete()
    tasks = list(TaskRun.objects.filter(run=run).order_by("id"))
    events: list[Event] = []
    total = len(tasks)
    for i, task in enumerate(tasks):
        share = i / total
        status = (
            TaskRun.Status.SUCCESS
            if share < 0.5
            else TaskRun.Status.FAILURE
            if share < 0.6
            else TaskRun.Status.STARTED
            if share < 0.7
            else TaskRun.Status.QUEUED
            if share < 0.8
            else TaskRun.Status.WAITING
        )
        begun = now - timedelta(seconds=total - i)
        # (event status, result) per attempt; a task waiting in line already has the event it will be sent with.
        attempts = {
            TaskRun.Status.SUCCESS: [("SUCCESS", {"n": i})],
            TaskRun.Status.FAILURE: [("FAILURE", {"error": TRACEBACK})],
            TaskRun.Status.STARTED: [("STARTED", {})],
            TaskRun.Status.QUEUED: [("PENDING", {})],
            TaskRun.Status.WAITING: [],
        }[status]
        if i % 7 == 0 and status in (TaskRun.Status.SUCCESS, TaskRun.Status.FAILURE):
            attempts = [("FAILURE", {"error": TRACEBACK}), *attempts]
        for attempt, (event_status, result) in enumerate(attempts, start=1):
            events.append(
                Event(
                    event_id=uuid.uuid4(),
                    trace_id=run.trace_id,
                    event_type=task.event_type_id,
                    task_name=task.task_name,
                    payload={**run.payload, "seconds": 0.01},
                    result=result,
                    context={"workflow": run.workflow.name, "node": task.node_key, "attempt": attempt, "upstream": {}},
                    status=event_status,
                    timestamp=begun + timedelta(milliseconds=100 * attempt),
                )
            )
        ran = status not in (TaskRun.Status.QUEUED, TaskRun.Status.WAITING)
        task.status = status
        task.attempts = len(attempts) if ran else 0
        task.queued_at = begun if status != TaskRun.Status.WAITING else None
        task.started_at = begun + timedelta(milliseconds=200) if ran else None
        task.finished_at = now if status in (TaskRun.Status.SUCCESS, TaskRun.Status.FAILURE) else None
        task.holds_slot = status == TaskRun.Status.STARTED
        task.error = TRACEBACK if status == TaskRun.Status.FAILURE else ""
        task.result = {"n": i} if status == TaskRun.Status.SUCCESS else None
        task.current_event = events[-1] if attempts else None
    Event.objects.bulk_create(events)
    TaskRun.objects.bulk_update(
        tasks,
        [
            "status",
            "attempts",
            "queued_at",
            "started_at",
            "finished_at",
            "holds_slot",
            "error",
            "result",
            "current_event",
        ],
    )
    return run


def runs_bulk_insert(workflow: WorkflowDefinition, count: int, *, spread: timedelta = timedelta(days=30)) -> None:
    """Insert `count` runs of `workflow` in one statement, spread evenly over the last `spread`.

    Statuses cycle SUCCESS, SUCCESS, SUCCESS, FAILED, CANCELED, RUNNING; no tasks, as a list page reads none.
    """
    version = workflow.versions.order_by("-version").first()
    step = spread.total_seconds() / max(count, 1)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {WorkflowRun._meta.db_table}
                (trace_id, workflow_id, version_id, workflow_version, status, payload, source, created_at, finished_at)
            SELECT gen_random_uuid(), %s, %s, %s,
                   (ARRAY['SUCCESS', 'SUCCESS', 'SUCCESS', 'FAILED', 'CANCELED', 'RUNNING'])[1 + g %% 6],
                   '{{}}'::jsonb, 'bulk', now() - make_interval(secs => g * %s),
                   CASE WHEN g %% 6 = 5 THEN NULL ELSE now() - make_interval(secs => g * %s - 2) END
            FROM generate_series(1, %s) AS g
            """,
            [workflow.pk, version.pk, version.version, step, step, count],
        )


def _queries(client, url: str, data: dict | None = None) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, data or {})
        assert response.status_code == 200, url
    return len(captured.captured_queries)


# --------------------------------------------------------------------------- access


@pytest.mark.parametrize(
    "page", ["run-list", "run-detail", "run-live", "run-node", "workflow-list", "workflow-detail", "queue-list"]
)
def test_every_page_sends_anonymous_users_to_login(client, pipeline, page):
    run = start(pipeline)
    args = {
        "run-detail": [run.trace_id],
        "run-live": [run.trace_id],
        "run-node": [run.trace_id, "intake"],
        "workflow-detail": [pipeline.name],
    }.get(page, [])
    url = reverse(f"workflows_app:{page}", args=args)

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert "next=" in response["Location"]


@pytest.mark.parametrize(
    "page", ["run-list", "run-detail", "run-live", "run-node", "workflow-list", "workflow-detail", "queue-list"]
)
def test_pages_open_to_anonymous_users_when_the_admin_says_so(client, pipeline, page):
    run = start(pipeline)
    args = {
        "run-detail": [run.trace_id],
        "run-live": [run.trace_id],
        "run-node": [run.trace_id, "intake"],
        "workflow-detail": [pipeline.name],
    }.get(page, [])

    with override_settings(EVENTFLOW={**settings.EVENTFLOW, "PUBLIC_PAGES": True}):
        response = client.get(reverse(f"workflows_app:{page}", args=args))
        cancel = client.post(reverse("workflows_app:run-cancel", args=[run.trace_id]))

    assert response.status_code == 200
    # Open pages do not open the actions: changing a run still takes the permission.
    assert cancel.status_code == 403
    assert WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.RUNNING


def test_pages_need_a_login_by_default():
    assert settings.EVENTFLOW["PUBLIC_PAGES"] is False


def test_nav_links_every_section(browser):
    html = browser.get(reverse("workflows_app:run-list")).content.decode()

    for href in ('href="/runs/"', 'href="/workflows/"', 'href="/queues/"', 'href="/admin/"', 'href="/api/"'):
        assert href in html


# --------------------------------------------------------------------------- run list


def test_run_list_shows_runs_newest_first_with_links(browser, pipeline):
    older, newer = start(pipeline), start(pipeline)

    response = browser.get(reverse("workflows_app:run-list"))

    assert response.status_code == 200
    html = response.content.decode()
    assert html.index(str(newer.trace_id)) < html.index(str(older.trace_id))
    assert reverse("workflows_app:run-detail", args=[newer.trace_id]) in html
    assert reverse("workflows_app:workflow-detail", args=[pipeline.name]) in html


def test_run_list_filters_by_workflow_and_status_and_counts_per_status(browser, pipeline):
    other = factories.workflow(factories.spec("other"))
    done, running, elsewhere = start(pipeline), start(pipeline), start(other)
    WorkflowRun.objects.filter(pk=done.pk).update(status=WorkflowRun.Status.SUCCESS, finished_at=timezone.now())
    url = reverse("workflows_app:run-list")

    by_workflow = browser.get(url, {"workflow": pipeline.name}).content.decode()
    by_status = browser.get(url, {"workflow": pipeline.name, "status": "success"}).content.decode()
    all_runs = browser.get(url).content.decode()

    assert str(done.trace_id) in by_workflow and str(running.trace_id) in by_workflow
    assert str(elsewhere.trace_id) not in by_workflow
    assert str(done.trace_id) in by_status
    assert str(running.trace_id) not in by_status
    # Counts follow the workflow filter, whatever the status filter.
    assert re.search(r'data-count-status="ALL">all <strong>2</strong>', by_status)
    assert re.search(r'data-count-status="SUCCESS">.*?<strong>1</strong>', by_status)
    assert re.search(r'data-count-status="RUNNING">.*?<strong>1</strong>', by_status)
    assert re.search(r'data-count-status="ALL">all <strong>3</strong>', all_runs)


def test_run_list_filters_by_time_and_counts_within_the_window(browser, pipeline):
    now = timezone.now()
    old, last_week, today = start(pipeline), start(pipeline), start(pipeline)
    WorkflowRun.objects.filter(pk=old.pk).update(created_at=now - timedelta(days=40))
    WorkflowRun.objects.filter(pk=last_week.pk).update(created_at=now - timedelta(days=6))
    url = reverse("workflows_app:run-list")
    day = (now - timedelta(days=6)).date().isoformat()

    week = browser.get(url, {"since": "7d"}).content.decode()
    hour = browser.get(url, {"since": "1h"}).content.decode()
    until_day = browser.get(url, {"until": day}).content.decode()
    on_day = browser.get(url, {"since": day, "until": day}).content.decode()

    assert str(today.trace_id) in week and str(last_week.trace_id) in week and str(old.trace_id) not in week
    assert re.search(r'data-count-status="ALL">all <strong>2</strong>', week)
    assert str(today.trace_id) in hour and str(last_week.trace_id) not in hour
    # A bare date as the end includes that whole day.
    assert str(last_week.trace_id) in until_day and str(old.trace_id) in until_day
    assert str(today.trace_id) not in until_day
    assert re.findall(r'<tr data-trace-id="([^"]+)"', on_day) == [str(last_week.trace_id)]
    # The status chips keep the time window.
    assert "since=7d&amp;status=RUNNING" in week


def test_run_list_ignores_a_time_filter_it_cannot_read(browser, pipeline):
    run = start(pipeline)

    response = browser.get(reverse("workflows_app:run-list"), {"since": "yesterday-ish", "until": "2026-13-45"})

    assert response.status_code == 200
    html = response.content.decode()
    assert str(run.trace_id) in html
    assert '"since" ignored' in html and '"until" ignored' in html


def test_parse_moment_reads_dates_times_and_spans():
    now = timezone.now()

    assert views.parse_moment("24h", now=now) == now - timedelta(hours=24)
    assert views.parse_moment("15m", now=now) == now - timedelta(minutes=15)
    assert views.parse_moment("2026-11-21").isoformat() == "2026-11-21T00:00:00+00:00"
    assert views.parse_moment("2026-11-21", end=True).isoformat() == "2026-11-22T00:00:00+00:00"
    assert views.parse_moment("2026-11-21T10:30").isoformat() == "2026-11-21T10:30:00+00:00"
    assert views.parse_moment("2026-11-21T10:30:00+02:00").isoformat() == "2026-11-21T10:30:00+02:00"
    assert views.parse_moment("") is None and views.parse_moment("soon") is None
    assert views.parse_moment("2026-02-30") is None


def test_run_list_pages_by_keyset_both_ways(browser):
    workflow = factories.workflow(factories.spec("many"))
    runs = [start(workflow) for _ in range(51)]
    url = reverse("workflows_app:run-list")

    first = browser.get(url, {"status": "bogus"}).content.decode()
    older_link = re.search(r'href="\?([^"]+)" rel="next"', first).group(1).replace("&amp;", "&")
    second = browser.get(f"{url}?{older_link}").content.decode()
    newer_link = re.search(r'href="\?([^"]+)" rel="prev"', second).group(1).replace("&amp;", "&")
    back = browser.get(f"{url}?{newer_link}").content.decode()

    assert first.count("data-trace-id=") == 50
    assert 'rel="prev"' not in first
    assert re.findall(r'<tr data-trace-id="([^"]+)"', second) == [str(runs[0].trace_id)]
    assert 'rel="next"' not in second and 'data-page="newest"' in second
    assert re.findall(r'<tr data-trace-id="([^"]+)"', back) == re.findall(r'<tr data-trace-id="([^"]+)"', first)


def test_run_list_keyset_breaks_ties_on_the_same_instant(browser):
    workflow = factories.workflow(factories.spec("ties"))
    runs = [start(workflow) for _ in range(7)]
    moment = timezone.now()
    WorkflowRun.objects.update(created_at=moment)
    expected = sorted(str(r.trace_id) for r in runs)
    seen: list[str] = []

    older, more = None, True
    while more:
        page, more = selectors.run_page_list(older_than=older, limit=3)
        seen += [str(r.trace_id) for r in page]
        older = (page[-1].created_at, str(page[-1].trace_id))

    back, _ = selectors.run_page_list(newer_than=(moment, expected[3]), limit=2)
    assert seen == expected
    assert [str(r.trace_id) for r in back] == expected[1:3]


def test_run_list_ignores_a_malformed_cursor(browser, pipeline):
    run = start(pipeline)

    for cursor in ("nonsense", "2026-11-21T10:00:00_not-a-uuid", f"2026-11-21T10:00:00_{uuid.uuid4()}"):
        response = browser.get(reverse("workflows_app:run-list"), {"older": cursor})
        assert response.status_code == 200
        assert str(run.trace_id) in response.content.decode()


def test_run_list_caps_each_count(browser, pipeline, monkeypatch):
    monkeypatch.setattr(views, "RUN_COUNT_CAP", 2)
    for _ in range(3):
        start(pipeline)

    html = browser.get(reverse("workflows_app:run-list")).content.decode()

    assert re.search(r'data-count-status="RUNNING">.*?<strong>2\+</strong>', html)
    assert re.search(r'data-count-status="ALL">all <strong>2\+</strong>', html)
    assert html.count("data-trace-id=") == 3


def test_run_list_survives_a_workflow_filter_that_is_no_slug(browser, pipeline):
    response = browser.get(reverse("workflows_app:run-list"), {"workflow": "no such/<b>"})

    assert response.status_code == 200
    html = response.content.decode()
    assert "<b>" not in html and "no such/&lt;b&gt;" in html
    assert "No runs match these filters" in html


# --------------------------------------------------------------------------- run page


def test_run_page_draws_every_node_in_the_svg_and_the_task_table(browser, pipeline):
    run = start(pipeline, {"product": "lamp"})

    response = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id]))

    assert response.status_code == 200
    html = response.content.decode()
    expected = {key: "WAITING" for key in PIPELINE_KEYS} | {"intake": "QUEUED"}
    assert svg_nodes(html) == expected
    assert table_nodes(html) == expected
    assert pipeline.name in html and "lamp" in html
    assert html.count('class="dag-edge"') == 8
    assert 'class="timeline"' in html
    assert 'data-final="false"' in html
    assert reverse("workflows_app:run-live", args=[run.trace_id]) in html


def test_run_page_escapes_user_data(browser, pipeline):
    run = start(pipeline, {"product": "<script>alert(1)</script>"})

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_run_page_shows_error_first_line_and_timings(browser, pipeline):
    run = start(pipeline)
    now = timezone.now()
    TaskRun.objects.filter(run=run, node_key="intake").update(
        status=TaskRun.Status.FAILURE,
        attempts=2,
        started_at=now - timedelta(seconds=3),
        finished_at=now,
        error="RuntimeError: disk full\nmore detail",
    )

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    assert svg_nodes(html)["intake"] == "FAILURE"
    assert "RuntimeError: disk full" in html
    assert "3.0 s" in html
    assert "attempt 2" in html


def test_live_fragment_reflects_a_changed_status(browser, pipeline):
    run = start(pipeline)
    url = reverse("workflows_app:run-live", args=[run.trace_id])
    assert table_nodes(browser.get(url).content.decode())["intake"] == "QUEUED"

    TaskRun.objects.filter(run=run, node_key="intake").update(status=TaskRun.Status.STARTED, started_at=timezone.now())
    response = browser.get(url)

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    html = response.content.decode()
    assert "<html" not in html
    assert html.lstrip().startswith('<section id="run-live"')
    assert svg_nodes(html)["intake"] == "STARTED"
    assert table_nodes(html)["intake"] == "STARTED"
    assert 'data-final="false"' in html


def test_final_run_page_does_not_poll(browser, pipeline):
    run = start(pipeline)
    TaskRun.objects.filter(run=run).update(status=TaskRun.Status.SUCCESS, finished_at=timezone.now())
    WorkflowRun.objects.filter(pk=run.pk).update(status=WorkflowRun.Status.SUCCESS, finished_at=timezone.now())

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()
    fragment = browser.get(reverse("workflows_app:run-live", args=[run.trace_id])).content.decode()

    assert 'data-final="true"' in html and 'data-final="true"' in fragment
    assert "function poll" not in html
    assert set(svg_nodes(html).values()) == {"SUCCESS"}


def test_running_run_page_polls_the_live_fragment(browser, pipeline):
    run = start(pipeline)

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    assert "function poll" in html
    assert 'data-live-url="{}"'.format(reverse("workflows_app:run-live", args=[run.trace_id])) in html


def test_queued_tasks_show_their_place_in_line(browser):
    workflow = line_workflow(size=3, concurrency=1)
    first, second = start(workflow), start(workflow)

    first_html = browser.get(reverse("workflows_app:run-detail", args=[first.trace_id])).content.decode()
    second_html = browser.get(reverse("workflows_app:run-detail", args=[second.trace_id])).content.decode()

    # n0 of the first run took the only slot; everything else waits, first in, first out.
    assert "sent to a worker" in first_html
    assert re.findall(r'data-line-position="(\d+)"', first_html) == ["1", "2"]
    assert re.findall(r'data-line-position="(\d+)"', second_html) == ["3", "4", "5"]
    assert "#5 in line" in second_html


def test_unknown_run_is_a_plain_404(browser):
    response = browser.get(reverse("workflows_app:run-detail", args=[uuid.uuid4()]))
    live = browser.get(reverse("workflows_app:run-live", args=[uuid.uuid4()]))

    assert response.status_code == 404 and live.status_code == 404
    html = response.content.decode()
    assert "Not found" in html
    assert "Traceback" not in html and "Http404" not in html


def test_malformed_trace_id_is_a_plain_404(browser):
    response = browser.get("/runs/not-a-uuid/")

    assert response.status_code == 404
    html = response.content.decode()
    assert "Not found" in html
    assert "Traceback" not in html and "URLconf" not in html


# --------------------------------------------------------------------------- node detail


def test_every_node_links_to_its_detail_from_the_graph_and_the_table(browser, pipeline):
    run = start(pipeline)

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    for key in PIPELINE_KEYS:
        url = reverse("workflows_app:run-node", args=[run.trace_id, key])
        assert f'<a href="{url}" class="dag-link" data-node-link="{key}">' in section(
            html, '<svg class="dag"', "</svg>"
        )
        assert f'<a href="{url}" data-node-link="{key}">' in section(html, '<table class="grid tasks">', "</table>")
    assert 'id="node-panel"' in html


def test_node_detail_shows_payload_result_error_every_attempt_and_its_event(browser):
    run = run_with_history(start(layered_workflow("detail", 30), {"product": "lamp"}))
    failed = TaskRun.objects.filter(run=run, status=TaskRun.Status.FAILURE).order_by("id").first()
    retried = TaskRun.objects.filter(run=run, status=TaskRun.Status.SUCCESS, attempts=2).first()
    url = reverse("workflows_app:run-node", args=[run.trace_id, failed.node_key])

    page = browser.get(url)
    fragment = browser.get(url, {"fragment": "1"})
    success = browser.get(reverse("workflows_app:run-node", args=[run.trace_id, retried.node_key])).content.decode()

    assert page.status_code == 200 and fragment.status_code == 200
    html, part = page.content.decode(), fragment.content.decode()
    assert "<html" in html and "<html" not in part
    assert part.lstrip().startswith(f'<div class="node-detail" data-node="{failed.node_key}" data-status="FAILURE"')
    assert "RuntimeError: disk full" in part and "Traceback (most recent call last)" in part
    assert "&quot;product&quot;: &quot;lamp&quot;" in part
    assert f'data-event-id="{failed.current_event_id}"' in part
    assert f"&quot;event_id&quot;: &quot;{failed.current_event_id}&quot;" in part
    assert reverse("workflows_app:run-detail", args=[run.trace_id]) in part
    # A retried node lists both attempts, the failed one with its error; its result is shown.
    assert success.count('<tr data-event-id="') == 2
    assert 'data-status="FAILURE"' in section(success, '<table class="grid attempts">', "</table>")
    assert "&quot;n&quot;:" in section(success, '<pre class="result">', "</pre>")


def test_node_detail_of_a_node_not_sent_yet(browser, pipeline):
    run = start(pipeline, {"product": "lamp"})

    html = browser.get(reverse("workflows_app:run-node", args=[run.trace_id, "publish_ali"])).content.decode()

    assert 'data-status="WAITING"' in html
    assert "Not sent yet" in html and "No event yet" in html
    # The payload it will get: the run's, with the node's params over it.
    assert "&quot;product&quot;: &quot;lamp&quot;" in html
    assert reverse("workflows_app:run-node", args=[run.trace_id, "upload_ali"]) in html


def test_node_detail_shows_the_place_in_line(browser):
    workflow = line_workflow(size=3, concurrency=1)
    run = start(workflow)

    html = browser.get(reverse("workflows_app:run-node", args=[run.trace_id, "n2"])).content.decode()

    assert "#2 in line" in html


def test_unknown_or_malformed_node_is_a_plain_404(browser, pipeline):
    run = start(pipeline)

    unknown = browser.get(reverse("workflows_app:run-node", args=[run.trace_id, "nope"]))
    malformed = browser.get(f"/runs/{run.trace_id}/nodes/not%20a%20key/")
    no_run = browser.get(reverse("workflows_app:run-node", args=[uuid.uuid4(), "intake"]))

    for response in (unknown, malformed, no_run):
        assert response.status_code == 404
        html = response.content.decode()
        assert "Not found" in html and "Traceback" not in html


# --------------------------------------------------------------------------- cancel and retry


def test_cancel_button_cancels_the_run_and_says_so(operator, pipeline):
    run = start(pipeline)
    page = operator.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()
    cancel_url = reverse("workflows_app:run-cancel", args=[run.trace_id])

    response = operator.post(cancel_url, follow=True)

    assert f'action="{cancel_url}"' in page and "csrfmiddlewaretoken" in page
    assert response.redirect_chain == [(reverse("workflows_app:run-detail", args=[run.trace_id]), 302)]
    assert WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.CANCELED
    html = response.content.decode()
    assert "Run canceled" in html
    assert set(svg_nodes(html).values()) == {"REVOKED"}
    # A final, canceled run offers a retry and no cancel.
    assert 'data-action="retry"' in html and 'data-action="cancel"' not in html


def test_retry_button_restarts_a_failed_run(operator, pipeline):
    run = start(pipeline)
    engine.workflow_run_cancel(trace_id=str(run.trace_id))

    response = operator.post(reverse("workflows_app:run-retry", args=[run.trace_id]), follow=True)

    assert response.status_code == 200
    assert WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.RUNNING
    assert "Run restarted" in response.content.decode()


def test_refused_retry_is_a_message_not_an_error(operator, pipeline):
    run = start(pipeline)

    response = operator.post(reverse("workflows_app:run-retry", args=[run.trace_id]), follow=True)
    again = operator.post(reverse("workflows_app:run-cancel", args=[run.trace_id]), follow=True)
    twice = operator.post(reverse("workflows_app:run-cancel", args=[run.trace_id]), follow=True)

    assert response.status_code == 200
    assert "only a failed or canceled run can be retried" in response.content.decode()
    assert 'class="error"' in response.content.decode()
    assert again.status_code == 200 and twice.status_code == 200
    assert "already CANCELED: nothing to cancel" in twice.content.decode()


def test_actions_need_the_change_permission(browser, client, pipeline):
    run = start(pipeline)
    page = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    denied = browser.post(reverse("workflows_app:run-cancel", args=[run.trace_id]))
    client.logout()
    anonymous = client.post(reverse("workflows_app:run-retry", args=[run.trace_id]))

    assert 'data-action="cancel"' not in page
    assert denied.status_code == 403 and anonymous.status_code == 403
    assert "Traceback" not in denied.content.decode()
    assert WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.RUNNING


def test_actions_are_post_only_with_csrf(trigger_user, pipeline):
    run = start(pipeline)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(trigger_user)
    url = reverse("workflows_app:run-cancel", args=[run.trace_id])

    assert strict.get(url).status_code == 405
    assert strict.post(url).status_code == 403
    assert WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.RUNNING


def test_action_on_an_unknown_run_is_a_404(operator, db):
    assert operator.post(reverse("workflows_app:run-cancel", args=[uuid.uuid4()])).status_code == 404
    assert operator.post("/runs/not-a-uuid/retry/").status_code == 404


# --------------------------------------------------------------------------- workflow page


def test_workflow_page_draws_the_definition_with_its_settings(browser, pipeline):
    run = start(pipeline)

    response = browser.get(reverse("workflows_app:workflow-detail", args=[pipeline.name]))

    assert response.status_code == 200
    html = response.content.decode()
    drawn = re.findall(r'<g class="dag-node" data-node="([^"]+)"', html)
    assert sorted(drawn) == sorted(PIPELINE_KEYS)
    assert "data-status" not in section(html, '<svg class="dag"', "</svg>")
    assert "product_image (2)" in html
    assert "workflows_app.tasks.sleep" in html
    assert 'data-version="1"' in html
    assert str(run.trace_id) in html


def test_unknown_workflow_is_a_404(browser, db):
    assert browser.get(reverse("workflows_app:workflow-detail", args=["nope"])).status_code == 404


def test_workflow_list_shows_each_workflow_with_its_latest_run(browser, pipeline):
    idle = factories.workflow(factories.spec("idle"))
    start(pipeline)
    latest = start(pipeline)

    html = browser.get(reverse("workflows_app:workflow-list")).content.decode()

    assert reverse("workflows_app:workflow-detail", args=[pipeline.name]) in html
    assert reverse("workflows_app:workflow-detail", args=[idle.name]) in html
    row = section(html, f'data-workflow="{pipeline.name}"', "</tr>")
    assert reverse("workflows_app:run-detail", args=[latest.trace_id]) in row
    assert '<td class="num">7</td>' in row
    assert "none yet" in section(html, 'data-workflow="idle"', "</tr>")
    assert reverse("admin:workflows_app_workflowdefinition_change", args=[idle.pk]) in html


def test_admin_change_page_of_a_workflow_previews_its_graph(admin_client, pipeline):
    html = admin_client.get(
        reverse("admin:workflows_app_workflowdefinition_change", args=[pipeline.pk])
    ).content.decode()

    drawn = re.findall(r'<g class="dag-node" data-node="([^"]+)"', html)
    assert sorted(drawn) == sorted(PIPELINE_KEYS)
    assert html.count('class="dag-edge"') == 8
    assert f'href="{reverse("workflows_app:workflow-detail", args=[pipeline.name])}#node-intake"' in html
    add = admin_client.get(reverse("admin:workflows_app_workflowdefinition_add"))
    assert add.status_code == 200


# --------------------------------------------------------------------------- queues page


def test_queue_page_counts_running_and_queued_per_event_type(browser):
    workflow = line_workflow(size=3, concurrency=1)
    start(workflow)
    TaskRun.objects.filter(status=TaskRun.Status.QUEUED, holds_slot=False).update(
        queued_at=timezone.now() - timedelta(seconds=90)
    )

    response = browser.get(reverse("workflows_app:queue-list"))

    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-event-type="q_line" data-running="1" data-queued="2"' in html
    assert "1m 30s" in html


def test_queue_page_lists_idle_types_with_zeros(browser, pipeline):
    html = browser.get(reverse("workflows_app:queue-list")).content.decode()

    assert 'data-event-type="product_image" data-running="0" data-queued="0"' in html


def test_queue_page_counts_tasks_finished_in_the_last_hour(browser):
    workflow = line_workflow(size=5, concurrency=5)
    run = start(workflow)
    now = timezone.now()
    finished = {
        "n0": (TaskRun.Status.SUCCESS, now - timedelta(minutes=5)),
        "n1": (TaskRun.Status.SUCCESS, now - timedelta(minutes=59)),
        "n2": (TaskRun.Status.FAILURE, now - timedelta(minutes=10)),
        "n3": (TaskRun.Status.SUCCESS, now - timedelta(minutes=61)),
        "n4": (TaskRun.Status.REVOKED, now - timedelta(minutes=1)),
    }
    for key, (status, at) in finished.items():
        TaskRun.objects.filter(run=run, node_key=key).update(status=status, finished_at=at, holds_slot=False)

    html = browser.get(reverse("workflows_app:queue-list")).content.decode()

    # Revoked tasks never ran to an end and the one past the hour is out of the window.
    assert 'data-done-last-hour="3" data-failed-last-hour="1"' in html
    assert reverse("admin:events_app_eventtype_change", args=["q_line"]) in html


def test_throughput_counts_read_the_index_of_finished_tasks(db):
    queryset = selectors.event_type_queue_page_list(since=timezone.now() - timedelta(hours=1))
    sql, params = queryset.query.sql_with_params()

    with connection.cursor() as cursor:
        # On a near-empty table the planner would scan it whole; this asks whether the index can serve.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())

    assert "task_run_ended_idx" in plan


# --------------------------------------------------------------------------- links


def test_pages_link_to_each_other_and_to_the_admin(admin_client, pipeline):
    run = start(pipeline)
    run_url = reverse("workflows_app:run-detail", args=[run.trace_id])
    workflow_url = reverse("workflows_app:workflow-detail", args=[pipeline.name])
    pages = {
        "runs": reverse("workflows_app:run-list"),
        "run": run_url,
        "node": reverse("workflows_app:run-node", args=[run.trace_id, "intake"]),
        "workflows": reverse("workflows_app:workflow-list"),
        "workflow": workflow_url,
        "queues": reverse("workflows_app:queue-list"),
    }
    html = {name: admin_client.get(url).content.decode() for name, url in pages.items()}
    nav = ("/runs/", "/workflows/", "/queues/", "/admin/")

    for name, body in html.items():
        for href in nav:
            assert f'href="{href}"' in body, (name, href)
    assert run_url in html["runs"] and workflow_url in html["runs"]
    assert workflow_url in html["run"] and pages["node"] in html["run"]
    assert reverse("admin:workflows_app_workflowrun_change", args=[run.pk]) in html["run"]
    assert run_url in html["node"] and workflow_url in html["node"]
    assert reverse("admin:workflows_app_taskrun_change", args=[run.tasks.get(node_key="intake").pk]) in html["node"]
    assert workflow_url in html["workflows"]
    assert run_url in html["workflow"]
    assert reverse("admin:workflows_app_workflowdefinition_change", args=[pipeline.pk]) in html["workflow"]
    assert reverse("admin:events_app_eventtype_change", args=["product_src"]) in html["queues"]


def test_admin_pages_link_back_to_the_status_pages(admin_client, pipeline):
    run = start(pipeline)
    task = run.tasks.get(node_key="intake")
    admin_pages = [
        reverse("admin:index"),
        reverse("admin:workflows_app_workflowrun_change", args=[run.pk]),
        reverse("admin:workflows_app_workflowrun_changelist"),
        reverse("admin:workflows_app_taskrun_change", args=[task.pk]),
        reverse("admin:workflows_app_workflowdefinition_change", args=[pipeline.pk]),
    ]
    html = [admin_client.get(url).content.decode() for url in admin_pages]

    assert 'href="/"' in html[0]  # "View site", which leads to the run list
    assert admin_client.get("/").url == reverse("workflows_app:run-list")
    assert reverse("workflows_app:run-detail", args=[run.trace_id]) in html[1]
    assert reverse("workflows_app:run-detail", args=[run.trace_id]) in html[2]
    assert reverse("workflows_app:run-detail", args=[run.trace_id]) in html[3]
    assert reverse("workflows_app:workflow-detail", args=[pipeline.name]) in html[4]


# --------------------------------------------------------------------------- query counts


def test_run_page_query_count_does_not_grow_with_the_graph(browser):
    small = run_with_history(start(layered_workflow("small", 3, width=2)))
    large = run_with_history(start(layered_workflow("large", 300, event_type="q_large")))

    def counts(run: WorkflowRun) -> tuple[int, int, int]:
        return (
            _queries(browser, reverse("workflows_app:run-detail", args=[run.trace_id])),
            _queries(browser, reverse("workflows_app:run-live", args=[run.trace_id])),
            _queries(browser, reverse("workflows_app:run-node", args=[run.trace_id, "n000"]), {"fragment": "1"}),
        )

    large_html = browser.get(reverse("workflows_app:run-detail", args=[large.trace_id])).content.decode()
    assert len(svg_nodes(large_html)) == 300
    assert set(svg_nodes(large_html).values()) == {"SUCCESS", "FAILURE", "STARTED", "QUEUED", "WAITING"}
    assert counts(small) == counts(large)


def test_run_list_query_count_does_not_grow_with_100000_runs(browser):
    workflow = factories.workflow(factories.spec("busy"))
    start(workflow)
    url = reverse("workflows_app:run-list")
    views_of_the_list = [
        {},
        {"workflow": "busy", "status": "FAILED"},
        {"since": "7d", "status": "SUCCESS"},
    ]
    before = [_queries(browser, url, data) for data in views_of_the_list]

    runs_bulk_insert(workflow, 100_000)
    after = [_queries(browser, url, data) for data in views_of_the_list]
    page = browser.get(url, {"workflow": "busy"}).content.decode()
    older = re.search(r'href="\?([^"]+)" rel="next"', page).group(1).replace("&amp;", "&")
    deep = _queries(browser, f"{url}?{older}")

    assert WorkflowRun.objects.count() == 100_001
    assert before == after
    assert deep == after[0]
    assert page.count("data-trace-id=") == views.RUNS_PER_PAGE
    # Counts stop at the cap rather than reading all 100,000 rows.
    assert re.search(r'data-count-status="SUCCESS">.*?<strong>10,000\+</strong>', page)


def test_list_pages_query_count_does_not_grow_with_rows(browser):
    few = layered_workflow("few", 3, width=2)
    start(few)
    before = {
        "runs": _queries(browser, reverse("workflows_app:run-list")),
        "workflows": _queries(browser, reverse("workflows_app:workflow-list")),
        "workflow": _queries(browser, reverse("workflows_app:workflow-detail", args=["few"])),
        "queues": _queries(browser, reverse("workflows_app:queue-list")),
    }
    many = layered_workflow("many", 30, event_type="q_many")
    for _ in range(5):
        run_with_history(start(many))
        start(few)
    factories.workflow(factories.spec("other_types", event_type="q_other"))

    after = {
        "runs": _queries(browser, reverse("workflows_app:run-list")),
        "workflows": _queries(browser, reverse("workflows_app:workflow-list")),
        "workflow": _queries(browser, reverse("workflows_app:workflow-detail", args=["many"])),
        "queues": _queries(browser, reverse("workflows_app:queue-list")),
    }

    assert before == after


# --------------------------------------------------------------------------- layout


def test_layout_puts_each_node_one_column_after_its_deepest_predecessor(pipeline):
    spec = factories.product_pipeline_spec()
    keys = tuple(node["key"] for node in spec["nodes"])
    placed = graph_svg.layout(keys, tuple(tuple(edge) for edge in spec["edges"]))

    columns = {key: placed.positions[key][0] for key in keys}
    assert columns["intake"] < columns["listing"] == columns["image"]
    assert columns["image"] < columns["upload_ali"] == columns["upload_1688"]
    assert columns["upload_ali"] < columns["publish_ali"] == columns["publish_1688"]
    # No two boxes overlap.
    corners = sorted(placed.positions.values())
    assert len(set(corners)) == len(corners)
    assert all(0 <= x <= placed.width and 0 <= y <= placed.height for x, y in corners)


def test_svg_escapes_labels():
    svg = graph_svg.dag_svg([graph_svg.SvgNode(key="a", lines=("<b>&",), status="SUCCESS")], [])

    assert "<b>&" not in svg
    assert "&lt;b&gt;&amp;" in svg
    assert 'data-node="a" data-status="SUCCESS"' in svg


def test_pages_draw_a_node_of_a_kind_that_needs_no_worker(browser, api):
    """`noop` (tests/kinds.py) has no event type and no task: the pages show its kind instead."""
    import tests.kinds  # noqa: F401 - registers the `noop` kind

    workflow = factories.workflow(
        factories.spec(
            "kinded",
            [{"key": "gate", "kind": "noop", "event_type": None}, ("a", "workflows_app.tasks.echo")],
            [["gate", "a"]],
        )
    )
    run = start(workflow)
    pages = [
        reverse("workflows_app:run-detail", args=[run.trace_id]),
        reverse("workflows_app:run-node", args=[run.trace_id, "gate"]),
        reverse("workflows_app:workflow-detail", args=[workflow.name]),
        reverse("workflows_app:queue-list"),
    ]
    for url in pages:
        assert browser.get(url).status_code == 200, url
    html = browser.get(pages[2]).content.decode()
    assert 'data-node="gate" data-kind="noop"' in html and "noop" in section(html, '<svg class="dag"', "</svg>")
    tasks = {t["node"]: t for t in api.get(f"/api/runs/{run.trace_id}/").json()["tasks"]}
    assert (tasks["gate"]["status"], tasks["gate"]["event_type"], tasks["a"]["status"]) == ("SUCCESS", None, "QUEUED")


# --------------------------------------------------------------------------- branches and maps

ECHO = "workflows_app.tasks.echo"
SKIP_REASON = "the condition of edge moderate -> publish_1688 (`result.allowed_1688`) was false"


def branching_workflow(name: str = "branching") -> WorkflowDefinition:
    """list -> upload (mapped over the list's images) -> publish; list -> moderate -> publish_1688, taken
    only when moderation allows it."""
    return factories.workflow(
        factories.spec(
            name,
            [
                ("list", ECHO),
                {"key": "upload", "task": ECHO, "map_over": "upstream.list.images"},
                ("publish", ECHO),
                ("moderate", ECHO),
                ("publish_1688", ECHO),
            ],
            [
                ["list", "upload"],
                ["upload", "publish"],
                ["list", "moderate"],
                {"from": "moderate", "to": "publish_1688", "when": "result.allowed_1688"},
            ],
        )
    )


def branching_run(statuses: list[str], *, events: bool = False) -> WorkflowRun:
    """A run of `branching_workflow` part-way: list and moderate done, upload mapped with one instance per
    status, publish_1688 skipped by its edge's condition."""
    workflow = WorkflowDefinition.objects.filter(name="branching").first() or branching_workflow()
    run = start(workflow)
    now = timezone.now()
    factories.task_set(run, "list", status="SUCCESS", started_at=now, finished_at=now, result={"images": [1]})
    factories.task_set(run, "moderate", status="SUCCESS", started_at=now, finished_at=now, result={})
    factories.task_set(run, "publish_1688", status="SKIPPED", finished_at=now, error=SKIP_REASON)
    factories.map_instances(run, "upload", statuses, events=events)
    return run


def test_run_page_draws_a_mapped_node_once_with_its_counts(browser):
    run = branching_run(["SUCCESS"] * 180 + ["STARTED"] * 3 + ["QUEUED"] * 17)

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    svg = section(html, '<svg class="dag"', "</svg>")
    assert svg_nodes(html) == {
        "list": "SUCCESS",
        "upload": "STARTED",
        "publish": "WAITING",
        "moderate": "SUCCESS",
        "publish_1688": "SKIPPED",
    }
    assert table_nodes(html) == svg_nodes(html)
    upload = svg_node(svg, "upload")
    assert 'data-mapped="true"' in upload and 'class="dag-stack"' in upload
    assert "180 \u2713 3 running 17 queued" in upload
    assert "\u00d7200" in upload
    row = section(html, '<tr id="task-upload"', "</tr>")
    assert 'data-instances="200"' in row and "180 \u2713 \u00b7 3 running \u00b7 17 queued" in row
    # Its attempts are its instances': 183 sent so far.
    assert '<td class="num">183</td>' in row


def test_run_page_shows_why_a_node_was_skipped(browser):
    run = branching_run(["SUCCESS"])

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()
    detail = browser.get(reverse("workflows_app:run-node", args=[run.trace_id, "publish_1688"])).content.decode()

    skipped = svg_node(html, "publish_1688")
    assert 'stroke-dasharray="6 4"' in skipped
    assert "the condition of edge moderate -&gt; publish_1688" in skipped
    row = section(html, '<tr id="task-publish_1688"', "</tr>")
    assert 'class="wrap reason"' in row and "(`result.allowed_1688`) was false" in row
    assert "Why it did not run" in detail and "Skipped: the condition of edge" in detail
    assert "<h2>Error</h2>" not in detail


def test_run_page_draws_each_condition_on_its_edge(browser):
    run = branching_run(["SUCCESS"])

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    svg = section(html, '<svg class="dag"', "</svg>")
    assert svg.count('class="dag-cond"') == 1
    label = section(svg, '<g class="dag-cond" data-edge="moderate publish_1688"', "</g>")
    assert "<title>moderate \u2192 publish_1688 when result.allowed_1688</title>" in label
    assert "result.allowed_1688" in label
    assert svg.count('stroke-dasharray="5 3"') == 1


def test_a_long_condition_is_cut_on_the_drawing_and_whole_in_its_title():
    when = "result.allowed_1688 && payload.region in ['cn', 'hk', 'tw'] && size(upstream.list.images) > 2"
    svg = graph_svg.dag_svg(
        [graph_svg.SvgNode(key="a"), graph_svg.SvgNode(key="b")], [("a", "b")], conditions={("a", "b"): when}
    )

    label = section(svg, '<g class="dag-cond"', "</g>")
    shown = re.search(r'monospace">([^<]*)</text>', label).group(1)
    assert shown.endswith("\u2026") and len(html_unescape(shown)) < 30
    assert html_escape(when) in label


def test_node_detail_of_a_mapped_node_pages_its_instances(browser):
    statuses = ["SUCCESS"] * 100 + ["FAILURE"] * 3 + ["STARTED"] * 17
    run = branching_run(statuses, events=True)
    url = reverse("workflows_app:run-node", args=[run.trace_id, "upload"])

    def indexes(html: str) -> list[int]:
        return [int(i) for i in re.findall(r'<tr data-map-index="(\d+)"', html)]

    first = browser.get(url).content.decode()
    last = browser.get(url, {"instances": "3"}).content.decode()
    failed = browser.get(url, {"status": "failure"}).content.decode()
    beyond = browser.get(url, {"instances": "99"}).content.decode()
    bogus = browser.get(url, {"instances": "-2", "status": "nonsense"}).content.decode()
    fragment = browser.get(url, {"fragment": "1", "instances": "2"}).content.decode()

    assert indexes(first) == list(range(50))
    assert "page 1 of 3" in first and 'rel="prev"' not in first
    assert re.search(r'href="[^"]*\?instances=2#instances" rel="next"', first)
    assert "120: 100 \u2713 \u00b7 3 \u2717 \u00b7 17 running" in first
    assert "Attempts (" not in first
    assert indexes(last) == list(range(100, 120))
    assert 'rel="next"' not in last and re.search(r'\?instances=2#instances" rel="prev"', last)
    assert indexes(failed) == [100, 101, 102]
    assert "RuntimeError: instance 101 failed" in failed
    assert indexes(beyond) == indexes(last)
    assert indexes(bogus) == indexes(first)
    assert 'class="node-detail"' in fragment and indexes(fragment) == list(range(50, 100))


def test_run_page_lists_instance_attempts_in_their_node_only(browser):
    run = branching_run(["SUCCESS"] * 5, events=True)

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    events = section(html, '<table class="grid events">', "</table>") if "grid events" in html else ""
    assert 'data-node-link="upload"' not in events
    assert "data-instance-events" in html
    assert Event.objects.filter(trace_id=run.trace_id, context__node="upload").count() == 5


def test_run_page_query_count_does_not_grow_with_instances(browser):
    small = branching_run((["SUCCESS", "STARTED", "QUEUED", "FAILURE"] * 3)[:10], events=True)
    large = branching_run(["SUCCESS", "STARTED", "QUEUED", "FAILURE"] * 250, events=True)

    def counts(run: WorkflowRun) -> tuple[int, ...]:
        node = reverse("workflows_app:run-node", args=[run.trace_id, "upload"])
        return (
            _queries(browser, reverse("workflows_app:run-detail", args=[run.trace_id])),
            _queries(browser, reverse("workflows_app:run-live", args=[run.trace_id])),
            _queries(browser, node, {"fragment": "1"}),
            _queries(browser, node, {"instances": "2", "status": "QUEUED"}),
        )

    assert TaskRun.objects.filter(run=large, map_index__isnull=False).count() == 1_000
    large_html = browser.get(reverse("workflows_app:run-detail", args=[large.trace_id])).content.decode()
    assert "250 \u2713 \u00b7 250 \u2717 \u00b7 250 running \u00b7 250 queued" in large_html
    assert counts(small) == counts(large)


def test_workflow_page_draws_conditions_and_marks_mapped_nodes(browser, admin_client):
    workflow = branching_workflow()

    html = browser.get(reverse("workflows_app:workflow-detail", args=[workflow.name])).content.decode()
    admin = admin_client.get(
        reverse("admin:workflows_app_workflowdefinition_change", args=[workflow.pk])
    ).content.decode()

    for page in (html, admin):
        svg = section(page, '<svg class="dag"', "</svg>")
        assert 'data-edge="moderate publish_1688"' in section(svg, '<g class="dag-cond"', "</g>")
        upload = svg_node(svg, "upload")
        assert 'data-mapped="true"' in upload and ">map<" in upload
        assert "map over upstream.list.images" in upload
    assert 'data-map-over="upstream.list.images"' in section(html, '<tr id="node-upload"', "</tr>")
    assert 'data-when="result.allowed_1688"' in section(html, '<tr id="node-publish_1688"', "</tr>")


def finish(run: WorkflowRun, key: str, result: dict) -> None:
    """Play what a worker does for a node's task: start it, then report its success with `result`."""
    event = TaskRun.objects.get(run=run, node_key=key, map_index=None).current_event
    started = engine.task_run_start(event_id=str(event.event_id), attempt=event.context["attempt"])
    engine.task_run_finish(
        trace_id=str(run.trace_id),
        event_id=str(event.event_id),
        succeeded=True,
        result=result,
        event=event.as_message(),
        run_payload=started.run_payload,
    )


def test_run_page_shows_what_the_engine_says_of_an_empty_map_and_a_false_condition(browser):
    run = start(branching_workflow())
    finish(run, "list", {"images": []})
    finish(run, "moderate", {"allowed_1688": False})

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()
    upload = browser.get(reverse("workflows_app:run-node", args=[run.trace_id, "upload"])).content.decode()

    assert WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.SUCCESS
    assert table_nodes(html) == {
        "list": "SUCCESS",
        "upload": "SKIPPED",
        "publish": "SKIPPED",
        "moderate": "SUCCESS",
        "publish_1688": "SKIPPED",
    }
    reasons = {
        key: TaskRun.objects.get(run=run, node_key=key, map_index=None).error
        for key in ("upload", "publish", "publish_1688")
    }
    assert "gave an empty list" in reasons["upload"]
    assert "(`result.allowed_1688`) was false" in reasons["publish_1688"]
    for key, reason in reasons.items():
        assert reason and html_escape(reason, quote=False) in section(html, f'<tr id="task-{key}"', "</tr>"), key
    assert 'data-mapped="true"' in svg_node(html, "upload") and ">map<" in svg_node(html, "upload")
    assert "no instances<" in section(html, '<tr id="task-upload"', "</tr>")
    assert "Why it did not run" in upload and "No instances." in upload
