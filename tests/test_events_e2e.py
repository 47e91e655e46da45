"""End to end: a published event starts exactly its subscribed workflows, on real workers, and leads their events."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django_celery_results.models import TaskResult

from events_app.models import Event
from tests import factories
from tests.e2e import wait_final
from workflows_app import engine, selectors
from workflows_app.models import TaskRun, WorkflowRun

ECHO, SLEEP = "workflows_app.tasks.echo", "workflows_app.tasks.sleep"
QUEUE = "e2e_events"


def subscribed_workflows() -> None:
    factories.workflow(
        factories.spec(
            "fulfil",
            [("reserve", ECHO), ("ship", ECHO)],
            [["reserve", "ship"]],
            event_type=QUEUE,
            trigger_event_types=["order.placed"],
        )
    )
    factories.workflow(
        factories.spec(
            "invoice",
            [{"key": "bill", "task": SLEEP, "params": {"seconds": 0.2}}],
            event_type=QUEUE,
            trigger_event_types=["order.placed", "order.refunded"],
        )
    )
    factories.workflow(
        factories.spec("refund", [("pay_back", ECHO)], event_type=QUEUE, trigger_event_types=["order.refunded"])
    )


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_published_event_starts_exactly_its_subscribers_and_leads_their_events(workers, api):
    subscribed_workflows()
    workers([QUEUE], concurrency=2)

    response = api.post(
        "/api/events/",
        {"event_type": "order.placed", "payload": {"order": 42}},
        format="json",
        HTTP_IDEMPOTENCY_KEY="order-42-placed",
    )
    assert response.status_code == 201, response.content
    event_id, trace_ids = response.json()["event_id"], response.json()["trace_ids"]
    runs = {r.workflow.name: r for r in WorkflowRun.objects.filter(trace_id__in=trace_ids).select_related("workflow")}
    assert set(runs) == {"fulfil", "invoice"}
    assert not WorkflowRun.objects.filter(workflow__name="refund").exists()

    assert set(wait_final(trace_ids, timeout=60).values()) == {"SUCCESS"}

    for name, run in runs.items():
        assert run.source == f"event:{event_id}"
        assert api.get(f"/api/runs/{run.trace_id}/").json()["source"] == f"event:{event_id}"
        events = api.get(f"/api/runs/{run.trace_id}/events/").json()["results"]
        first, attempts = events[0], events[1:]
        assert first["event_id"] == event_id, name
        assert first["event_type"] == "order.placed" and first["payload"] == {"order": 42}
        assert first["trace_id"] is None
        assert [e["context"]["node"] for e in attempts] == [t.node_key for t in run.tasks.order_by("id")]
        assert all(e["trace_id"] == str(run.trace_id) and e["status"] == "SUCCESS" for e in attempts)
        # The run's payload is the event's: each task saw it.
        assert all(e["payload"]["order"] == 42 for e in attempts)

    # Every attempt's Celery result is kept under its event id, and the run API links to it.
    tasks = api.get(f"/api/runs/{runs['fulfil'].trace_id}/").json()["tasks"]
    for task in tasks:
        stored = TaskResult.objects.get(task_id=task["event_id"])
        assert stored.status == "SUCCESS" and stored.task_name == ECHO
        result = api.get(task["result_url"]).json()
        assert result["task_id"] == task["event_id"] and result["status"] == "SUCCESS"
        assert result["result"] == task["result"]

    # The same key again: the same answer, nothing new written.
    before = (Event.objects.count(), WorkflowRun.objects.count(), TaskRun.objects.count())
    again = api.post(
        "/api/events/",
        {"event_type": "order.placed", "payload": {"order": 42}},
        format="json",
        HTTP_IDEMPOTENCY_KEY="order-42-placed",
    )
    assert again.status_code == 200, again.content
    assert again.json() == {"event_id": event_id, "trace_ids": trace_ids, "resumed": []}
    assert (Event.objects.count(), WorkflowRun.objects.count(), TaskRun.objects.count()) == before


@pytest.mark.django_db(transaction=True)
def test_the_same_key_published_at_once_from_many_requests_stores_one_event():
    subscribed_workflows()
    barrier = threading.Barrier(4)
    answers: list[tuple[str, list[str], bool]] = []

    def publish() -> None:
        try:
            barrier.wait()
            event, runs, created = engine.event_publish(
                event_type="order.placed", payload={"order": 7}, idempotency_key="order-7"
            )
            answers.append((str(event.event_id), [str(r.trace_id) for r in runs], created))
        finally:
            connection.close()

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(answers) == 4
    assert len({(event_id, tuple(trace_ids)) for event_id, trace_ids, _ in answers}) == 1
    assert sorted(created for *_, created in answers) == [False, False, False, True]
    assert Event.objects.filter(idempotency_key="order-7").count() == 1
    assert WorkflowRun.objects.count() == 2


@pytest.mark.django_db
def test_the_key_is_per_event_type_and_a_run_lists_its_trigger_first():
    subscribed_workflows()
    placed, runs, _ = engine.event_publish(event_type="order.placed", payload={}, idempotency_key="k")
    refunded, refund_runs, created = engine.event_publish(event_type="order.refunded", payload={}, idempotency_key="k")
    assert created and refunded.pk != placed.pk
    assert {r.workflow.name for r in refund_runs} == {"invoice", "refund"}

    invoice = next(r for r in runs if r.workflow.name == "invoice")
    events = list(selectors.run_events(trace_id=str(invoice.trace_id)))
    assert [e.pk for e in events[:1]] == [placed.pk]
    assert [e.context["node"] for e in events[1:]] == ["bill"]
    assert invoice.trigger_event_id == placed.pk
    # A run nobody published an event for lists its attempts only.
    plain, _ = engine.workflow_run_start(workflow=invoice.workflow, payload={})
    assert [e.context.get("node") for e in selectors.run_events(trace_id=str(plain.trace_id))] == ["bill"]
