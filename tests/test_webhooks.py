"""Webhooks on PostgreSQL, sent to a real HTTP receiver: the settings refused with the field named,
the outbox written in the transaction of the change it reports, signatures checked with the
`standardwebhooks` library, retries after each failure and only then, lost messages sent again."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import transaction
from standardwebhooks.webhooks import Webhook as Verifier

from tests import factories
from tests.test_api import assert_json_error
from tests.test_engine import finish_task, start
from tests.webhook_receiver import Receiver
from webhooks_app import services
from webhooks_app.models import Delivery, DeliveryAttempt, Webhook
from workflows_app import engine
from workflows_app.engine import outbox
from workflows_app.models import TaskRun

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"


@pytest.fixture
def private_ok(settings):
    settings.EVENTFLOW = {**settings.EVENTFLOW, "WEBHOOK_ALLOW_PRIVATE": True, "WEBHOOK_RETRY_SECONDS": 5.0}


@pytest.fixture
def admin_api(admin_user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(admin_user)
    return client


def hook(url: str, *notifications: str) -> Webhook:
    return Webhook.objects.create(url=url, notifications=list(notifications), secret=services.secret_new())


def pending(webhook: Webhook, data: dict | None = None, **fields) -> Delivery:
    """A run.failed notification in the outbox, due now, as the engine writes one."""
    now = services._now()
    return Delivery.objects.create(
        webhook=webhook,
        notification="run.failed",
        trace_id="00000000-0000-0000-0000-000000000001",
        data=data if data is not None else {},
        created_at=now,
        next_attempt_at=now,
        **fields,
    )


def verified(receiver: Receiver, webhook: Webhook) -> list[dict]:
    """Every request the receiver got, each checked with Standard Webhooks' own verifier."""
    return [Verifier(webhook.secret).verify(r["body"], r["headers"]) for r in receiver.got()]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/x", "notifications": ["run.failed"]}, "url"),
        ({"url": "file:///etc/passwd", "notifications": ["run.failed"]}, "url"),
        ({"url": "http://127.0.0.1:9/hook", "notifications": ["run.failed"]}, "url"),
        ({"url": "http://10.1.2.3/hook", "notifications": ["run.failed"]}, "url"),
        ({"url": "http://169.254.169.254/latest", "notifications": ["run.failed"]}, "url"),
        ({"url": "http://[::1]/hook", "notifications": ["run.failed"]}, "url"),
        ({"url": "https://93.184.215.14/hook", "notifications": ["run.exploded"]}, "notifications"),
        ({"url": "https://93.184.215.14/hook", "notifications": []}, "notifications"),
        ({"url": "https://93.184.215.14/hook", "notifications": ["run.failed"], "secret": "plain"}, "secret"),
        ({"url": "https://93.184.215.14/hook", "notifications": ["run.failed"], "colour": "red"}, "colour"),
    ],
)
def test_a_bad_webhook_is_a_400_naming_the_field_and_nothing_is_saved(admin_api, body, field):
    error = assert_json_error(admin_api.post("/api/webhooks/", body, format="json"), 400)
    assert field in error["errors"]
    assert not Webhook.objects.exists()


def test_a_webhook_is_made_with_its_secret_shown_once(admin_api, api):
    created = admin_api.post(
        "/api/webhooks/", {"url": "https://93.184.215.14/hook", "notifications": ["run.failed"]}, format="json"
    )
    assert created.status_code == 201
    secret = created.json()["secret"]
    assert secret.startswith("whsec_") and Webhook.objects.get().secret == secret
    shown = admin_api.get(f"/api/webhooks/{created.json()['id']}/").json()
    assert "secret" not in shown and shown["notifications"] == ["run.failed"]
    assert api.post("/api/webhooks/", {}, format="json").status_code == 403  # no add_webhook permission
    changed = admin_api.patch(f"/api/webhooks/{shown['id']}/", {"notifications": ["nope"]}, format="json")
    assert "notifications" in assert_json_error(changed, 400)["errors"]
    assert Webhook.objects.get().notifications == ["run.failed"]


def test_a_failing_run_writes_its_notifications_in_its_own_transaction(private_ok, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    webhook = hook("http://127.0.0.1:9/hook", "task.failed", "run.failed", "run.succeeded")
    workflow = factories.workflow(factories.spec("two", [("a", ECHO), ("b", ECHO)], [["a", "b"]]))
    run = start(workflow, capture=cap)
    assert not Delivery.objects.exists()
    # The same failure, rolled back: it raised nothing.
    with pytest.raises(RuntimeError), transaction.atomic():
        finish_task(run, TaskRun.objects.get(run=run, node_key="a"), cap, ok=False)
        raise RuntimeError("rolled back")
    assert not Delivery.objects.exists()
    with cap(execute=False) as callbacks:
        finish_task(run, TaskRun.objects.get(run=run, node_key="a"), cap, ok=False)
    made = {d.notification: d for d in Delivery.objects.all()}
    assert set(made) == {"task.failed", "run.failed"}
    assert made["run.failed"].data == {"trace_id": str(run.trace_id), "status": "FAILED", "workflow": "two"}
    assert made["task.failed"].data["node"] == "a" and made["task.failed"].data["error"] == "boom"
    assert all(d.webhook_id == webhook.pk and d.state == "pending" for d in made.values())
    assert callbacks is not None


def test_a_canceled_run_and_a_reached_approval_raise_their_notifications(
    private_ok, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    hook("http://127.0.0.1:9/hook", "run.canceled", "approval.requested")
    workflow = factories.workflow(factories.spec("ask", [{"key": "ok", "kind": "approval", "event_type": None}]))
    run = start(workflow, capture=cap)
    assert list(Delivery.objects.values_list("notification", flat=True)) == ["approval.requested"]
    with cap(execute=True):
        engine.workflow_run_cancel(trace_id=str(run.trace_id))
    assert set(Delivery.objects.values_list("notification", flat=True)) == {"approval.requested", "run.canceled"}


def test_a_receiver_failing_three_times_gets_it_once_more_after_each_failure_then_never(private_ok):
    with Receiver([500, 500, 503]) as receiver:
        webhook = hook(receiver.url, "run.failed")
        delivery = pending(webhook, {"trace_id": "00000000-0000-0000-0000-000000000001", "status": "FAILED"})
        states = []
        for n in range(1, 5):
            states.append(services.deliver(str(delivery.pk)))
            assert len(receiver.got()) == n
            # Not due yet: another message for it (a duplicate, or one early) sends nothing.
            assert services.deliver(str(delivery.pk)) == "skipped"
            assert len(receiver.got()) == n
            delivery.refresh_from_db()
            if delivery.state == "pending":
                assert delivery.next_attempt_at - services._now() > timedelta(seconds=5 * 2 ** (n - 1) - 1)
                Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=services._now())
        assert states == ["pending", "pending", "pending", "delivered"]
        assert services.deliver(str(delivery.pk)) == "skipped"
        assert len(receiver.got()) == 4
        bodies = verified(receiver, webhook)
        assert bodies[0] == {"type": "run.failed", "timestamp": delivery.created_at.isoformat(), "data": delivery.data}
        assert len({r["headers"]["webhook-id"] for r in receiver.got()}) == 1  # one id for every attempt
        log = list(DeliveryAttempt.objects.filter(delivery=delivery).values_list("number", "status_code", "error"))
        assert log == [(1, 500, "answered 500"), (2, 500, "answered 500"), (3, 503, "answered 503"), (4, 200, "")]


def test_a_lost_message_is_sent_again_once_its_claim_lapses(private_ok, django_capture_on_commit_callbacks):
    with Receiver() as receiver:
        webhook = hook(receiver.url, "run.failed")
        now = services._now()
        delivery = pending(webhook, claimed_until=now + timedelta(minutes=1))
        sent: list = []
        original = outbox.publish
        outbox.publish = lambda messages, revokes: sent.extend(messages)
        try:
            with django_capture_on_commit_callbacks(execute=True):
                assert services.deliveries_recover() == 0  # its message may still be on its way
            Delivery.objects.filter(pk=delivery.pk).update(claimed_until=now - timedelta(seconds=1))
            with django_capture_on_commit_callbacks(execute=True):
                assert services.deliveries_recover() == 1
        finally:
            outbox.publish = original
        assert [(m["task_name"], o["args"]) for m, o in sent] == [("webhooks_app.tasks.deliver", [str(delivery.pk)])]
        assert services.deliver(str(delivery.pk)) == "delivered"
        assert len(verified(receiver, webhook)) == 1


def test_a_private_address_is_refused_at_send_time_too(settings):
    webhook = hook("http://127.0.0.1:9/hook", "run.failed")
    delivery = pending(webhook)
    assert services.deliver(str(delivery.pk)) == "pending"
    attempt = DeliveryAttempt.objects.get(delivery=delivery)
    assert attempt.status_code is None and "private address" in attempt.error


def test_send_again_in_the_admin_sends_a_delivered_notification_once_more(private_ok, admin_client):
    with Receiver() as receiver:
        webhook = hook(receiver.url, "run.failed")
        delivery = pending(webhook, {"x": 1})
        assert services.deliver(str(delivery.pk)) == "delivered"
        response = admin_client.post(
            "/admin/webhooks_app/delivery/", {"action": "send_again", "_selected_action": [str(delivery.pk)]}
        )
        assert response.status_code == 302
        delivery.refresh_from_db()
        assert delivery.state == "pending"
        assert services.deliver(str(delivery.pk)) == "delivered"
        assert [json.loads(r["body"])["data"] for r in receiver.got()] == [{"x": 1}, {"x": 1}]
