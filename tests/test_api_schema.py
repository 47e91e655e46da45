"""Property-based API test: schemathesis sends generated requests from /api/schema/ and checks every answer."""

from __future__ import annotations

import os

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django_celery_results.models import TaskResult
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests import factories
from webhooks_app import services
from webhooks_app.models import Webhook
from workflows_app import engine

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"

CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {
            # PostgreSQL stores no NUL character; the API refuses it with a 400, tested below.
            "allow-x00": False,
            # Unknown query parameters are ignored, as DRF does (its `?format=json` is one), not refused.
            "allow-extra-parameters": False,
        }
    }
)
# The schema is read through the app itself, as a client generator would read it.
schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", WSGIHandler(), config=CONFIG)


def check(case, app, token: str) -> None:
    excluded = []
    if case.path.startswith("/api/workflows/") and case.method in ("POST", "PATCH") and "runs" not in case.path:
        # A definition that fits the schema can still be refused with a 400 naming the problem: an
        # unregistered task, an edge to a missing node, a cycle. No schema can say which tasks exist.
        excluded.append(positive_data_acceptance)
    if case.path.startswith("/api/webhooks/") and case.method in ("POST", "PATCH"):
        # A URL the schema takes may resolve to a private address, or not at all: refused with a 400.
        excluded.append(positive_data_acceptance)
    if case.path.startswith("/api/event-types/") and case.method == "PATCH":
        # Likewise a fairness_key: a string the schema takes may not be a CEL expression that compiles.
        excluded.append(positive_data_acceptance)
    if case.path in ("/api/runs/", "/api/runs/cancel/", "/api/runs/retry/"):
        # Run filters have rules across fields and inside strings that no schema states: since before until,
        # a payload filter that is a JSON object, a bulk call that names runs or a filter. Refused with a 400.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(app=app, headers={"Authorization": f"Token {token}"}, excluded_checks=excluded)


@pytest.fixture
def app():
    """The WSGI app, sharing the test's transaction: like Django's test client, requests must not close
    the connection the test holds (Django closes it at the end of each request otherwise)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield WSGIHandler()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def known(admin_user, pipeline) -> dict[str, str]:
    """Real objects for path parameters: a run with a published trigger event, its workflow and event type;
    and a workflow with a condition on an edge and a mapped node, so the definitions listed hold both forms."""
    factories.workflow(
        factories.spec(
            "fan",
            [("list", ECHO), {"key": "upload", "task": ECHO, "map_over": "upstream.list.images"}],
            [{"from": "list", "to": "upload", "when": "has(result.images)"}],
        )
    )
    pipeline.trigger_event_types = ["product.created"]
    pipeline.save(update_fields=["trigger_event_types"])
    _, runs, _ = engine.event_publish(event_type="product.created", payload={"product": "mug"})
    run = runs[0]
    intake = run.tasks.get(node_key="intake")
    TaskResult.objects.create(
        task_id=str(intake.current_event_id),
        task_name=intake.task_name,
        status="SUCCESS",
        result='{"payload": {"product": "mug"}, "upstream": {}}',
        content_type="application/json",
        content_encoding="utf-8",
    )
    return {
        "token": Token.objects.create(user=admin_user).key,
        "trace_id": str(run.trace_id),
        "name": "product_pipeline",
        "event_type": "product_src",
        "task_id": str(intake.current_event_id),
        "key": "intake",
        "id": Webhook.objects.create(
            url="https://93.184.215.14/hook", notifications=["run.failed"], secret=services.secret_new()
        ).pk,
    }


# Bounded for CI; EVENTFLOW_SCHEMA_EXAMPLES=500 digs deeper by hand.
SETTINGS = settings(
    max_examples=int(os.environ.get("EVENTFLOW_SCHEMA_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@schema.parametrize()
@SETTINGS
def test_every_answer_matches_the_schema(case, app, known):
    """No 500, and every status code, header and body is what the schema documents."""
    check(case, app, known["token"])


@schema.include(path_regex=r"\{").parametrize()
@SETTINGS
def test_answers_about_existing_objects_match_the_schema(case, app, known):
    """The same, with path parameters naming objects that exist, so success answers are checked too."""
    for param in case.path_parameters:
        # `name` is a workflow's in /api/workflows/ and an event type's in /api/event-types/.
        key = "event_type" if param == "name" and case.path.startswith("/api/event-types/") else param
        case.path_parameters[param] = known[key]
    check(case, app, known["token"])


def test_schema_covers_every_endpoint_with_its_errors(api):
    body = api.get("/api/schema/?format=json").json()
    paths = body["paths"]
    assert set(paths) == {
        "/api/workflows/",
        "/api/workflows/{name}/",
        "/api/workflows/{name}/runs/",
        "/api/runs/",
        "/api/runs/cancel/",
        "/api/runs/retry/",
        "/api/runs/{trace_id}/",
        "/api/runs/{trace_id}/events/",
        "/api/runs/{trace_id}/cancel/",
        "/api/runs/{trace_id}/retry/",
        "/api/runs/{trace_id}/nodes/{key}/approve/",
        "/api/runs/{trace_id}/nodes/{key}/reject/",
        "/api/events/",
        "/api/event-types/",
        "/api/event-types/{name}/",
        "/api/task-results/{task_id}/",
        "/api/webhooks/",
        "/api/webhooks/{id}/",
    }
    for path, operations in paths.items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "401" in codes, f"{method} {path}"
            assert any(c.startswith("2") for c in codes), f"{method} {path}"
            if method in ("post", "patch") and "requestBody" in operation:
                assert {"400", "403", "413"} <= codes, f"{method} {path}"
    trigger = paths["/api/workflows/{name}/runs/"]["post"]["responses"]
    assert {"200", "201", "404", "409", "413"} <= set(trigger)
    assert paths["/api/runs/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "PaginatedRunList"
    )


def test_docs_page_loads_its_assets_from_this_server(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "swagger-ui" in html and "/api/schema/" in html
    assert "cdn." not in html and "unpkg" not in html
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in html
    assert client.get("/api/redoc/").status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        '{"payload": {"note": "a\\u0000b"}}',
        '{"payload": {"a\\u0000": 1}}',
        '{"payload": {"note": "\\ud800"}}',
    ],
)
def test_strings_postgresql_cannot_store_are_a_400(api, pipeline, raw):
    response = api.post("/api/workflows/product_pipeline/runs/", raw, content_type="application/json")
    assert response.status_code == 400, response.content
    assert "JSON strings" in response.json()["detail"]


def test_definitions_with_conditions_and_maps_match_the_schema(api, app, known):
    """Both forms of an edge and `map_over` are in the documented definition shape."""
    listed = schema["/api/workflows/"]["GET"].Case(headers={"Authorization": f"Token {known['token']}"})
    response = listed.call(app=app)
    listed.validate_response(response)
    fan = next(w for w in response.json()["results"] if w["name"] == "fan")
    assert fan["edges"] == [{"from": "list", "to": "upload", "when": "has(result.images)"}]
    assert fan["nodes"][1]["map_over"] == "upstream.list.images"
