"""Bulk cancel and retry, in process: what they match and change, their batches, the refusals, and the page's
confirmation step."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests import factories
from workflows_app import bulk, engine, selectors
from workflows_app.models import TaskRun, WorkflowRun

# Bulk actions commit run by run, as in production: real commits here, not the test's one transaction.
pytestmark = pytest.mark.django_db(transaction=True)

FAIL = "workflows_app.tasks.fail"


def failing_workflow(name: str = "bulk_fail"):
    return factories.workflow(
        factories.spec(
            name, [("charge", FAIL)], event_type=f"{name}_q", event_types={f"{name}_q": {"concurrency": 500}}
        )
    )


def failed_run(workflow, payload: dict | None = None) -> WorkflowRun:
    """A run whose one node failed, played in process the way a worker reports it."""
    run, _ = engine.workflow_run_start(workflow=workflow, payload=payload or {})
    task = TaskRun.objects.select_related("current_event").get(run=run, map_index=None)
    event = task.current_event
    started = engine.task_run_start(event_id=str(event.event_id), attempt=1, worker="test@host")
    assert started
    engine.task_run_finish(
        trace_id=str(run.trace_id),
        event_id=str(event.event_id),
        succeeded=False,
        error="RuntimeError: marketplace down",
        event=event.as_message(),
        run_payload=started.run_payload,
    )
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    return run


def statuses(workflow) -> dict[str, str]:
    return {str(k): v for k, v in WorkflowRun.objects.filter(workflow=workflow).values_list("trace_id", "status")}


def test_bulk_retry_changes_each_failed_run_once_and_a_repeat_changes_nothing():
    workflow = failing_workflow()
    runs = [failed_run(workflow, {"n": i}) for i in range(5)]
    other = failed_run(failing_workflow("bulk_other"))

    result = bulk.workflow_runs_retry(filters=selectors.RunFilter(workflow="bulk_fail", status="FAILED"), batch_size=2)

    assert (result.matched, result.changed, result.batches) == (5, 5, 3)
    assert set(statuses(workflow).values()) == {"RUNNING"}
    assert WorkflowRun.objects.get(pk=other.pk).status == "FAILED", "another workflow's run was touched"
    again = bulk.workflow_runs_retry(filters=selectors.RunFilter(workflow="bulk_fail", status="FAILED"))
    assert again.as_dict() == {"matched": 0, "changed": 0}
    # Named by id, running runs are matched but not retryable: nothing changes.
    named = bulk.workflow_runs_retry(filters=selectors.RunFilter(trace_ids=tuple(str(r.trace_id) for r in runs)))
    assert named.as_dict() == {"matched": 5, "changed": 0}


def test_bulk_cancel_counts_final_runs_as_matched_not_changed():
    workflow = failing_workflow()
    failed = failed_run(workflow)
    running = [engine.workflow_run_start(workflow=workflow, payload={"n": i})[0] for i in range(3)]
    filters = selectors.RunFilter(workflow="bulk_fail")

    assert bulk.bulk_preview(action="cancel", filters=filters) == (4, 3)
    assert bulk.workflow_runs_cancel(filters=filters).as_dict() == {"matched": 4, "changed": 3}
    assert statuses(workflow) == {
        str(failed.trace_id): "FAILED",
        **{str(r.trace_id): "CANCELED" for r in running},
    }
    assert bulk.workflow_runs_cancel(filters=filters).as_dict() == {"matched": 4, "changed": 0}


def test_bulk_walk_leaves_runs_started_after_it_began(monkeypatch):
    """The set is what matched when the call began: a run started during the walk is not canceled."""
    workflow = failing_workflow()
    old = [engine.workflow_run_start(workflow=workflow, payload={"n": i})[0] for i in range(4)]
    started_during: list[WorkflowRun] = []
    real_cancel = engine.workflow_run_cancel

    def cancel_and_start_one(*, trace_id: str) -> WorkflowRun:
        if not started_during:
            started_during.append(engine.workflow_run_start(workflow=workflow, payload={"new": True})[0])
        return real_cancel(trace_id=trace_id)

    monkeypatch.setattr(engine, "workflow_run_cancel", cancel_and_start_one)
    result = bulk.workflow_runs_cancel(
        filters=selectors.RunFilter(workflow="bulk_fail", status="RUNNING"), batch_size=1
    )

    assert result.as_dict() == {"matched": 4, "changed": 4}
    assert {WorkflowRun.objects.get(pk=r.pk).status for r in old} == {"CANCELED"}
    assert WorkflowRun.objects.get(pk=started_during[0].pk).status == "RUNNING"


# --------------------------------------------------------------------------- the API


def test_bulk_api_retries_by_filter_and_by_trace_ids(api):
    workflow = failing_workflow()
    runs = [failed_run(workflow, {"sku": f"A-{i}"}) for i in range(3)]

    response = api.post("/api/runs/retry/", {"payload": {"sku": "A-1"}}, format="json")
    assert response.status_code == 200, response.content
    assert response.json() == {"matched": 1, "changed": 1}
    assert WorkflowRun.objects.get(pk=runs[1].pk).status == "RUNNING"

    ids = [str(r.trace_id) for r in runs]
    response = api.post("/api/runs/retry/", {"trace_ids": ids}, format="json")
    assert response.json() == {"matched": 3, "changed": 2}
    response = api.post("/api/runs/cancel/", {"trace_ids": ids, "status": "running"}, format="json")
    assert response.json() == {"matched": 3, "changed": 3}
    assert set(statuses(workflow).values()) == {"CANCELED"}


BAD_BODIES = [
    ({}, "non_field_errors"),
    ({"trace_ids": []}, "trace_ids"),
    ({"trace_ids": ["not-a-uuid"]}, "trace_ids"),
    ({"trace_ids": "a string"}, "trace_ids"),
    ({"payload": '{"sku": '}, "payload"),
    ({"payload": "[1, 2]"}, "payload"),
    ({"payload": {}}, "payload"),
    ({"payload": '{"sku": "a\\u0000b"}'}, "payload"),  # NUL, which jsonb cannot hold
    ({"payload": "[" * 5000 + "]" * 5000}, "payload"),
    ({"since": "2026-11-22", "until": "2026-11-21"}, "until"),
    ({"since": "tomorrow"}, "since"),
    ({"status": "EXPLODED"}, "status"),
    ({"workflow": 7}, "workflow"),
    ({"workflow": "bulk_fail", "everything": True}, "everything"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_bulk_api_refuses_bad_input_with_a_json_400_and_changes_nothing(api, body, field, action):
    workflow = failing_workflow()
    failed_run(workflow)
    engine.workflow_run_start(workflow=workflow, payload={})
    before = statuses(workflow)

    response = api.post(f"/api/runs/{action}/", body, format="json")

    assert response.status_code == 400, response.content
    assert response["Content-Type"].startswith("application/json")
    assert field in response.json()["errors"], response.json()
    assert statuses(workflow) == before


def test_bulk_api_refuses_a_body_that_is_not_an_object(api):
    response = api.post("/api/runs/retry/", [1, 2], format="json")
    assert response.status_code == 400 and "non_field_errors" in response.json()["errors"]
    response = api.post("/api/runs/retry/", "{not json", content_type="application/json")
    assert response.status_code == 400 and response["Content-Type"].startswith("application/json")


def test_bulk_api_needs_the_change_permission(user, anon_api):
    workflow = failing_workflow()
    failed_run(workflow)
    before = statuses(workflow)
    reader = APIClient()
    reader.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    for client, expected in ((reader, 403), (anon_api, 401)):
        for action in ("cancel", "retry"):
            response = client.post(f"/api/runs/{action}/", {"workflow": "bulk_fail"}, format="json")
            assert response.status_code == expected, response.content
            assert "detail" in response.json()
    assert statuses(workflow) == before
    user.user_permissions.add(Permission.objects.get(codename="change_workflowrun"))
    response = reader.post("/api/runs/retry/", {"workflow": "bulk_fail"}, format="json")
    assert response.json() == {"matched": 1, "changed": 1}


# --------------------------------------------------------------------------- the run list's actions


def test_run_list_offers_the_actions_only_to_those_allowed(client, user, trigger_user):
    workflow = failing_workflow()
    failed_run(workflow)
    client.force_login(user)
    page = client.get("/runs/", {"workflow": "bulk_fail"}).content.decode()
    assert 'data-bulk="retry-all"' not in page and 'name="trace_id"' not in page
    client.force_login(trigger_user)
    page = client.get("/runs/", {"workflow": "bulk_fail"}).content.decode()
    assert 'data-bulk="retry-all"' in page and 'data-bulk="retry-selected"' in page and 'name="trace_id"' in page
    # Unfiltered, "all matching" would mean every run: not offered.
    assert 'data-bulk="retry-all"' not in client.get("/runs/").content.decode()


def test_retry_all_matching_asks_for_confirmation_with_the_count_then_retries(client, trigger_user):
    workflow = failing_workflow()
    runs = [failed_run(workflow) for _ in range(4)]
    engine.workflow_run_start(workflow=workflow, payload={})  # matches the workflow, is not retryable
    client.force_login(trigger_user)
    query = {"action": "retry", "scope": "all", "workflow": "bulk_fail"}

    confirm = client.get("/runs/bulk/", query)
    assert confirm.status_code == 200
    page = confirm.content.decode()
    assert 'data-confirm-count="4"' in page and 'data-matched="5"' in page
    assert set(statuses(workflow).values()) == {"FAILED", "RUNNING"}, "a GET changed something"
    form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page))
    assert form["workflow"] == "bulk_fail" and form["action"] == "retry"

    done = client.post("/runs/bulk/", form, follow=True)
    assert done.redirect_chain[-1][0].startswith("/runs/?workflow=bulk_fail")
    assert "4 of 5 matching runs retried" in done.content.decode()
    assert {WorkflowRun.objects.get(pk=r.pk).status for r in runs} == {"RUNNING"}


def test_cancel_selected_acts_on_the_checked_runs_only(client, trigger_user):
    workflow = failing_workflow()
    runs = [engine.workflow_run_start(workflow=workflow, payload={"n": i})[0] for i in range(3)]
    client.force_login(trigger_user)
    chosen = [str(runs[0].trace_id), str(runs[2].trace_id)]

    page = client.get(
        "/runs/bulk/", {"action": "cancel", "scope": "selected", "trace_id": chosen, "next": "/runs/"}
    ).content.decode()
    assert 'data-confirm-count="2"' in page
    response = client.post(
        "/runs/bulk/", {"action": "cancel", "scope": "selected", "trace_id": chosen, "next": "/runs/"}
    )
    assert response.status_code == 302 and response["Location"] == "/runs/"
    assert [WorkflowRun.objects.get(pk=r.pk).status for r in runs] == ["CANCELED", "RUNNING", "CANCELED"]


@pytest.mark.parametrize(
    "query",
    [
        {"action": "retry", "scope": "all"},
        {"action": "retry", "scope": "selected"},
        {"action": "explode", "scope": "all", "workflow": "bulk_fail"},
        {"action": "retry", "scope": "all", "payload": "{oops"},
        {"action": "retry", "scope": "all", "since": "2026-11-22", "until": "2026-11-21"},
    ],
)
def test_the_bulk_page_refuses_what_names_no_runs_and_changes_nothing(client, trigger_user, query):
    workflow = failing_workflow()
    failed_run(workflow)
    before = statuses(workflow)
    client.force_login(trigger_user)
    for response in (client.get("/runs/bulk/", query), client.post("/runs/bulk/", query)):
        assert response.status_code == 400
        assert "Nothing was changed" in response.content.decode()
    assert statuses(workflow) == before


def test_the_bulk_page_needs_the_change_permission(client, user):
    workflow = failing_workflow()
    failed_run(workflow)
    client.force_login(user)
    query = {"action": "retry", "scope": "all", "workflow": "bulk_fail"}
    assert client.get("/runs/bulk/", query).status_code == 403
    assert client.post("/runs/bulk/", query).status_code == 403
    assert set(statuses(workflow).values()) == {"FAILED"}
