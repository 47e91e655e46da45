"""Engine transitions driven directly on PostgreSQL (each test states its graph), the messages they send
read back from the real broker."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.db.models.functions import Now

import tests.kinds  # noqa: F401 - registers the `noop` kind
from events_app.models import Event, EventType
from tests import factories
from tests.workers import purge_broker
from workflows_app import engine
from workflows_app.engine import graph, outbox
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"


class Sent:
    """The task messages on the broker's queues, in the order each queue got them: read back from the
    broker the engine published to, as a worker would receive them."""

    def __init__(self) -> None:
        self.messages: list[tuple[dict, dict]] = []  # (the Event a task receives, the message headers)

    def _drain(self) -> None:
        from config.celery import app

        with app.connection_for_read() as conn:
            channel = conn.default_channel
            for queue in EventType.objects.order_by("name").values_list("name", flat=True):
                while (message := channel.basic_get(queue=queue, no_ack=True)) is not None:
                    args, _kwargs, _embed = message.decode()
                    self.messages.append((args[0], message.headers))

    def __iter__(self):
        self._drain()
        return iter(
            [(event["context"]["node"], event["context"]["attempt"], headers) for event, headers in self.messages]
        )

    def nodes(self) -> list[str]:
        return [node for node, _, _ in self]

    def events(self) -> list[dict]:
        self._drain()
        return [event for event, _ in self.messages]


@pytest.fixture
def sent() -> Sent:
    purge_broker()
    return Sent()


def start(workflow, payload=None, capture=None) -> WorkflowRun:
    with capture(execute=True):
        return engine.workflow_run_start(workflow=workflow, payload=payload or {})[0]


def run_task(run: WorkflowRun, key: str, capture, *, ok: bool = True, result=None, with_event: bool = True) -> None:
    """Play what a worker does for a node's task: start it, then report its outcome with the Event it
    received (or, `with_event=False`, as a task on another base class is reported: by its ids alone)."""
    finish_task(
        run,
        TaskRun.objects.get(run=run, node_key=key, map_index=None),
        capture,
        ok=ok,
        result=result,
        with_event=with_event,
    )


def finish_task(run: WorkflowRun, task: TaskRun, capture, *, ok: bool = True, result=None, with_event: bool = True):
    """`run_task` for one task row: a node's, or one instance of a mapped node."""
    event = task.current_event
    started = engine.task_run_start(event_id=str(event.event_id), attempt=event.context["attempt"])
    assert started
    with capture(execute=True):
        engine.task_run_finish(
            trace_id=str(run.trace_id),
            event_id=str(event.event_id),
            succeeded=ok,
            result=result,
            error="boom",
            event=event.as_message() if with_event else None,
            run_payload=started.run_payload if with_event else None,
        )


def statuses(run: WorkflowRun) -> dict[str, str]:
    return dict(TaskRun.objects.filter(run=run).values_list("node_key", "status"))


def db_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


def transaction_now() -> datetime:
    """The database's `now()`: the start of the test's transaction, where every transition runs."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def test_diamond_dispatches_join_once_even_when_completions_repeat(sent, django_capture_on_commit_callbacks):
    # a -> b, a -> c, b -> d, c -> d
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(
        factories.spec("diamond", [(k, ECHO) for k in "abcd"], [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]])
    )
    EventType.objects.filter(name="q_default").update(concurrency=10)
    run = start(wf, capture=cap)
    run_task(run, "a", cap, result={"n": 1})
    event_a = TaskRun.objects.get(run=run, node_key="a").current_event_id
    with cap(execute=True):  # the same completion delivered again
        engine.task_run_finish(trace_id=str(run.trace_id), event_id=str(event_a), succeeded=True, result={"n": 1})
    run_task(run, "b", cap)
    assert statuses(run)["d"] == "WAITING"
    run_task(run, "c", cap)
    with cap(execute=True):  # and a stale duplicate of c after d became ready
        event_c = TaskRun.objects.get(run=run, node_key="c").current_event_id
        engine.task_run_finish(trace_id=str(run.trace_id), event_id=str(event_c), succeeded=True)
    assert sent.nodes() == ["a", "b", "c", "d"]
    d_event = TaskRun.objects.get(run=run, node_key="d").current_event
    assert set(d_event.context["upstream"]) == {"b", "c"}
    run_task(run, "d", cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS" and run.finished_at is not None
    assert Event.objects.filter(trace_id=run.trace_id).count() == 4


def test_every_message_sent_is_the_stored_event(sent, django_capture_on_commit_callbacks):
    """What reaches the broker is each attempt's Event as stored: every field, the database's timestamp."""
    cap = django_capture_on_commit_callbacks
    nodes = [("a", ECHO), {"key": "b", "task": ECHO, "params": {"size": "L"}, "timeout": 30}]
    wf = factories.workflow(factories.spec("stored", nodes, [["a", "b"]]))
    run = start(wf, payload={"size": "S", "keep": [1, {"x": None}]}, capture=cap)
    run_task(run, "a", cap, result={"nested": {"list": [1, 2]}})
    messages = sent.events()
    stored = {e.event_id: e.as_message() for e in Event.objects.filter(trace_id=run.trace_id)}
    assert [m["context"]["node"] for m in messages] == ["a", "b"]
    for message in messages:  # as it was sent: a's Event has since taken its outcome
        assert message == {**stored[uuid.UUID(message["event_id"])], "status": "PENDING", "result": {}}
    assert messages[1]["payload"] == {"size": "L", "keep": [1, {"x": None}]}
    assert messages[1]["context"]["upstream"] == {"a": {"nested": {"list": [1, 2]}}}
    _, _, headers = list(sent)[1]
    assert headers["timelimit"] == [30 + outbox.HARD_LIMIT_GRACE, 30] and headers["id"] == messages[1]["event_id"]


def test_finished_task_refuses_to_start_again(sent, django_capture_on_commit_callbacks):
    wf = factories.workflow(factories.spec("one", [("a", ECHO)]))
    run = start(wf, capture=django_capture_on_commit_callbacks)
    run_task(run, "a", django_capture_on_commit_callbacks)
    event_id = str(TaskRun.objects.get(run=run).current_event_id)
    assert not engine.task_run_start(event_id=event_id)


def test_a_duplicate_delivery_does_not_start_while_the_first_holders_lease_is_alive(
    sent, django_capture_on_commit_callbacks
):
    wf = factories.workflow(factories.spec("dup", [("a", ECHO)]))
    run = start(wf, capture=django_capture_on_commit_callbacks)
    event_id = str(TaskRun.objects.get(run=run).current_event_id)
    assert engine.task_run_start(event_id=event_id, worker="first")
    assert not engine.task_run_start(event_id=event_id, worker="second")
    TaskRun.objects.filter(run=run).update(lease_expires_at=Now() - timedelta(hours=1))
    assert engine.task_run_start(event_id=event_id, worker="second")  # the first holder is gone
    assert TaskRun.objects.get(run=run).worker == "second"


def test_admission_respects_concurrency_and_fifo(sent, django_capture_on_commit_callbacks):
    # five independent roots on one event type with concurrency 2
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("fan", [(f"n{i}", ECHO) for i in range(5)], event_type="narrow"))
    EventType.objects.filter(name="narrow").update(concurrency=2)
    run = start(wf, capture=cap)
    assert sent.nodes() == ["n0", "n1"]
    assert TaskRun.objects.filter(holds_slot=True).count() == 2
    run_task(run, "n1", cap)
    assert sent.nodes() == ["n0", "n1", "n2"]
    with cap(execute=True):
        engine.event_type_set_concurrency(name="narrow", concurrency=4)
    assert sent.nodes() == ["n0", "n1", "n2", "n3", "n4"]
    assert TaskRun.objects.filter(holds_slot=True).count() == 4


def test_failure_retries_on_the_databases_clock_then_fails_and_keeps_independent_branch(
    sent, django_capture_on_commit_callbacks
):
    # a -> b (fails, 1 retry) -> c ; a -> d
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(
        factories.spec(
            "retrying",
            [("a", ECHO), {"key": "b", "task": ECHO, "max_retries": 1, "retry_delay": 2}, ("c", ECHO), ("d", ECHO)],
            [["a", "b"], ["b", "c"], ["a", "d"]],
        )
    )
    EventType.objects.filter(name="q_default").update(concurrency=10)
    run = start(wf, capture=cap)
    run_task(run, "a", cap)
    run_task(run, "b", cap, ok=False)
    b = TaskRun.objects.get(run=run, node_key="b")
    assert b.status == "RETRY" and b.due_at is not None
    node, attempt, headers = list(sent)[-1]
    assert (node, attempt) == ("b", 2)
    # Due 2 s after the failure on the database's clock, whatever this host's clock says.
    assert datetime.fromisoformat(headers["eta"]) == b.due_at
    assert b.due_at == transaction_now() + timedelta(seconds=2)
    # A worker whose clock runs ahead takes the message early: it is told how long to wait.
    early = engine.task_run_start(event_id=str(b.current_event_id), attempt=2)
    assert not early and 0 < early.wait <= 2
    TaskRun.objects.filter(pk=b.pk).update(due_at=Now() - timedelta(hours=1))
    run_task(run, "b", cap, ok=False)
    run_task(run, "d", cap)
    assert statuses(run) == {"a": "SUCCESS", "b": "FAILURE", "c": "UPSTREAM_FAILED", "d": "SUCCESS"}
    run.refresh_from_db()
    assert run.status == "FAILED"
    assert not TaskRun.objects.filter(holds_slot=True).exists()


def test_retry_from_failure_keeps_successes(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("rerun", [(k, ECHO) for k in "abc"], [["a", "b"], ["b", "c"]]))
    run = start(wf, capture=cap)
    run_task(run, "a", cap, result={"kept": True})
    run_task(run, "b", cap, ok=False)
    assert statuses(run) == {"a": "SUCCESS", "b": "FAILURE", "c": "UPSTREAM_FAILED"}
    with cap(execute=True):
        engine.workflow_run_retry(trace_id=str(run.trace_id))
    assert statuses(run) == {"a": "SUCCESS", "b": "QUEUED", "c": "WAITING"}
    assert TaskRun.objects.get(run=run, node_key="b").current_event.context["upstream"] == {"a": {"kept": True}}
    run_task(run, "b", cap)
    run_task(run, "c", cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS"
    assert TaskRun.objects.get(run=run, node_key="a").result == {"kept": True}
    assert sent.nodes().count("a") == 1


def test_a_running_run_cannot_be_retried(sent, django_capture_on_commit_callbacks):
    wf = factories.workflow(factories.spec("busy", [("a", ECHO)]))
    run = start(wf, capture=django_capture_on_commit_callbacks)
    with pytest.raises(engine.EngineError) as refused:
        engine.workflow_run_retry(trace_id=str(run.trace_id))
    assert refused.value.status == 409 and statuses(run) == {"a": "QUEUED"}


def test_cancel_then_late_start_is_refused(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("stop", [(k, ECHO) for k in "ab"], [["a", "b"]]))
    run = start(wf, capture=cap)
    event_id = str(TaskRun.objects.get(run=run, node_key="a").current_event_id)
    with cap(execute=True):
        engine.workflow_run_cancel(trace_id=str(run.trace_id))
    assert not engine.task_run_start(event_id=event_id)
    assert set(statuses(run).values()) == {"REVOKED"}
    assert Event.objects.get(event_id=event_id).status == "REVOKED"
    assert WorkflowRun.objects.get(pk=run.pk).status == "CANCELED"


def test_unserialisable_result_fails_the_task(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("weird", [("a", ECHO)]))
    run = start(wf, capture=cap)
    run_task(run, "a", cap, result={"when": object()})
    task = TaskRun.objects.get(run=run)
    assert task.status == "FAILURE" and "JSON" in task.error


def test_reconciler_takes_celerys_stored_outcome_of_a_lapsed_attempt(sent, django_capture_on_commit_callbacks):
    """A worker that died after Celery stored the outcome (a hard time limit is stored by the main
    process) but before the engine recorded it: the stored outcome is taken, the task not rerun."""
    from django_celery_results.models import TaskResult

    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("lapsed", [("a", ECHO), ("b", ECHO)], [["a", "b"]]))
    run = start(wf, capture=cap)
    event_id = str(TaskRun.objects.get(run=run, node_key="a").current_event_id)
    assert engine.task_run_start(event_id=event_id, attempt=1, worker="gone")
    TaskResult.objects.create(task_id=event_id, status="SUCCESS", result='{"n": 7}')
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 0  # its lease is alive on the database's clock
    TaskRun.objects.filter(run=run, node_key="a").update(lease_expires_at=Now() - timedelta(hours=1))
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 1
    a = TaskRun.objects.get(run=run, node_key="a")
    assert (a.status, a.attempts, a.result, a.holds_slot) == ("SUCCESS", 1, {"n": 7}, False)
    assert Event.objects.get(event_id=event_id).result == {"n": 7}
    assert sent.nodes() == ["a", "b"]


def test_a_lost_attempt_without_a_stored_outcome_is_retried_by_its_policy(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("lost", [{"key": "a", "task": ECHO, "max_retries": 1, "retry_delay": 0}]))
    run = start(wf, capture=cap)
    event_id = str(TaskRun.objects.get(run=run).current_event_id)
    assert engine.task_run_start(event_id=event_id, worker="w-gone")
    TaskRun.objects.filter(run=run).update(lease_expires_at=Now() - timedelta(hours=1))
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 1
    a = TaskRun.objects.get(run=run)
    assert a.status == "RETRY" and "worker lost: w-gone" in a.error and a.holds_slot
    assert [(n, attempt) for n, attempt, _ in sent] == [("a", 1), ("a", 2)]


def test_a_sent_task_that_never_started_is_sent_again_with_the_same_event(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("lost-message", [("a", ECHO)]))
    run = start(wf, capture=cap)
    TaskRun.objects.filter(run=run).update(lease_expires_at=Now() - timedelta(hours=1))
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 1
    first, again = sent.events()
    assert first == again and TaskRun.objects.get(run=run).lease_expires_at > db_now()


def held(name: str) -> tuple[int, int]:
    """(the type's count of held slots, the task rows holding one)."""
    counted = EventType.objects.get(name=name).held
    return counted, TaskRun.objects.filter(event_type_id=name, holds_slot=True).count()


def test_the_count_of_held_slots_follows_every_transition(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(
        factories.spec("counted", [(f"n{i}", ECHO) for i in range(3)] + [("z", ECHO)], [["n0", "z"]], event_type="c")
    )
    EventType.objects.filter(name="c").update(concurrency=2)
    run = start(wf, capture=cap)
    assert held("c") == (2, 2)  # two of the three roots admitted
    run_task(run, "n0", cap)  # gives its slot to n2; z waits behind it
    assert held("c") == (2, 2) and sent.nodes() == ["n0", "n1", "n2"]
    run_task(run, "n1", cap)  # gives its slot to z
    assert held("c") == (2, 2) and sent.nodes()[-1] == "z"
    second = start(wf, capture=cap)  # nothing free: all four wait
    assert held("c") == (2, 2) and TaskRun.objects.filter(run=second, status="QUEUED", holds_slot=False).count() == 3
    with cap(execute=True):  # the first run's two slots go to the second run's first two roots
        engine.workflow_run_cancel(trace_id=str(run.trace_id))
    assert held("c") == (2, 2) and TaskRun.objects.filter(run=second, holds_slot=True).count() == 2
    with cap(execute=True):
        engine.workflow_run_cancel(trace_id=str(second.trace_id))
    assert held("c") == (0, 0)


def test_the_reconciler_recounts_held_slots_and_admits_what_they_held_back(sent, django_capture_on_commit_callbacks):
    """Slots counted for rows that are gone (deleted outside the engine) are recounted from the rows."""
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("drift", [("a", ECHO)], event_type="d"))
    EventType.objects.filter(name="d").update(concurrency=1)
    EventType.objects.filter(name="d").update(held=1)  # a slot whose row was deleted
    run = start(wf, capture=cap)
    assert held("d") == (1, 0) and sent.nodes() == []  # admission reads the count, not the rows
    with cap(execute=True):
        engine.task_runs_reconcile()
    assert held("d") == (1, 1) and sent.nodes() == ["a"]
    assert TaskRun.objects.get(run=run).holds_slot


def test_a_count_of_held_slots_drifted_low_does_not_fail_a_finish(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("low", [("a", ECHO)], event_type="low"))
    run = start(wf, capture=cap)
    EventType.objects.filter(name="low").update(held=0)  # a slot taken outside the engine's count
    run_task(run, "a", cap)  # gives back a slot the count does not hold: the count stays at zero
    assert TaskRun.objects.get(run=run).status == "SUCCESS" and held("low") == (0, 0)


def test_the_arguments_shown_in_a_message_are_cut_at_celerys_limit():
    short = {"event_id": "e", "payload": {"deep": {"er": {"still": [1]}}}}
    assert outbox.args_repr(short, 1024) == repr([short])
    long = {"event_id": "e", "payload": {"text": "x" * 5000}}
    shown = outbox.args_repr(long, 1024)
    assert len(shown) == 1024 and shown.endswith("...") and shown.startswith("[{'event_id': 'e'")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The runs a finish had to read before deciding (the worker's Event and the run's payload were not
    enough: a join, or an outcome reported without its Event)."""
    from workflows_app.engine import transitions

    read: list[str] = []
    original = transitions._read

    def spy(trace_id, event_id, nodes, mapped=None):
        read.append(sorted(nodes))
        return original(trace_id, event_id, nodes, mapped)

    monkeypatch.setattr(transitions, "_read", spy)
    graph.version_id_named.cache_clear()  # versions of other tests' workflows, rolled back since
    return read


def recorded(run: WorkflowRun) -> dict[str, tuple]:
    """Per node: the task's status and result, and its Event's status, payload, result and context."""
    events = {e.event_id: e for e in Event.objects.filter(trace_id=run.trace_id)}
    shown = {}
    for task in TaskRun.objects.filter(run=run):
        event = events.get(task.current_event_id)
        stored = event and (event.status, event.payload, event.result, event.context, event.task_name)
        shown[task.node_key] = (task.status, task.result, task.holds_slot, stored)
    return shown


def test_successes_decided_from_the_workers_event_record_what_reading_the_run_records(
    sent, reads, django_capture_on_commit_callbacks
):
    # a -> b -> c, a -> d (a fan-out, a chain, two leaves); d's params override the run's payload
    cap = django_capture_on_commit_callbacks
    nodes = [("a", ECHO), ("b", ECHO), ("c", ECHO), {"key": "d", "task": ECHO, "params": {"size": "L", "n": 2}}]
    wf = factories.workflow(factories.spec("fan", nodes, [["a", "b"], ["b", "c"], ["a", "d"]]))
    EventType.objects.filter(name="q_default").update(concurrency=10)
    runs = []
    for with_event in (True, False):
        run = start(wf, payload={"size": "S", "keep": [1, {"x": None}]}, capture=cap)
        for key in "abdc":
            run_task(run, key, cap, result={"node": key, "nested": {"list": [1, 2]}}, with_event=with_event)
        run.refresh_from_db()
        runs.append(run)
    assert reads == [[]] * 4  # only the four finishes reported without their Event read the run
    decided, read = (recorded(r) for r in runs)
    assert decided == read
    assert decided["d"][3][1] == {"size": "L", "n": 2, "keep": [1, {"x": None}]}
    assert decided["b"][3][3]["upstream"] == {"a": {"node": "a", "nested": {"list": [1, 2]}}}
    assert [(r.status, r.finished_at is not None) for r in runs] == [("SUCCESS", True)] * 2
    assert sent.nodes() == list("abdc") * 2
    assert held("q_default") == (0, 0)


def test_a_success_asks_its_successors_trigger_rules(sent, reads, django_capture_on_commit_callbacks):
    """A successor waiting on the node alone is still settled by its rule: `one_failed` is skipped by
    a success, and the skip reaches what follows it (all_done runs, all_success is skipped)."""
    cap = django_capture_on_commit_callbacks
    nodes = [
        ("a", ECHO),
        {"key": "alert", "task": ECHO, "trigger_rule": "one_failed"},
        ("page", ECHO),
        {"key": "cleanup", "task": ECHO, "trigger_rule": "all_done"},
    ]
    wf = factories.workflow(factories.spec("rules", nodes, [["a", "alert"], ["alert", "page"], ["alert", "cleanup"]]))
    run = start(wf, capture=cap)
    run_task(run, "a", cap)
    assert reads == []  # decided from the worker's Event alone
    assert statuses(run) == {"a": "SUCCESS", "alert": "SKIPPED", "page": "SKIPPED", "cleanup": "QUEUED"}
    run_task(run, "cleanup", cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS" and sent.nodes() == ["a", "cleanup"]


def test_a_kind_registered_by_one_module_runs_without_a_worker(sent, reads, django_capture_on_commit_callbacks):
    """`noop` (tests/kinds.py) succeeds the moment it may run: no message, no slot, and its successors
    are settled in the same transition."""
    cap = django_capture_on_commit_callbacks
    nodes = [{"key": "gate", "kind": "noop"}, ("a", ECHO), {"key": "join", "kind": "noop"}, ("b", ECHO)]
    wf = factories.workflow(factories.spec("kinds", nodes, [["gate", "a"], ["a", "join"], ["join", "b"]]))
    run = start(wf, capture=cap)
    assert statuses(run) == {"gate": "SUCCESS", "a": "QUEUED", "join": "WAITING", "b": "WAITING"}
    run_task(run, "a", cap, result=5)
    assert statuses(run) == {"gate": "SUCCESS", "a": "SUCCESS", "join": "SUCCESS", "b": "QUEUED"}
    b_event = TaskRun.objects.get(run=run, node_key="b").current_event
    assert b_event.context["upstream"] == {"join": {"upstream": ["a"]}}
    run_task(run, "b", cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS" and sent.nodes() == ["a", "b"] and held("q_default") == (0, 0)
    only_noops = factories.workflow(factories.spec("instant", [{"key": "x", "kind": "noop"}]))
    assert start(only_noops, capture=cap).status == "SUCCESS"


def test_a_repeated_success_sent_with_its_event_dispatches_nothing_again(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("again", [(k, ECHO) for k in "ab"], [["a", "b"]]))
    run = start(wf, capture=cap)
    run_task(run, "a", cap, result=1)
    a = TaskRun.objects.get(run=run, node_key="a")
    with cap(execute=True):
        assert (
            engine.task_run_finish(
                trace_id=str(run.trace_id),
                event_id=str(a.current_event_id),
                succeeded=True,
                result=2,
                celery_result={"task_id": str(a.current_event_id), "status": "SUCCESS"},
                event=a.current_event.as_message(),
                run_payload={},
            )
            is False
        )
    assert sent.nodes() == ["a", "b"]
    assert TaskRun.objects.get(run=run, node_key="a").result == 1
    assert held("q_default") == (1, 1)  # b's


def test_joins_read_their_other_predecessors_and_an_event_naming_no_graph_reads_the_run(
    sent, reads, django_capture_on_commit_callbacks
):
    # a -> b, a -> c, b -> d, c -> d: b's and c's successes decide a join
    cap = django_capture_on_commit_callbacks
    edges = [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]]
    wf = factories.workflow(factories.spec("join", [(k, ECHO) for k in "abcd"], edges))
    EventType.objects.filter(name="q_default").update(concurrency=10)
    run = start(wf, capture=cap)
    run_task(run, "a", cap)
    b = TaskRun.objects.get(run=run, node_key="b").current_event
    message = b.as_message()
    message["context"] = {**message["context"], "workflow_version": 7}  # no such version
    assert engine.task_run_start(event_id=str(b.event_id))
    with cap(execute=True):
        engine.task_run_finish(
            trace_id=str(run.trace_id), event_id=str(b.event_id), succeeded=True, event=message, run_payload={}
        )
    run_task(run, "c", cap)
    run_task(run, "d", cap)
    assert reads == [[], ["c"], ["b"]]  # b: the run, then c; c: b
    run.refresh_from_db()
    assert run.status == "SUCCESS" and set(statuses(run).values()) == {"SUCCESS"}
    assert sent.nodes() == list("abcd") and held("q_default") == (0, 0)


def test_an_event_naming_another_version_of_the_runs_workflow_writes_nothing_then_reads_the_run(
    sent, reads, django_capture_on_commit_callbacks
):
    # version 1: a -> b; version 2 (the run's): a -> c. A message claiming version 1 would queue b.
    cap = django_capture_on_commit_callbacks
    factories.workflow(factories.spec("moved", [(k, ECHO) for k in "ab"], [["a", "b"]]))
    wf = factories.workflow(factories.spec("moved", [(k, ECHO) for k in "ac"], [["a", "c"]]))
    run = start(wf, capture=cap)
    a = TaskRun.objects.get(run=run, node_key="a").current_event
    message = a.as_message()
    assert message["context"]["workflow_version"] == 2
    message["context"] = {**message["context"], "workflow_version": 1}
    assert engine.task_run_start(event_id=str(a.event_id))
    with cap(execute=True):
        engine.task_run_finish(
            trace_id=str(run.trace_id), event_id=str(a.event_id), succeeded=True, event=message, run_payload={}
        )
    assert reads == [[]]  # the database saw the version differ and wrote nothing; the run was read
    assert statuses(run) == {"a": "SUCCESS", "c": "QUEUED"}
    assert sent.nodes() == ["a", "c"] and held("q_default") == (1, 1)


def test_a_run_ends_when_its_last_success_finds_a_successor_already_ended(
    sent, reads, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("ended", [(k, ECHO) for k in "ab"], [["a", "b"]]))
    run = start(wf, capture=cap)
    TaskRun.objects.filter(run=run, node_key="b").update(status="SKIPPED")  # changed outside the engine
    run_task(run, "a", cap)
    assert reads == [["b"]]  # the database found b no longer WAITING: the run was read again
    run.refresh_from_db()
    assert run.status == "SUCCESS" and run.finished_at is not None
    assert sent.nodes() == ["a"] and held("q_default") == (0, 0)


def test_every_time_a_transition_stores_is_the_databases(sent, django_capture_on_commit_callbacks):
    """Within one transaction the database's `now()` stays put: every time written is that one, not a
    host's, so comparing them across hosts means something."""
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("clocked", [("a", ECHO), ("b", ECHO)], [["a", "b"]]))
    run = start(wf, capture=cap)
    run_task(run, "a", cap)
    now = transaction_now()
    a, b = (TaskRun.objects.get(run=run, node_key=k) for k in "ab")
    run.refresh_from_db()
    assert run.created_at == a.queued_at == a.started_at == a.finished_at == b.queued_at == now
    assert {e.timestamp for e in Event.objects.filter(trace_id=run.trace_id)} == {now}
    assert b.lease_expires_at == now + timedelta(seconds=engine.transitions._config("DISPATCH_GRACE_SECONDS"))
