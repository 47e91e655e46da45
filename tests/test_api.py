"""The REST API: shapes, permissions, idempotency, and bad input answered with JSON errors and no writes."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from events_app.models import Event, EventType
from tests import factories
from tests.e2e import wait_for
from workflows_app.models import Edge, Node, TaskRun, WorkflowDefinition, WorkflowRun, WorkflowVersion

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"


def counts() -> dict[str, int]:
    """Row counts of every table a bad request could write to."""
    models = [WorkflowDefinition, Node, Edge, WorkflowVersion, WorkflowRun, TaskRun, Event, EventType]
    return {m.__name__: m.objects.count() for m in models}


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert isinstance(body.get("detail"), str) and body["detail"]
    return body


# --------------------------------------------------------------------------- happy paths


def test_workflow_list_and_detail_show_nodes_and_edges(api, pipeline):
    listed = api.get("/api/workflows/").json()
    assert listed["count"] == 1
    detail = api.get("/api/workflows/product_pipeline/").json()
    assert [n["key"] for n in detail["nodes"]] == [
        "intake",
        "listing",
        "image",
        "upload_ali",
        "upload_1688",
        "publish_ali",
        "publish_1688",
    ]
    assert ["intake", "listing"] in detail["edges"]
    assert detail["event_types"]["product_image"] == {"concurrency": 2}
    assert detail["version"] == 1


def test_create_workflow_then_get_it_back(api):
    data = factories.spec("made", [("a", ECHO), ("b", ECHO)], [["a", "b"]])
    response = api.post("/api/workflows/", data, format="json")
    assert response.status_code == 201, response.content
    body = api.get("/api/workflows/made/").json()
    assert body["edges"] == [["a", "b"]]
    assert WorkflowVersion.objects.filter(workflow__name="made").count() == 1


def test_trigger_returns_trace_id_and_creates_all_tasks(api, pipeline):
    response = api.post("/api/workflows/product_pipeline/runs/", {"payload": {"product": "mug"}}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) >= {"trace_id", "status", "url", "status_page"}
    assert body["status"] == "RUNNING"
    run = WorkflowRun.objects.get(trace_id=body["trace_id"])
    statuses = dict(run.tasks.values_list("node_key", "status"))
    assert statuses["intake"] == "QUEUED"
    assert {k for k, s in statuses.items() if s == "WAITING"} == set(statuses) - {"intake"}
    intake = run.tasks.get(node_key="intake")
    assert intake.holds_slot is True  # concurrency 5 on product_src leaves room
    event = intake.current_event
    assert event.payload == {"product": "mug"}
    assert event.context == {
        "workflow": "product_pipeline",
        "workflow_version": 1,
        "node": "intake",
        "attempt": 1,
        "upstream": {},
    }


def test_trigger_with_idempotency_key_returns_the_same_run(api, pipeline):
    url = "/api/workflows/product_pipeline/runs/"
    first = api.post(url, {"payload": {}}, format="json", HTTP_IDEMPOTENCY_KEY="order-42")
    second = api.post(url, {"payload": {}}, format="json", HTTP_IDEMPOTENCY_KEY="order-42")
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["trace_id"] == second.json()["trace_id"]
    assert WorkflowRun.objects.count() == 1


def test_run_detail_lists_every_node_with_iso_times(api, pipeline):
    trace_id = api.post("/api/workflows/product_pipeline/runs/", {}, format="json").json()["trace_id"]
    body = api.get(f"/api/runs/{trace_id}/").json()
    assert body["workflow"] == "product_pipeline" and body["workflow_version"] == 1
    assert len(body["tasks"]) == 7
    intake = body["tasks"][0]
    assert set(intake) == {
        "node",
        "map_index",
        "event_type",
        "task_name",
        "status",
        "attempts",
        "queued_at",
        "dispatched_at",
        "started_at",
        "finished_at",
        "result",
        "error",
        "event_id",
        "result_url",
    }
    assert intake["queued_at"].endswith("Z") and intake["started_at"] is None
    assert intake["dispatched_at"].endswith("Z")
    assert {t["map_index"] for t in body["tasks"]} == {None}
    # The latest attempt's event id is its Celery task id; result_url is where its stored result is read.
    assert intake["event_id"] == str(
        WorkflowRun.objects.get(trace_id=trace_id).tasks.get(node_key="intake").current_event_id
    )
    assert intake["result_url"].endswith(f"/api/task-results/{intake['event_id']}/")
    assert body["tasks"][1]["event_id"] is None and body["tasks"][1]["result_url"] is None


def test_run_list_filters_and_paginates(api, pipeline):
    other = factories.workflow(factories.spec("other"))
    for _ in range(2):
        api.post("/api/workflows/product_pipeline/runs/", {}, format="json")
    api.post(f"/api/workflows/{other.name}/runs/", {}, format="json")
    body = api.get("/api/runs/?workflow=product_pipeline").json()
    assert body["count"] == 2 and set(body) == {"count", "next", "previous", "results"}
    assert api.get("/api/runs/?status=SUCCESS").json()["count"] == 0
    assert api.get("/api/runs/?status=running").json()["count"] == 3


def test_run_detail_query_count_does_not_grow_with_nodes(api):
    def queries_for(n: int) -> int:
        wf = factories.workflow(factories.spec(f"wide{n}", [(f"n{i}", ECHO) for i in range(n)]))
        trace_id = api.post(f"/api/workflows/{wf.name}/runs/", {}, format="json").json()["trace_id"]
        with CaptureQueriesContext(connection) as ctx:
            assert api.get(f"/api/runs/{trace_id}/").status_code == 200
        return len(ctx.captured_queries)

    assert queries_for(3) == queries_for(40)


def test_events_of_a_run(api, pipeline):
    trace_id = api.post("/api/workflows/product_pipeline/runs/", {}, format="json").json()["trace_id"]
    body = api.get(f"/api/runs/{trace_id}/events/").json()
    assert body["count"] == 1
    assert body["results"][0]["context"]["node"] == "intake"


def test_cancel_revokes_every_unfinished_task(api, pipeline):
    trace_id = api.post("/api/workflows/product_pipeline/runs/", {}, format="json").json()["trace_id"]
    response = api.post(f"/api/runs/{trace_id}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "CANCELED"
    assert set(TaskRun.objects.filter(run_id=trace_id).values_list("status", flat=True)) == {"REVOKED"}
    assert not TaskRun.objects.filter(holds_slot=True).exists()


def test_publish_event_starts_subscribed_workflows_only(api, pipeline):
    factories.workflow(factories.spec("deaf"))
    response = api.post("/api/events/", {"event_type": "product.created", "payload": {"p": 1}}, format="json")
    assert response.status_code == 201, response.content
    trace_ids = response.json()["trace_ids"]
    assert len(trace_ids) == 1
    assert WorkflowRun.objects.get(trace_id=trace_ids[0]).workflow.name == "product_pipeline"
    nobody = api.post("/api/events/", {"event_type": "nobody.listens"}, format="json")
    assert nobody.status_code == 201 and nobody.json()["trace_ids"] == []


def test_event_types_show_counts_and_take_a_new_limit(api, pipeline):
    api.post("/api/workflows/product_pipeline/runs/", {}, format="json")
    types = {t["name"]: t for t in api.get("/api/event-types/").json()["results"]}
    assert types["product_src"] == {
        "name": "product_src",
        "concurrency": 5,
        "rate_limit": None,
        "fairness_key": None,
        "per_key_concurrency": None,
        "queue_timeout": None,
        "description": "",
        "running": 1,
        "queued": 0,
        "oldest_queued_at": None,
        "oldest_wait_seconds": None,
        "rate_window": None,
        "next": [],
    }
    EventType.objects.filter(name="product_src").update(concurrency=1)
    api.post("/api/workflows/product_pipeline/runs/", {}, format="json")
    waiting = api.get("/api/event-types/product_src/").json()
    assert (waiting["running"], waiting["queued"]) == (1, 1)
    assert [(t["place"], t["reason"]) for t in waiting["next"]] == [(1, "concurrency")]
    assert waiting["oldest_queued_at"].endswith("Z") and waiting["oldest_wait_seconds"] >= 0
    response = api.patch("/api/event-types/product_image/", {"concurrency": 7}, format="json")
    assert response.status_code == 200 and response.json()["concurrency"] == 7


def test_schema_is_served(api):
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    assert "/api/workflows/{name}/runs/" in json.loads(response.content)["paths"]


# --------------------------------------------------------------------------- bad input: clear error, nothing written

TRIGGER = "/api/workflows/product_pipeline/runs/"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        ('{"payload": [1, 2]}', "application/json", 400),
        ('{"payload": "text"}', "application/json", 400),
        ('{"payload": {}, "surprise": 1}', "application/json", 400),
        ("[1, 2, 3]", "application/json", 400),
        ('{"payload": ' + "[" * 5000 + "]" * 5000 + "}", "application/json", 400),
        ('{"payload": {"big": "' + "x" * (2 * 1024 * 1024) + '"}}', "application/json", 413),
        ('{"payload": {"big": "' + "x" * (300 * 1024) + '"}}', "application/json", 413),
        ("payload=1", "application/x-www-form-urlencoded", 415),
        ('{"payload": {}}\xff', "application/json", 400),
    ],
    ids=[
        "malformed",
        "list-payload",
        "string-payload",
        "unknown-field",
        "array-body",
        "deeply-nested",
        "over-body-limit",
        "over-payload-limit",
        "form-encoded",
        "trailing-garbage",
    ],
)
def test_trigger_bad_body(api, pipeline, body, content_type, status):
    before = counts()
    response = api.generic("POST", TRIGGER, body.encode("utf-8", "surrogateescape"), content_type=content_type)
    assert_json_error(response, status)
    assert counts() == before


def test_trigger_unknown_workflow_is_404(api, pipeline):
    before = counts()
    body = assert_json_error(api.post("/api/workflows/nope/runs/", {}, format="json"), 404)
    assert "nope" in body["detail"]
    assert counts() == before


def test_trigger_inactive_workflow_is_409(api, pipeline):
    response = api.patch("/api/workflows/product_pipeline/", {"is_active": False}, format="json")
    assert response.status_code == 200 and response.json()["is_active"] is False
    before = counts()
    assert "inactive" in assert_json_error(api.post(TRIGGER, {}, format="json"), 409)["detail"]
    assert counts() == before


@pytest.mark.parametrize("headers", [{}, {"HTTP_AUTHORIZATION": "Token not-a-real-token"}])
def test_anonymous_or_bad_token_is_refused(anon_api, pipeline, headers):
    before = counts()
    for method, path in [
        ("post", TRIGGER),
        ("get", "/api/runs/"),
        ("get", "/api/workflows/"),
        ("post", "/api/events/"),
        ("get", "/api/event-types/"),
    ]:
        response = getattr(anon_api, method)(path, {}, format="json", **headers)
        assert_json_error(response, 401)
    assert counts() == before


def test_user_without_trigger_permission_gets_403(user, pipeline):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    before = counts()
    assert_json_error(client.post(TRIGGER, {}, format="json"), 403)
    assert client.get("/api/runs/").status_code == 200
    assert counts() == before


def assert_json(response, status: int) -> dict:
    """A JSON answer with a `detail` message, as every answer under /api/ is."""
    assert response["Content-Type"].startswith("application/json"), (response.status_code, response.content[:300])
    return assert_json_error(response, status)


# Paths no route takes (404) and methods a route does not answer (405), per method.
UNROUTED = {
    "get": [
        "/api/nothing-here/",
        "/api/no/such/endpoint",
        "/api/runs/not-a-uuid/",
        "/api/runs/not-a-uuid/events/",
        "/api/task-results/not-a-uuid/",
        "/api/runs/00000000-0000-0000-0000-000000000000/",
        "/api/workflows/nope/",
    ],
    "post": [
        "/api/runs/not-a-uuid/cancel/",
        "/api/runs/not-a-uuid/retry/",
        "/api/runs/00000000-0000-0000-0000-000000000000/cancel/",
    ],
}
UNANSWERED = {
    "delete": "/api/runs/",
    "put": "/api/workflows/",
    "get": "/api/events/",
    "patch": "/api/runs/00000000-0000-0000-0000-000000000000/",
    "post": "/api/",
}


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [(method, path, 404) for method, paths in UNROUTED.items() for path in paths]
    + [(method, path, 405) for method, path in UNANSWERED.items()],
)
def test_every_answer_under_api_is_json_whatever_debug_says(api, settings, debug, method, path, status):
    settings.DEBUG = debug
    before = counts()
    assert_json(getattr(api, method)(path), status)
    assert counts() == before


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_an_unknown_path_is_json_404_for_anonymous_callers_too(anon_api, settings, debug):
    settings.DEBUG = debug
    assert assert_json(anon_api.get("/api/nothing-here/"), 404)["detail"] == "Not found."


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_a_post_to_an_unknown_path_in_a_session_without_csrf_token_is_json_404(trigger_user, settings, debug):
    from django.test import Client

    settings.DEBUG = debug
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(trigger_user)
    assert_json(browser.post("/api/runs/null,null/cancel/"), 404)


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_a_route_without_its_trailing_slash_redirects_a_get_and_names_the_path_to_others(api, settings, debug):
    settings.DEBUG = debug
    moved = api.get("/api/workflows?page=1")
    assert moved.status_code == 301 and moved["Location"] == "/api/workflows/?page=1"
    assert moved["Content-Type"].startswith("application/json") and moved.json()["detail"]
    before = counts()
    refused = assert_json(api.post("/api/workflows", {}, format="json"), 404)
    assert "/api/workflows/" in refused["detail"]
    assert counts() == before


def test_retry_of_a_running_run_is_409(api, pipeline):
    trace_id = api.post(TRIGGER, {}, format="json").json()["trace_id"]
    assert_json_error(api.post(f"/api/runs/{trace_id}/retry/"), 409)


@pytest.mark.parametrize(
    ("definition", "needle"),
    [
        (factories.spec("cyc", [("a", ECHO), ("b", ECHO), ("c", ECHO)], [["a", "b"], ["b", "c"], ["c", "a"]]), "cycle"),
        (factories.spec("unk", [("a", "no.such.task")]), "unknown task 'no.such.task'"),
        (factories.spec("self", [("a", ECHO)], [["a", "a"]]), "itself"),
        (factories.spec("dup", [("a", ECHO), ("a", ECHO)]), "duplicate key"),
        (factories.spec("dangle", [("a", ECHO)], [["a", "ghost"]]), "unknown node 'ghost'"),
        (factories.spec("rule", [{"key": "a", "task": ECHO, "trigger_rule": "whenever"}]), "trigger_rule"),
        (factories.spec("typ", [{"key": "a", "task": ECHO, "max_retries": "three"}]), "max_retries"),
        (factories.spec("extra", [("a", ECHO)], unexpected=True), "unknown field"),
        ({"name": "no nodes", "nodes": []}, "nodes"),
        ({"name": "x", "nodes": "a"}, "nodes"),
        ([1, 2], "object"),
        ({**factories.spec("types", [("a", ECHO)]), "event_types": []}, "event_types must be an object"),
    ],
    ids=[
        *("cycle", "unknown-task", "self-edge", "dup-key", "dangling", "rule", "type", "extra", "empty", "str"),
        *("list", "event-types-list"),
    ],
)
def test_create_invalid_workflow_is_400_naming_the_problem(api, definition, needle):
    before = counts()
    body = assert_json_error(api.post("/api/workflows/", definition, format="json"), 400)
    assert needle in body["detail"]
    assert counts() == before


def test_cycle_error_names_the_cycle(api):
    definition = factories.spec("cyc", [("a", ECHO), ("b", ECHO), ("c", ECHO)], [["a", "b"], ["b", "c"], ["c", "b"]])
    body = api.post("/api/workflows/", definition, format="json").json()
    assert "cycle: b -> c -> b" in body["detail"] or "cycle: c -> b -> c" in body["detail"]


def test_create_with_a_taken_name_is_400_naming_it_and_writes_nothing(api, pipeline):
    changed = {
        **factories.product_pipeline_spec(),
        "description": "another",
        "event_types": {"product_src": {"concurrency": 9}},
    }
    before, definition = counts(), api.get("/api/workflows/product_pipeline/").json()
    body = assert_json_error(api.post("/api/workflows/", changed, format="json"), 400)
    assert "product_pipeline" in body["detail"] and "already exists" in body["detail"]
    assert counts() == before
    assert api.get("/api/workflows/product_pipeline/").json() == definition
    assert EventType.objects.get(name="product_src").concurrency == 5


def test_patch_still_edits_a_definition_by_name(api, pipeline):
    response = api.patch("/api/workflows/product_pipeline/", {"description": "edited"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["description"] == "edited" and response.json()["version"] == 2
    definition = WorkflowDefinition.objects.get(name="product_pipeline")
    assert definition.description == "edited" and definition.nodes.count() == 7


@pytest.mark.django_db(transaction=True)
def test_two_creations_of_one_new_name_at_once_make_one_definition(live_server, trigger_user):
    """Both requests are held inside their transactions until each is waiting on a lock: the first
    behind an event type's row this test locks, the second behind the first's new name (or, without
    the unique index deciding, behind the same row). Then exactly one is created."""
    from django.db import connections
    from rest_framework.authtoken.models import Token

    EventType.objects.create(name="q_race", concurrency=1)
    token = Token.objects.create(user=trigger_user).key
    body = json.dumps(
        {**factories.spec("raced", [("a", ECHO)], event_type="q_race"), "event_types": {"q_race": {"concurrency": 3}}}
    ).encode()
    answers: list[tuple[int, dict]] = []

    def create() -> None:
        request = urllib.request.Request(
            f"{live_server.url}/api/workflows/",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Token {token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answers.append((response.status, json.loads(response.read())))
        except urllib.error.HTTPError as error:
            answers.append((error.code, json.loads(error.read())))

    def waiting_on_locks() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            return cursor.fetchone()[0] >= 2

    threads = [threading.Thread(target=create) for _ in range(2)]
    # The event type's row lock, in a connection of its own, holds the first request mid-transaction.
    holder = connections.create_connection("default")
    try:
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT 1 FROM events_app_eventtype WHERE name = 'q_race' FOR UPDATE")
            for thread in threads:
                thread.start()
            wait_for(waiting_on_locks, timeout=30, what="both requests to wait inside their transactions")
            cursor.execute("COMMIT")
    finally:
        holder.close()
    for thread in threads:
        thread.join(60)
    assert sorted(status for status, _ in answers) == [201, 400], answers
    refused = next(answer for status, answer in answers if status == 400)
    assert "raced" in refused["detail"] and "already exists" in refused["detail"]
    assert WorkflowDefinition.objects.filter(name="raced").count() == 1
    assert WorkflowVersion.objects.filter(workflow__name="raced").count() == 1
    assert Node.objects.filter(workflow__name="raced").count() == 1


def test_patch_with_a_cycle_changes_nothing(api, pipeline):
    before = counts()
    edges = [*factories.product_pipeline_spec()["edges"], ["publish_ali", "intake"]]
    assert_json_error(api.patch("/api/workflows/product_pipeline/", {"edges": edges}, format="json"), 400)
    assert counts() == before
    assert WorkflowDefinition.objects.get(name="product_pipeline").version == 1


@pytest.mark.parametrize("value", [0, -1, "many", None, 1.5])
def test_event_type_bad_concurrency(api, pipeline, value):
    assert_json_error(api.patch("/api/event-types/product_src/", {"concurrency": value}, format="json"), 400)
    assert EventType.objects.get(name="product_src").concurrency == 5


def test_publish_event_bad_type_is_400(api):
    before = counts()
    assert_json_error(api.post("/api/events/", {"event_type": "has spaces"}, format="json"), 400)
    assert_json_error(api.post("/api/events/", {"payload": {}}, format="json"), 400)
    assert counts() == before


# --------------------------------------------------------------------------- branches and maps


def test_run_detail_lists_each_instance_after_its_node_by_map_index(api):
    workflow = factories.workflow(factories.fan_spec())
    run = WorkflowRun.objects.get(
        trace_id=api.post(f"/api/workflows/{workflow.name}/runs/", {}, format="json").json()["trace_id"]
    )
    # Inserted out of order: the API orders them, not the insertion.
    factories.map_instances(run, "upload", ["SUCCESS", "STARTED", "QUEUED"])
    TaskRun.objects.filter(run=run, node_key="upload", map_index=0).update(id=F("id") + 1000)

    tasks = api.get(f"/api/runs/{run.trace_id}/").json()["tasks"]

    assert [(t["node"], t["map_index"]) for t in tasks] == [
        ("list", None),
        ("upload", None),
        ("upload", 0),
        ("upload", 1),
        ("upload", 2),
        ("publish", None),
    ]
    upload = {t["map_index"]: t for t in tasks if t["node"] == "upload"}
    assert upload[None]["status"] == "STARTED"
    assert [upload[i]["status"] for i in range(3)] == ["SUCCESS", "STARTED", "QUEUED"]
    assert upload[0]["result"] == {"index": 0} and upload[0]["attempts"] == 1
    assert upload[2]["started_at"] is None and upload[2]["queued_at"].endswith("Z")


def test_run_detail_query_count_does_not_grow_with_instances(api):
    workflow = factories.workflow(factories.fan_spec())

    def queries_for(n: int) -> int:
        trace_id = api.post(f"/api/workflows/{workflow.name}/runs/", {}, format="json").json()["trace_id"]
        run = WorkflowRun.objects.get(trace_id=trace_id)
        factories.map_instances(run, "upload", (["SUCCESS", "STARTED", "QUEUED", "FAILURE"] * 250)[:n], events=True)
        with CaptureQueriesContext(connection) as ctx:
            response = api.get(f"/api/runs/{trace_id}/")
        assert response.status_code == 200
        assert len(response.json()["tasks"]) == 3 + n
        return len(ctx.captured_queries)

    assert queries_for(10) == queries_for(1_000)


def test_definitions_carry_conditions_and_map_over_both_ways(api):
    response = api.post("/api/workflows/", factories.fan_spec(), format="json")
    assert response.status_code == 201, response.content

    body = api.get("/api/workflows/fan/").json()
    listed = api.get("/api/workflows/").json()["results"][0]

    assert body["edges"] == [["list", "upload"], {"from": "upload", "to": "publish", "when": "size(result) > 0"}]
    assert body["nodes"][1]["map_over"] == "upstream.list.images"
    assert "map_over" not in body["nodes"][0]
    assert listed["edges"] == body["edges"]
    assert Node.objects.get(workflow__name="fan", key="upload").options == {"map_over": "upstream.list.images"}
    assert Edge.objects.get(workflow__name="fan", when__gt="").when == "size(result) > 0"


@pytest.mark.parametrize(
    ("definition", "needles"),
    [
        (
            factories.spec("w1", [("a", ECHO), ("b", ECHO)], [{"from": "a", "to": "b", "when": "result.ok &&"}]),
            ["edge a -> b", "when"],
        ),
        (
            factories.spec("w2", [("a", ECHO), ("b", ECHO)], [{"from": "a", "to": "b", "when": "1 + 1"}]),
            ["edge a -> b", "not a bool"],
        ),
        (factories.fan_spec("m1", map_over="upstream.nowhere.items"), ["node 'upload'", "map_over", "nowhere"]),
        (factories.fan_spec("m2", map_over="[1, 2"), ["node 'upload'", "map_over"]),
        (factories.fan_spec("m3", map_over="true"), ["node 'upload'", "map_over", "not a list"]),
        (
            factories.fan_spec("r1", trigger_rule="most_success"),
            ["node 'upload'", "unknown trigger_rule 'most_success'"],
        ),
        (
            factories.spec(
                "k1",
                [{"key": "gate", "kind": "noop", "event_type": None, "map_over": "[1]"}, ("a", ECHO)],
                [["gate", "a"]],
            ),
            ["node 'gate'", "map_over is only for nodes of kind 'task'"],
        ),
    ],
    ids=[
        "when-syntax",
        "when-not-bool",
        "map-over-not-upstream",
        "map-over-syntax",
        "map-over-not-list",
        "rule",
        "kind",
    ],
)
def test_a_bad_condition_map_over_or_rule_is_400_naming_it_and_saves_nothing(api, definition, needles):
    import tests.kinds  # noqa: F401 - registers the `noop` kind

    before = counts()
    body = assert_json_error(api.post("/api/workflows/", definition, format="json"), 400)
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    assert counts() == before
