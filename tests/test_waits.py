"""Nodes that wait, driven directly on PostgreSQL (each test states its graph): wait_event resumed by a
published event (once, and also when the event came first), approvals decided once, delays and
timeouts ended by the reconciler on the database's clock, and cancel."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models.functions import Now

from events_app.models import EventType
from tests import factories
from tests.test_engine import ECHO, Sent, run_task, start, statuses
from tests.workers import purge_broker
from workflows_app import engine
from workflows_app.definitions import DefinitionError, definition_validate
from workflows_app.engine import EngineError
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent() -> Sent:
    purge_broker()
    return Sent()


def waiting_spec(name: str = "waits", **wait) -> dict:
    # first -> moderated (wait_event on marketplace.moderated, keyed by the payload's sku) -> publish
    node = {"key": "moderated", "kind": "wait_event", "event_type": "marketplace.moderated", "event_key": "payload.sku"}
    return factories.spec(
        name,
        [("first", ECHO), {**node, **wait}, ("publish", ECHO)],
        [["first", "moderated"], ["moderated", "publish"]],
    )


def row(run: WorkflowRun, key: str) -> TaskRun:
    return TaskRun.objects.get(run=run, node_key=key, map_index=None)


def publish(capture, key: str | None, payload: dict | None = None, event_type: str = "marketplace.moderated"):
    with capture(execute=True):
        event, _, _ = engine.event_publish(event_type=event_type, payload=payload or {}, key=key)
    return event


def due_now(run: WorkflowRun, key: str) -> None:
    TaskRun.objects.filter(run=run, node_key=key).update(due_at=Now() - timedelta(seconds=1))


def test_a_wait_event_waits_deferred_and_the_matching_event_resumes_it_once(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(waiting_spec(timeout=600)), {"sku": "A-1"}, capture=cap)
    run_task(run, "first", cap)
    waiting = row(run, "moderated")
    assert (waiting.status, waiting.wait_type, waiting.wait_key) == ("DEFERRED", "marketplace.moderated", "A-1")
    assert not waiting.holds_slot and waiting.current_event_id and waiting.due_at is not None
    assert [e["context"]["node"] for e in sent.events()] == ["first"]  # no message for a waiting node

    assert publish(cap, "B-2").resumed == []  # another key
    assert publish(cap, None).resumed == []  # no key
    assert row(run, "moderated").status == "DEFERRED"
    event = publish(cap, "A-1", {"status": "approved"})
    assert event.resumed == [{"trace_id": str(run.trace_id), "node": "moderated"}]
    done = row(run, "moderated")
    assert done.status == "SUCCESS"
    assert done.result == {"event_id": str(event.event_id), "key": "A-1", "payload": {"status": "approved"}}
    assert row(run, "publish").current_event.context["upstream"]["moderated"] == done.result
    assert publish(cap, "A-1", {"status": "again"}).resumed == []  # nothing more
    assert row(run, "moderated").result == done.result


def test_an_event_published_before_the_node_is_reached_resumes_it_when_reached(
    sent, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(waiting_spec()), {"sku": "A-1"}, capture=cap)
    early = publish(cap, "A-1", {"status": "approved"})
    assert early.resumed == []  # nothing waits yet
    run_task(run, "first", cap)
    assert row(run, "moderated").status == "SUCCESS"
    assert row(run, "moderated").result["event_id"] == str(early.event_id)
    assert statuses(run)["publish"] == "QUEUED"


def test_match_filters_the_events_a_waiter_takes(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(waiting_spec(match='event.payload.status != "error"'))
    run = start(wf, {"sku": "A-1"}, capture=cap)
    publish(cap, "A-1", {"status": "error"})  # before it is reached: read back, and passed over
    run_task(run, "first", cap)
    assert row(run, "moderated").status == "DEFERRED"
    assert publish(cap, "A-1", {"status": "error"}).resumed == []
    assert publish(cap, "A-1", {}).resumed == []  # `match` fails on a missing key: no match
    assert len(publish(cap, "A-1", {"status": "ok"}).resumed) == 1


def test_a_timeout_fails_the_waiter_or_skips_it(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    failing = start(factories.workflow(waiting_spec(timeout=60)), {"sku": "A-1"}, capture=cap)
    skipping = start(
        factories.workflow(waiting_spec("skips", timeout=60, on_timeout="skip")), {"sku": "B"}, capture=cap
    )
    for run in (failing, skipping):
        run_task(run, "first", cap)
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 0  # not due yet on the database's clock
    due_now(failing, "moderated")
    due_now(skipping, "moderated")
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 2
    assert row(failing, "moderated").status == "FAILURE"
    assert "no outcome within its timeout of 60 s" in row(failing, "moderated").error
    assert row(failing, "publish").status == "UPSTREAM_FAILED"
    assert row(skipping, "moderated").status == "SKIPPED"
    assert row(skipping, "publish").status == "SKIPPED"
    failing.refresh_from_db()
    skipping.refresh_from_db()
    assert (failing.status, skipping.status) == ("FAILED", "SUCCESS")


def test_a_delay_succeeds_once_due(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    spec = factories.spec(
        "pause",
        [("first", ECHO), {"key": "cool_down", "kind": "delay", "seconds": 600, "event_type": None}, ("after", ECHO)],
        [["first", "cool_down"], ["cool_down", "after"]],
    )
    run = start(factories.workflow(spec), {}, capture=cap)
    run_task(run, "first", cap)
    waiting = row(run, "cool_down")
    assert waiting.status == "DEFERRED"
    assert timedelta(seconds=599) < waiting.due_at - waiting.queued_at <= timedelta(seconds=600)
    due_now(run, "cool_down")
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 1
    assert (row(run, "cool_down").status, row(run, "cool_down").result) == ("SUCCESS", {"waited": 600})
    assert statuses(run)["after"] == "QUEUED"


def approval_spec() -> dict:
    return factories.spec(
        "review",
        [("draft", ECHO), {"key": "review", "kind": "approval", "event_type": None}, ("publish", ECHO)],
        [["draft", "review"], ["review", "publish"]],
    )


def test_an_approval_is_decided_once(sent, django_capture_on_commit_callbacks, admin_user):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(approval_spec())
    approved, rejected = start(wf, {}, capture=cap), start(wf, {}, capture=cap)
    with pytest.raises(EngineError) as early:
        engine.task_run_decide(trace_id=str(approved.trace_id), node="review", approve=True, user=admin_user)
    assert early.value.status == 409  # not reached yet
    for run in (approved, rejected):
        run_task(run, "draft", cap)
    with cap(execute=True):
        engine.task_run_decide(
            trace_id=str(approved.trace_id), node="review", approve=True, user=admin_user, comment="looks good"
        )
    result = row(approved, "review").result
    assert (result["approved"], result["by"], result["comment"]) == (True, "admin", "looks good")
    assert result["at"].endswith("Z")
    assert statuses(approved)["publish"] == "QUEUED"
    with pytest.raises(EngineError) as twice:
        engine.task_run_decide(trace_id=str(approved.trace_id), node="review", approve=False, user=admin_user)
    assert twice.value.status == 409
    with pytest.raises(EngineError) as not_approval:
        engine.task_run_decide(trace_id=str(approved.trace_id), node="draft", approve=True, user=admin_user)
    assert not_approval.value.status == 409
    with pytest.raises(EngineError) as unknown:
        engine.task_run_decide(trace_id=str(approved.trace_id), node="nope", approve=True, user=admin_user)
    assert unknown.value.status == 404

    with cap(execute=True):
        engine.task_run_decide(
            trace_id=str(rejected.trace_id), node="review", approve=False, user=admin_user, comment="wrong price"
        )
    assert row(rejected, "review").status == "FAILURE"
    assert row(rejected, "review").error == "rejected by admin: wrong price"
    assert row(rejected, "review").current_event.result == {"error": "rejected by admin: wrong price"}
    rejected.refresh_from_db()
    assert rejected.status == "FAILED"


def test_cancel_revokes_a_waiting_node_and_a_later_event_resumes_nothing(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(waiting_spec()), {"sku": "A-1"}, capture=cap)
    run_task(run, "first", cap)
    with cap(execute=True):
        engine.workflow_run_cancel(trace_id=str(run.trace_id))
    assert row(run, "moderated").status == "REVOKED"
    assert publish(cap, "A-1").resumed == []
    assert row(run, "moderated").status == "REVOKED"


def test_waiting_nodes_hold_no_slot_and_make_no_queue(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(waiting_spec()), {"sku": "A-1"}, capture=cap)
    run_task(run, "first", cap)
    assert not EventType.objects.filter(name="marketplace.moderated").exists()
    assert row(run, "moderated").event_type_id is None


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"event_key": "payload.sku +"}, "node 'moderated': event_key `payload.sku +` does not compile"),
        ({"event_key": "upstream.publish.sku"}, "reads upstream.publish, which is not a predecessor"),
        ({"match": "event.payload.n + 1"}, "node 'moderated': match `event.payload.n + 1` gives int, not a bool"),
        ({"match": "payload.x"}, "node 'moderated': match `payload.x` does not compile"),
        ({"on_timeout": "retry"}, "on_timeout must be fail or skip"),
        ({"max_retries": 2}, "is not retried"),
        ({"event_type": None}, "event_type must name the events it waits for"),
    ],
)
def test_a_bad_wait_is_refused_naming_it(node, message):
    with pytest.raises(DefinitionError) as refused:
        definition_validate(waiting_spec(**node), known_tasks={ECHO})
    assert any(message in error for error in refused.value.errors), refused.value.errors


def test_workflow_status_shows_what_a_waiting_node_waits_for(sent, django_capture_on_commit_callbacks):
    import io

    from django.core.management import call_command

    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(waiting_spec(timeout=600)), {"sku": "A-1"}, capture=cap)
    run_task(run, "first", cap)
    out = io.StringIO()
    call_command("workflow_status", str(run.trace_id), stdout=out)
    line = next(line for line in out.getvalue().splitlines() if line.startswith("moderated "))
    assert "DEFERRED (waits for event marketplace.moderated with key A-1 until " in line


def test_deciding_a_node_of_another_workflows_run_is_a_json_404_and_changes_nothing(
    sent, django_capture_on_commit_callbacks, admin_user
):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    cap = django_capture_on_commit_callbacks
    factories.workflow(approval_spec())  # has a `review` node; the run below is of another workflow
    other = start(factories.workflow(waiting_spec()), {"sku": "A-1"}, capture=cap)
    run_task(other, "first", cap)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    before = sorted(TaskRun.objects.filter(run=other).values_list("node_key", "status"))
    answer = client.post(f"/api/runs/{other.trace_id}/nodes/review/approve/", {"comment": "x"}, format="json")
    assert answer.status_code == 404 and "has no node 'review'" in answer.json()["detail"]
    waiting = client.post(f"/api/runs/{other.trace_id}/nodes/moderated/approve/", {}, format="json")
    assert waiting.status_code == 409 and "not a waiting approval" in waiting.json()["detail"]
    bad = client.post(f"/api/runs/{other.trace_id}/nodes/moderated/approve/", {"comment": 3}, format="json")
    assert bad.status_code == 400
    assert sorted(TaskRun.objects.filter(run=other).values_list("node_key", "status")) == before
