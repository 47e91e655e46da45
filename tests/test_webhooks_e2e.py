"""End to end: webhooks from real worker processes to a receiver in the test, each notification's
signature checked with the `standardwebhooks` library."""

from __future__ import annotations

import pytest
from standardwebhooks.webhooks import Webhook as Verifier

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.e2e_tasks import _redis
from tests.webhook_receiver import Receiver
from webhooks_app import services
from webhooks_app.models import Delivery, DeliveryAttempt, Webhook
from workflows_app.models import WorkflowRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ECHO, FAIL = "workflows_app.tasks.echo", "workflows_app.tasks.fail"
ENV = {
    "EVENTFLOW_WEBHOOK_ALLOW_PRIVATE": "true",
    "EVENTFLOW_WEBHOOK_RETRY_SECONDS": "0.3",
    "EVENTFLOW_WEBHOOK_TIMEOUT_SECONDS": "2",
    "EVENTFLOW_RECONCILE_SECONDS": "0.5",
    "EVENTFLOW_DISPATCH_GRACE_SECONDS": "2",
}


@pytest.fixture
def allowed(settings):
    settings.EVENTFLOW = {**settings.EVENTFLOW, "WEBHOOK_ALLOW_PRIVATE": True}


def hook(url: str, *notifications: str) -> Webhook:
    return Webhook.objects.create(url=url, notifications=list(notifications), secret=services.secret_new())


def delivered(trace_id: str, notification: str) -> Delivery | None:
    return Delivery.objects.filter(trace_id=trace_id, notification=notification, state="delivered").first()


def test_a_receiver_answering_500_three_times_gets_each_notification_once_more_after_each_failure(
    workers, api, allowed
):
    factories.workflow(factories.spec("breaks", [("a", FAIL)], event_type="e2e"))
    with Receiver([500, 500, 500]) as receiver:
        webhook = hook(receiver.url, "run.failed")
        workers(["celery", "e2e"], concurrency=2, env=ENV)
        run = trigger(api, "breaks", {"message": "down"})
        assert wait_final([run]) == {run: "FAILED"}
        delivery = wait_for(lambda: delivered(run, "run.failed"), timeout=30, what="run.failed delivered")
        got = receiver.got()
        assert len(got) == 4
        bodies = [Verifier(webhook.secret).verify(r["body"], r["headers"]) for r in got]
        assert all(
            b == {"type": "run.failed", "timestamp": bodies[0]["timestamp"], "data": bodies[0]["data"]} for b in bodies
        )
        assert bodies[0]["data"] == {"trace_id": run, "status": "FAILED", "workflow": "breaks"}
        assert {r["headers"]["webhook-id"] for r in got} == {str(delivery.pk)}
        codes = list(DeliveryAttempt.objects.filter(delivery=delivery).values_list("status_code", flat=True))
        assert codes == [500, 500, 500, 200]
        # Each try came after the one before it failed, and only after its backoff.
        gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:], strict=False)]
        assert all(gap >= 0.25 for gap in gaps)


def test_a_receiver_that_hangs_does_not_slow_a_run(workers, api, allowed):
    factories.workflow(factories.spec("quick", [("a", ECHO), ("b", ECHO)], [["a", "b"]], event_type="e2e"))
    with Receiver(delay=30) as receiver:
        hook(receiver.url, "run.succeeded")
        # As `run_workers` deploys them: the engine's own queue, where notifications are sent from, on a
        # worker of its own.
        workers(["celery"], concurrency=2, env=ENV)
        workers(["e2e"], concurrency=2, env=ENV)
        baseline = trigger(api, "quick")
        wait_final([baseline])
        wait_for(lambda: receiver.got(), timeout=10, what="the receiver to be called")
        # The receiver now hangs on the first notification: the next runs end as fast as one did.
        runs = [trigger(api, "quick") for _ in range(3)]
        assert set(wait_final(runs, timeout=20).values()) == {"SUCCESS"}
        took = {str(r.trace_id): (r.finished_at - r.created_at).total_seconds() for r in WorkflowRun.objects.all()}
        assert all(took[run] < max(1.0, 3 * took[baseline]) for run in runs), took


def test_a_notification_survives_a_kill_9_between_its_commit_and_its_sending(workers, api, allowed):
    factories.workflow(factories.spec("done", [("a", ECHO)], event_type="e2e"))
    _redis().delete("e2e:died-before-delivery")
    with Receiver() as receiver:
        webhook = hook(receiver.url, "run.succeeded")
        doomed = workers(["celery", "e2e"], concurrency=1, name="doomed", env={**ENV, "E2E_DIE_BEFORE_DELIVERY": "1"})
        run = trigger(api, "done")
        assert wait_final([run]) == {run: "SUCCESS"}
        wait_for(lambda: doomed.exited(), timeout=20, what="the worker to die before sending")
        assert not receiver.got()
        workers(["celery", "e2e"], concurrency=1, name="survivor", env=ENV)
        wait_for(lambda: delivered(run, "run.succeeded"), timeout=30, what="the survivor to send it")
        got = receiver.got()
        assert len(got) == 1
        assert Verifier(webhook.secret).verify(got[0]["body"], got[0]["headers"])["data"]["trace_id"] == run
