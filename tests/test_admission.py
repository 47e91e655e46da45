"""Admission's quotas driven through the engine on PostgreSQL: priorities, fairness keys and their
shares, rate windows, queue timeouts, live changes, and the settings refused with the field named.
The messages are read back from the real broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection

from events_app.models import EventType, EventTypeKey
from tests import factories
from tests.test_api import assert_json_error
from tests.test_engine import Sent, finish_task, start
from tests.workers import purge_broker
from workflows_app import engine
from workflows_app.models import TaskRun, WorkflowDefinition, WorkflowRun

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"


@pytest.fixture
def sent() -> Sent:
    purge_broker()
    return Sent()


def one(name: str = "one", **node) -> WorkflowDefinition:
    return factories.workflow(factories.spec(name, [{"key": "a", "task": ECHO, **node}], event_type="q"))


def settings_of(**fields) -> None:
    EventType.objects.get_or_create(name="q")
    engine.event_type_update(name="q", **fields)


def runs_sent(sent) -> list[str]:
    return [event["trace_id"] for event in sent.events()]


def held(name: str = "q") -> int:
    return EventType.objects.get(name=name).held


def test_a_later_run_with_a_higher_priority_goes_before_the_waiting_ones(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    workflow = one()
    settings_of(concurrency=1)
    first = start(workflow, capture=cap)
    waiting = [start(workflow, capture=cap) for _ in range(3)]
    with cap(execute=True):
        urgent = engine.workflow_run_start(workflow=workflow, payload={}, priority=9)[0]
    assert runs_sent(sent) == [str(first.trace_id)]
    finish_task(first, TaskRun.objects.get(run=first), cap)
    assert runs_sent(sent)[1:] == [str(urgent.trace_id)]
    finish_task(urgent, TaskRun.objects.get(run=urgent), cap)
    assert runs_sent(sent)[2:] == [str(waiting[0].trace_id)]  # then the oldest of the rest
    assert WorkflowRun.objects.get(pk=urgent.pk).priority == 9


def test_runs_under_way_finish_before_new_ones_begin(sent, django_capture_on_commit_callbacks):
    """a -> b on one type of concurrency 1: the older run's b goes before the newer run's a, although
    the newer a became ready first."""
    cap = django_capture_on_commit_callbacks
    workflow = factories.workflow(factories.spec("chain", [("a", ECHO), ("b", ECHO)], [["a", "b"]], event_type="q"))
    settings_of(concurrency=1)
    old = start(workflow, capture=cap)
    new = start(workflow, capture=cap)
    finish_task(old, TaskRun.objects.get(run=old, node_key="a"), cap)
    assert [(e["trace_id"], e["context"]["node"]) for e in sent.events()] == [
        (str(old.trace_id), "a"),
        (str(old.trace_id), "b"),
    ]
    assert TaskRun.objects.get(run=new, node_key="a").status == "QUEUED"


def test_a_fairness_key_serves_keys_in_turn_each_up_to_its_share(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    workflow = one()
    settings_of(concurrency=3, fairness_key="payload.shop", per_key_concurrency=2)
    big = [start(workflow, {"shop": "A"}, capture=cap) for _ in range(12)]
    small = [start(workflow, {"shop": "B"}, capture=cap) for _ in range(2)]
    assert [e["payload"]["shop"] for e in sent.events()] == ["A", "A", "B"]
    assert TaskRun.objects.get(run=big[0]).fair_key == "A"
    # A's share is full: a slot A gives back goes to B's second task, not to A's third.
    finish_task(big[0], TaskRun.objects.get(run=big[0]), cap)
    assert [e["payload"]["shop"] for e in sent.events()][3:] == ["A"]
    finish_task(small[0], TaskRun.objects.get(run=small[0]), cap)
    assert [e["payload"]["shop"] for e in sent.events()][4:] == ["B"]
    keys = dict(EventTypeKey.objects.filter(event_type="q").values_list("key", "held"))
    assert keys == {"A": 2, "B": 1}
    assert held() == 3


def test_a_payload_without_the_key_shares_the_empty_key(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    settings_of(concurrency=5, fairness_key="payload.shop")
    run = start(one(), {"other": 1}, capture=cap)
    assert TaskRun.objects.get(run=run).fair_key == ""
    assert len(sent.events()) == 1


def test_a_lowered_share_stops_nothing_running_and_a_raised_one_admits_at_once(
    sent, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    workflow = one()
    settings_of(concurrency=10, fairness_key="payload.shop", per_key_concurrency=3)
    runs = [start(workflow, {"shop": "A"}, capture=cap) for _ in range(6)]
    assert len(sent.events()) == 3
    with cap(execute=True):
        settings_of(per_key_concurrency=1)
    running = TaskRun.objects.filter(run__in=runs, holds_slot=True)
    assert running.count() == 3 and len(sent.events()) == 3
    finish_task(runs[0], TaskRun.objects.get(run=runs[0]), cap)
    assert len(sent.events()) == 3  # 2 still run, over the share of 1: none goes
    with cap(execute=True):
        settings_of(per_key_concurrency=5)
    assert len(sent.events()) == 6  # 2 running + 3 at once = 5
    assert TaskRun.objects.filter(run__in=runs, holds_slot=True).count() == 5


def test_a_rate_limit_hands_out_no_more_than_n_per_window_and_asks_to_be_woken(
    sent, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    workflow = one()
    settings_of(concurrency=10, rate_limit="2/second")
    runs = [start(workflow, capture=cap) for _ in range(5)]
    assert len(sent.events()) == 2
    dispatched = list(TaskRun.objects.filter(run__in=runs, holds_slot=True).values_list("dispatched_at", flat=True))
    assert len(dispatched) == 2 and all(dispatched)
    event_type = EventType.objects.get(name="q")
    assert sum(event_type.rate_counts) == 2
    # The line the window holds back asked to be admitted from again when the window has room.
    assert event_type.rate_wake_at is not None and event_type.rate_wake_at >= min(dispatched) + timedelta(seconds=1)
    # A second later (the window's record moved back a second), admission takes two more.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE events_app_eventtype"
            " SET rate_times = ARRAY(SELECT t - interval '1 second' FROM unnest(rate_times) t) WHERE name = 'q'"
        )
    with cap(execute=True):
        engine.event_type_admit(name="q")
    assert len(sent.events()) == 4
    # Raised live, it admits at once.
    with cap(execute=True):
        settings_of(rate_limit="10/second")
    assert len(sent.events()) == 5


def test_a_retry_waits_for_room_in_the_rate_window(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    workflow = one(max_retries=1, retry_delay=0.01)
    settings_of(concurrency=5, rate_limit="1/minute")
    run = start(workflow, capture=cap)
    task = TaskRun.objects.get(run=run)
    first = task.dispatched_at
    finish_task(run, task, cap, ok=False)
    task.refresh_from_db()
    assert task.status == "RETRY"
    # Its backoff ends in 10 ms, but the window of a minute holds its first attempt until then.
    assert task.due_at >= first + timedelta(minutes=1) and task.dispatched_at == task.due_at
    assert sum(EventType.objects.get(name="q").rate_counts) == 2


def test_mapped_instances_obey_the_rate_and_the_keys_shares(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    workflow = factories.workflow(factories.fan_spec("fanq"))
    EventType.objects.filter(name="q_default").update(concurrency=20)
    run = start(workflow, {"shop": "S"}, capture=cap)
    engine.event_type_update(name="q_default", rate_limit="3/second", fairness_key="payload.shop")
    finish_task(run, TaskRun.objects.get(run=run, node_key="list"), cap, result={"images": list(range(8))})
    instances = TaskRun.objects.filter(run=run, node_key="upload", map_index__isnull=False)
    assert instances.count() == 8
    # The list's own dispatch counted before the rate was set: three of the instances went.
    assert instances.filter(holds_slot=True).count() == 3
    assert set(instances.values_list("fair_key", flat=True)) == {""}  # the run started before the key was set


def test_a_task_queued_past_its_timeout_fails_and_its_run_follows_the_trigger_rules(
    sent, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    workflow = factories.workflow(factories.spec("two", [("a", ECHO), ("b", ECHO)], [["a", "b"]], event_type="q"))
    settings_of(concurrency=1, queue_timeout=30)
    first = start(workflow, capture=cap)
    late = start(workflow, capture=cap)
    TaskRun.objects.filter(run=late, node_key="a").update(queued_at=first.created_at - timedelta(seconds=31))
    with cap(execute=True):
        engine.task_runs_reconcile()
    a = TaskRun.objects.get(run=late, node_key="a")
    assert (a.status, a.error, a.attempts) == ("FAILURE", "waited 30 s for a slot of q", 0)
    assert TaskRun.objects.get(run=late, node_key="b").status == "UPSTREAM_FAILED"
    assert WorkflowRun.objects.get(pk=late.pk).status == "FAILED"
    assert held() == 1 and TaskRun.objects.get(run=first, node_key="a").holds_slot  # no slot leaked or taken
    finish_task(first, TaskRun.objects.get(run=first, node_key="a"), cap)
    assert held() == 1  # its b took the slot a gave back


def test_the_api_shows_each_limit_and_why_each_waiting_task_waits(api, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    workflow = one()
    settings_of(concurrency=2, fairness_key="payload.shop", per_key_concurrency=2, rate_limit="100/minute")
    for shop in "AAAB":
        start(workflow, {"shop": shop}, capture=cap)
    body = api.get("/api/event-types/q/").json()
    assert body["rate_limit"] == "100/minute" and body["per_key_concurrency"] == 2
    assert body["fairness_key"] == "payload.shop" and body["queue_timeout"] is None
    assert body["rate_window"] == {"used": 2, "limit": 100, "next_slot_at": None}
    assert [(t["key"], t["place"], t["reason"]) for t in body["next"]] == [("B", 1, "concurrency")]
    assert body["next"][0]["why"] == "concurrency full: 2 of 2 running"
    listed = {t["name"]: t for t in api.get("/api/event-types/").json()["results"]}
    assert listed["q"]["next"] == body["next"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rate_limit", "5/fortnight"),
        ("rate_limit", "-1/second"),
        ("rate_limit", 5),
        ("fairness_key", "payload.("),
        ("fairness_key", "upstream.a"),
        ("per_key_concurrency", 0),
        ("per_key_concurrency", "2"),
        ("queue_timeout", -5),
        ("concurrency", 0),
    ],
)
def test_a_bad_setting_is_a_400_naming_the_field_and_changes_nothing(api, field, value):
    EventType.objects.create(name="q", concurrency=3, rate_limit="2/second")
    body = {"concurrency": 4, field: value} if field != "concurrency" else {field: value}
    response = api.patch("/api/event-types/q/", body, format="json")
    error = assert_json_error(response, 400)
    assert field in error["errors"] and error["detail"].startswith(field)
    after = EventType.objects.get(name="q")
    assert (after.concurrency, after.rate_limit, after.fairness_key) == (3, "2/second", None)


@pytest.mark.parametrize("priority", [10, -1, "high", 5.5, True])
def test_a_bad_priority_is_a_400_naming_it_and_starts_nothing(api, priority):
    one()
    response = api.post("/api/workflows/one/runs/", {"payload": {}, "priority": priority}, format="json")
    assert "priority" in assert_json_error(response, 400)["errors"]
    assert not WorkflowRun.objects.exists()


def test_the_api_starts_a_run_with_a_priority_and_shows_when_each_task_was_dispatched(api):
    one()
    created = api.post("/api/workflows/one/runs/", {"payload": {}, "priority": 7}, format="json")
    assert created.status_code == 201 and created.json()["priority"] == 7
    detail = api.get(created.json()["url"]).json()
    assert detail["tasks"][0]["dispatched_at"] is not None


def test_an_import_with_a_bad_setting_names_it_and_writes_nothing(api):
    spec = factories.spec("imp", event_type="q")
    spec["event_types"] = {"q": {"concurrency": 2, "rate_limit": "5/fortnight", "queue_timeout": -1}}
    error = assert_json_error(api.post("/api/workflows/", spec, format="json"), 400)
    assert "rate_limit" in error["detail"] and any("queue_timeout" in e for e in error["errors"])
    assert not EventType.objects.filter(name="q").exists() and not WorkflowDefinition.objects.exists()
    spec["event_types"] = {"q": {"concurrency": 2, "rate_limit": "5/second", "fairness_key": "payload.shop"}}
    assert api.post("/api/workflows/", spec, format="json").status_code == 201
    stored = EventType.objects.get(name="q")
    assert (stored.rate_limit, stored.fairness_key) == ("5/second", "payload.shop")
    exported = api.get("/api/workflows/imp/").json()["event_types"]["q"]
    assert exported == {"concurrency": 2, "rate_limit": "5/second", "fairness_key": "payload.shop"}


def test_the_admin_refuses_a_bad_setting_on_its_field_and_changes_nothing(admin_client):
    from tests.test_admin import ChangeForm, url

    EventType.objects.create(name="q", concurrency=3)
    change = url("events_app_eventtype_change", "q")
    page = ChangeForm(admin_client.get(change))
    page.data["rate_limit"] = "5/fortnight"
    page.data["fairness_key"] = "payload.("
    response = admin_client.post(change, page.data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "rate_limit" in errors and "fairness_key" in errors
    assert EventType.objects.get(name="q").rate_limit is None
    page.data["rate_limit"] = "5/second"
    page.data["fairness_key"] = "payload.shop"
    assert admin_client.post(change, page.data).status_code == 302
    assert EventType.objects.get(name="q").rate_limit == "5/second"


def test_the_queues_page_and_a_waiting_nodes_detail_say_why_it_waits(client, user, django_capture_on_commit_callbacks):
    from django.urls import reverse

    cap = django_capture_on_commit_callbacks
    workflow = one()
    settings_of(concurrency=5, fairness_key="payload.shop", per_key_concurrency=1, rate_limit="2/minute")
    runs = [start(workflow, {"shop": shop}, capture=cap) for shop in ("A", "A", "B", "C")]
    client.force_login(user)
    page = client.get(reverse("workflows_app:queue-list")).content.decode()
    assert 'data-rate-limit="2/minute"' in page and "payload.shop" in page
    # A and B took the window's two dispatches; A's second waits on its key's share, C on the window.
    assert 'data-reason="rate_window"' in page and "the next slot opens at" in page
    detail = client.get(reverse("workflows_app:run-node", args=[runs[1].trace_id, "a"])).content.decode()
    assert 'data-wait-reason="key_share"' in detail and "its key &#x27;A&#x27; already runs 1 of its 1" in detail
    waiting_c = client.get(reverse("workflows_app:run-node", args=[runs[3].trace_id, "a"])).content.decode()
    assert 'data-wait-reason="rate_window"' in waiting_c
