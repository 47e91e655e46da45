"""The server-rendered pages: login, run list, run status page and its live fragment, workflow, queues."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tests import factories
from workflows_app import engine, graph_svg
from workflows_app.models import TaskRun, WorkflowRun

PIPELINE_KEYS = ["intake", "listing", "image", "upload_ali", "upload_1688", "publish_ali", "publish_1688"]
NODE_ATTRS = re.compile(r'data-node="([^"]+)" data-status="([^"]+)"')

pytestmark = pytest.mark.django_db


@pytest.fixture
def browser(client, user):
    client.force_login(user)
    return client


def start(workflow, payload: dict | None = None) -> WorkflowRun:
    run, _ = engine.workflow_run_start(workflow=workflow, payload=payload or {})
    return run


def section(html: str, start_marker: str, end_marker: str) -> str:
    begin = html.index(start_marker)
    return html[begin : html.index(end_marker, begin)]


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


# --------------------------------------------------------------------------- access


@pytest.mark.parametrize("page", ["run-list", "run-detail", "run-live", "workflow-detail", "queue-list"])
def test_every_page_sends_anonymous_users_to_login(client, pipeline, page):
    run = start(pipeline)
    args = {
        "run-detail": [run.trace_id],
        "run-live": [run.trace_id],
        "workflow-detail": [pipeline.name],
    }.get(page, [])
    url = reverse(f"workflows_app:{page}", args=args)

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert "next=" in response["Location"]


def test_nav_links_every_section(browser):
    html = browser.get(reverse("workflows_app:run-list")).content.decode()

    for href in ('href="/runs/"', 'href="/queues/"', 'href="/admin/"', 'href="/api/"'):
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


def test_run_list_ignores_an_unknown_status_and_paginates(browser):
    workflow = factories.workflow(factories.spec("many"))
    runs = [start(workflow) for _ in range(51)]
    url = reverse("workflows_app:run-list")

    first = browser.get(url, {"status": "bogus"})
    second = browser.get(url, {"page": 2})

    assert first.status_code == 200
    assert first.content.decode().count("data-trace-id=") == 50
    assert "page 1 of 2" in first.content.decode()
    assert second.content.decode().count("data-trace-id=") == 1
    assert str(runs[0].trace_id) in second.content.decode()


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
    assert "fetch(" not in html
    assert set(svg_nodes(html).values()) == {"SUCCESS"}


def test_running_run_page_polls_the_live_fragment(browser, pipeline):
    run = start(pipeline)

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    assert "fetch(" in html
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


# --------------------------------------------------------------------------- query counts


def _queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(url).status_code == 200
    return len(captured.captured_queries)


def _wide_and_deep(name: str, size: int):
    """Half the nodes in a chain, the rest independent roots: both layers and a waiting line."""
    keys = [f"n{i}" for i in range(size)]
    chain = keys[: size // 2]
    return factories.workflow(
        factories.spec(
            name,
            [(key, "workflows_app.tasks.echo") for key in keys],
            [[a, b] for a, b in zip(chain, chain[1:], strict=False)],
            event_type="q_count",
            event_types={"q_count": {"concurrency": 2}},
        )
    )


def test_run_page_query_count_does_not_grow_with_the_graph(browser):
    small, large = start(_wide_and_deep("small", 3)), start(_wide_and_deep("large", 30))
    for run in (small, large):
        TaskRun.objects.filter(run=run).update(error="boom")

    counts = {
        size: (
            _queries(browser, reverse("workflows_app:run-detail", args=[run.trace_id])),
            _queries(browser, reverse("workflows_app:run-live", args=[run.trace_id])),
        )
        for size, run in (("small", small), ("large", large))
    }

    assert counts["small"] == counts["large"]


def test_list_pages_query_count_does_not_grow_with_rows(browser):
    few = _wide_and_deep("few", 3)
    start(few)
    before = {
        "runs": _queries(browser, reverse("workflows_app:run-list")),
        "workflow": _queries(browser, reverse("workflows_app:workflow-detail", args=["few"])),
        "queues": _queries(browser, reverse("workflows_app:queue-list")),
    }
    many = _wide_and_deep("many", 30)
    for _ in range(5):
        start(many)
        start(few)
    factories.workflow(factories.spec("other_types", event_type="q_other"))

    after = {
        "runs": _queries(browser, reverse("workflows_app:run-list")),
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
