"""End to end: nodes that wait, on real worker processes (which also reconcile), through the public API."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from workflows_app.models import TaskRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ECHO, SLEEP = "workflows_app.tasks.echo", "workflows_app.tasks.sleep"
# Workers reconcile every second here: a wait ends within its deadline and that.
RECONCILE = 1.0
FAST = {"EVENTFLOW_RECONCILE_SECONDS": str(RECONCILE)}


def node(trace_id: str, key: str) -> TaskRun:
    return TaskRun.objects.get(run_id=trace_id, node_key=key, map_index=None)


def status_of(trace_id: str, key: str) -> str:
    return node(trace_id, key).status


def db_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


def wait_workflow(name: str = "moderation", first_seconds: float = 0.0, **wait) -> None:
    # first -> moderated (wait_event keyed by the payload's sku) -> publish
    factories.workflow(
        factories.spec(
            name,
            [
                {"key": "first", "task": SLEEP, "params": {"seconds": first_seconds}},
                {
                    "key": "moderated",
                    "kind": "wait_event",
                    "event_type": "marketplace.moderated",
                    "event_key": "payload.sku",
                    **wait,
                },
                ("publish", ECHO),
            ],
            [["first", "moderated"], ["moderated", "publish"]],
            event_type="e2e",
        )
    )


def publish(api, key: str | None, payload: dict | None = None) -> dict:
    body = {"event_type": "marketplace.moderated", "payload": payload or {}}
    if key is not None:
        body["key"] = key
    response = api.post("/api/events/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_a_run_waits_deferred_until_its_event_and_the_same_event_again_resumes_nothing(workers, api):
    wait_workflow()
    workers(["e2e"], concurrency=2)
    trace_id = trigger(api, "moderation", {"sku": "A-1"})
    wait_for(lambda: status_of(trace_id, "moderated") == "DEFERRED", timeout=30, what="the wait to be reached")
    assert publish(api, "B-2")["resumed"] == []
    assert publish(api, None)["resumed"] == []
    assert status_of(trace_id, "moderated") == "DEFERRED"
    answer = publish(api, "A-1", {"status": "approved"})
    assert answer["resumed"] == [{"trace_id": trace_id, "node": "moderated"}]
    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}
    assert node(trace_id, "moderated").result == {
        "event_id": answer["event_id"],
        "key": "A-1",
        "payload": {"status": "approved"},
    }
    assert publish(api, "A-1", {"status": "approved"})["resumed"] == []
    detail = api.get(f"/api/runs/{trace_id}/").json()
    assert {t["node"]: t["status"] for t in detail["tasks"]}["moderated"] == "SUCCESS"


def test_an_event_published_before_the_node_is_reached_resumes_it_there(workers, api):
    wait_workflow(first_seconds=1.0)
    workers(["e2e"], concurrency=2)
    trace_id = trigger(api, "moderation", {"sku": "A-7"})
    early = publish(api, "A-7", {"status": "approved"})
    assert early["resumed"] == []
    assert status_of(trace_id, "first") in ("QUEUED", "STARTED")  # published while the run was before it
    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}
    assert node(trace_id, "moderated").result["event_id"] == early["event_id"]


@pytest.fixture
def approver(django_user_model) -> APIClient:
    user = django_user_model.objects.create_user(username="reviewer", password="pw-reviewer-123")
    user.user_permissions.add(Permission.objects.get(codename="approve_workflowrun"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def test_an_approval_needs_the_permission_and_is_approved_or_rejected_through_the_api(workers, api, approver):
    factories.workflow(
        factories.spec(
            "review",
            [("draft", ECHO), {"key": "review", "kind": "approval", "event_type": None}, ("publish", ECHO)],
            [["draft", "review"], ["review", "publish"]],
            event_type="e2e",
        )
    )
    workers(["e2e"], concurrency=2)
    approved, rejected = trigger(api, "review"), trigger(api, "review")
    for trace_id in (approved, rejected):
        wait_for(lambda t=trace_id: status_of(t, "review") == "DEFERRED", timeout=30, what="the approval")

    denied = api.post(f"/api/runs/{approved}/nodes/review/approve/", {}, format="json")
    assert denied.status_code == 403 and "approve_workflowrun" in denied.json()["detail"]
    assert status_of(approved, "review") == "DEFERRED"
    ok = approver.post(f"/api/runs/{approved}/nodes/review/approve/", {"comment": "fine"}, format="json")
    assert ok.status_code == 200, ok.content
    again = approver.post(f"/api/runs/{approved}/nodes/review/approve/", {}, format="json")
    assert again.status_code == 409 and "not a waiting approval" in again.json()["detail"]
    no = approver.post(f"/api/runs/{rejected}/nodes/review/reject/", {"comment": "wrong price"}, format="json")
    assert no.status_code == 200, no.content
    assert approver.post(f"/api/runs/{rejected}/nodes/draft/approve/", {}, format="json").status_code == 409
    assert approver.post(f"/api/runs/{rejected}/nodes/nowhere/approve/", {}, format="json").status_code == 404

    assert wait_final([approved, rejected]) == {approved: "SUCCESS", rejected: "FAILED"}
    result = node(approved, "review").result
    assert (result["approved"], result["by"], result["comment"]) == (True, "reviewer", "fine")
    assert node(rejected, "review").error == "rejected by reviewer: wrong price"
    assert status_of(rejected, "publish") == "UPSTREAM_FAILED"


def test_a_delay_and_a_timeout_end_within_their_bound_even_across_a_stop_of_every_worker(workers, api):
    factories.workflow(
        factories.spec(
            "pause",
            [("first", ECHO), {"key": "cool_down", "kind": "delay", "seconds": 3, "event_type": None}, ("after", ECHO)],
            [["first", "cool_down"], ["cool_down", "after"]],
            event_type="e2e",
        )
    )
    wait_workflow(timeout=3)
    worker = workers(["e2e"], concurrency=2, env=FAST)
    delayed, timed_out = trigger(api, "pause"), trigger(api, "moderation", {"sku": "never"})
    waits = ((delayed, "cool_down"), (timed_out, "moderated"))
    due = {
        key: wait_for(lambda t=trace_id, k=key: node(t, k).due_at, timeout=30, what=f"{key} to be reached")
        for trace_id, key in waits
    }
    assert wait_final([delayed, timed_out], timeout=30) == {delayed: "SUCCESS", timed_out: "FAILED"}
    for trace_id, key in waits:
        ended = node(trace_id, key).finished_at
        assert ended >= due[key]  # on the database's clock
        assert (ended - due[key]).total_seconds() <= RECONCILE + 1.5
    assert "no outcome within its timeout of 3 s" in node(timed_out, "moderated").error

    # Every worker stopped across the deadlines: the waits end as soon as one is back.
    delayed, timed_out = trigger(api, "pause"), trigger(api, "moderation", {"sku": "never"})
    wait_for(
        lambda: status_of(delayed, "cool_down") == "DEFERRED" and status_of(timed_out, "moderated") == "DEFERRED",
        timeout=30,
        what="both waits to be reached",
    )
    worker.stop()
    due = max(node(delayed, "cool_down").due_at, node(timed_out, "moderated").due_at)
    wait_for(lambda: db_now() > due, timeout=10, what="the deadlines to pass with no worker")
    assert status_of(delayed, "cool_down") == "DEFERRED" and status_of(timed_out, "moderated") == "DEFERRED"
    workers(["e2e"], concurrency=2, env=FAST, name="back")
    back = db_now()
    assert wait_final([delayed, timed_out], timeout=30) == {delayed: "SUCCESS", timed_out: "FAILED"}
    for trace_id, key in ((delayed, "cool_down"), (timed_out, "moderated")):
        assert (node(trace_id, key).finished_at - back).total_seconds() <= RECONCILE + 1.5  # not from zero


def test_cancel_ends_a_waiting_node_revoked_and_a_later_event_resumes_nothing(workers, api):
    wait_workflow()
    workers(["e2e"], concurrency=2)
    trace_id = trigger(api, "moderation", {"sku": "C-3"})
    wait_for(lambda: status_of(trace_id, "moderated") == "DEFERRED", timeout=30, what="the wait to be reached")
    assert api.post(f"/api/runs/{trace_id}/cancel/").status_code == 200
    assert status_of(trace_id, "moderated") == "REVOKED"
    assert publish(api, "C-3")["resumed"] == []
    assert wait_final([trace_id]) == {trace_id: "CANCELED"}
    assert status_of(trace_id, "moderated") == "REVOKED"


def test_two_events_racing_for_one_waiter_resume_it_once(workers, api):
    """Two publishers of matching events at once, each in its own connection and transaction: one
    resumes the node, the other resumes nothing, and the node's result is the winner's event."""
    import threading

    from django.db import connections

    wait_workflow()
    workers(["e2e"], concurrency=2)
    trace_id = trigger(api, "moderation", {"sku": "R-1"})
    wait_for(lambda: status_of(trace_id, "moderated") == "DEFERRED", timeout=30, what="the wait to be reached")
    barrier, answers = threading.Barrier(2), []

    def publish_at_once(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            answers.append(publish(api, "R-1", {"n": n}))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=publish_at_once, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(len(a["resumed"]) for a in answers) == [0, 1]
    winner = next(a for a in answers if a["resumed"])
    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}
    assert node(trace_id, "moderated").result["event_id"] == winner["event_id"]
