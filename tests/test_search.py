"""Payload search: JSON containment on the run list page and the API, on its GIN index, with the other filters
and keyset paging."""

from __future__ import annotations

import json
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests import factories
from workflows_app import engine, selectors
from workflows_app.models import WorkflowRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def shop(db):
    return factories.workflow(factories.spec("shop", event_type="shop_q"))


def start(workflow, payload: dict) -> WorkflowRun:
    return engine.workflow_run_start(workflow=workflow, payload=payload)[0]


def ids(body: dict) -> set[str]:
    return {run["trace_id"] for run in body["results"]}


def test_api_finds_runs_by_payload_containment_with_the_other_filters(api, shop):
    other = factories.workflow(factories.spec("other", event_type="shop_q"))
    wanted = start(shop, {"sku": "A-1", "shop": {"id": 7, "region": "eu"}, "tags": ["new", "sale"]})
    start(shop, {"sku": "A-2", "shop": {"id": 7}})
    twin = start(other, {"sku": "A-1"})
    engine.workflow_run_cancel(trace_id=str(twin.trace_id))

    assert ids(api.get("/api/runs/", {"payload": '{"sku": "A-1"}'}).json()) == {
        str(wanted.trace_id),
        str(twin.trace_id),
    }
    assert ids(api.get("/api/runs/", {"payload": '{"sku":"A-1"}', "workflow": "shop"}).json()) == {str(wanted.trace_id)}
    assert ids(api.get("/api/runs/", {"payload": '{"sku":"A-1"}', "status": "canceled"}).json()) == {str(twin.trace_id)}
    # Containment reaches into nested objects and arrays.
    assert ids(api.get("/api/runs/", {"payload": '{"shop": {"region": "eu"}}'}).json()) == {str(wanted.trace_id)}
    assert ids(api.get("/api/runs/", {"payload": '{"tags": ["sale"]}'}).json()) == {str(wanted.trace_id)}
    assert api.get("/api/runs/", {"payload": '{"shop": {"id": 7}}'}).json()["count"] == 2
    assert api.get("/api/runs/", {"payload": '{"sku": "A-1"}', "since": "1h"}).json()["count"] == 2
    assert api.get("/api/runs/", {"payload": '{"sku": "A-1"}', "until": "2020-01-01"}).json()["count"] == 0


def test_payload_search_takes_any_text_in_its_values(api, shop):
    """The filter is written into the statement: quotes, dollars, percents and backslashes are only text."""
    odd = ["it's", "$q$ x $q$", "100%", "a\\b", 'say "hi"', "'); DROP TABLE x; --", "é中"]
    runs = {value: start(shop, {"note": value}) for value in odd}
    for value, run in runs.items():
        body = api.get("/api/runs/", {"payload": json.dumps({"note": value})}).json()
        assert ids(body) == {str(run.trace_id)}, value
    assert WorkflowRun.objects.count() == len(odd)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"payload": '{"sku": '}, "payload"),
        ({"payload": '"A-1"'}, "payload"),
        ({"payload": "{}"}, "payload"),
        ({"payload": '{"sku": "a\\u0000"}'}, "payload"),
        ({"payload": '{"price": 1e400}'}, "payload"),
        ({"payload": '{"price": NaN}'}, "payload"),
        ({"since": "2026-11-22", "until": "2026-11-21"}, "until"),
        ({"since": "yesterday"}, "since"),
    ],
)
def test_api_refuses_a_malformed_filter_with_a_json_400(api, shop, query, field):
    response = api.get("/api/runs/", query)
    assert response.status_code == 400
    assert field in response.json()["errors"], response.json()


def test_payload_search_reads_the_gin_index(shop):
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'run_payload_gin_idx'")
        (definition,) = cursor.fetchone()
        assert "gin (payload jsonb_path_ops)" in definition
        query = selectors.runs_matching(selectors.RunFilter(payload={"sku": "A-1"})).order_by("-created_at")[:51]
        sql, params = query.query.sql_with_params()
        # An empty table is cheapest to scan, so the planner is told not to, to show the index can answer.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "run_payload_gin_idx" in plan, plan


def page_runs(html: str) -> list[str]:
    return re.findall(r'<tr data-trace-id="([0-9a-f-]+)"', html)


def test_run_list_page_searches_payload_and_pages_by_keyset_in_constant_queries(client, trigger_user, shop):
    client.force_login(trigger_user)
    matching = [start(shop, {"shop": 1, "n": i}) for i in range(55)]
    for i in range(5):
        start(shop, {"shop": 2, "n": i})
    query = {"payload": '{"shop": 1}'}

    with CaptureQueriesContext(connection) as first_page:
        html = client.get("/runs/", query).content.decode()
    first = page_runs(html)
    assert len(first) == 50 and 'data-page="older"' in html
    assert 'data-count-status="RUNNING"' in html and "<strong>55</strong>" in html
    older = html.split('data-page="older"')[0].rsplit('href="?', 1)[1].split('"')[0].replace("&amp;", "&")
    assert "payload=" in older
    rest = page_runs(client.get(f"/runs/?{older}").content.decode())
    assert len(rest) == 5 and not set(first) & set(rest)
    assert set(first) | set(rest) == {str(r.trace_id) for r in matching}

    for i in range(40):
        start(shop, {"shop": 1, "n": 100 + i})
    with CaptureQueriesContext(connection) as bigger:
        client.get("/runs/", query)
    assert len(bigger.captured_queries) == len(first_page.captured_queries)


def test_run_list_page_says_when_it_ignores_a_malformed_payload(client, trigger_user, shop):
    client.force_login(trigger_user)
    start(shop, {"sku": "A-1"})
    html = client.get("/runs/", {"payload": "{sku: A-1}"}).content.decode()
    assert "data-payload-error" in html and "not JSON" in html
    assert len(page_runs(html)) == 1, "the list is shown without the payload filter"
