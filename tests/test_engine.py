"""Engine transitions on PostgreSQL, driven directly (each test states its graph); publishing is recorded."""

from __future__ import annotations

import pytest

from events_app.models import Event, EventType
from tests import factories
from workflows_app import engine
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"


@pytest.fixture
def sent(monkeypatch, django_capture_on_commit_callbacks):
    """Messages the engine publishes after commit, in order, as (node, attempt, options)."""
    published: list[tuple[str, int, dict]] = []

    def record(messages, revokes):
        published.extend((e["context"]["node"], e["context"]["attempt"], o) for e, o in messages)

    monkeypatch.setattr(engine, "_publish", record)
    return published


def start(workflow, payload=None, capture=None) -> WorkflowRun:
    with capture(execute=True):
        return engine.workflow_run_start(workflow=workflow, payload=payload or {})[0]


def run_task(run: WorkflowRun, key: str, capture, *, ok: bool = True, result=None, with_event: bool = True) -> None:
    """Play what a worker does for a task: start it, then report its outcome with the Event it received."""
    task = TaskRun.objects.get(run=run, node_key=key)
    event = task.current_event
    assert engine.task_run_start(event_id=str(event.event_id), attempt=event.context["attempt"])
    with capture(execute=True):
        engine.task_run_finish(
            trace_id=str(run.trace_id),
            event_id=str(event.event_id),
            succeeded=ok,
            result=result,
            error="boom",
            event=event.as_message() if with_event else None,
        )


def statuses(run: WorkflowRun) -> dict[str, str]:
    return dict(TaskRun.objects.filter(run=run).values_list("node_key", "status"))


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
    assert [node for node, _, _ in sent] == ["a", "b", "c", "d"]
    d_event = TaskRun.objects.get(run=run, node_key="d").current_event
    assert set(d_event.context["upstream"]) == {"b", "c"}
    run_task(run, "d", cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS" and run.finished_at is not None
    assert Event.objects.filter(trace_id=run.trace_id).count() == 4


def test_finished_task_refuses_to_start_again(sent, django_capture_on_commit_callbacks):
    wf = factories.workflow(factories.spec("one", [("a", ECHO)]))
    run = start(wf, capture=django_capture_on_commit_callbacks)
    run_task(run, "a", django_capture_on_commit_callbacks)
    event_id = str(TaskRun.objects.get(run=run).current_event_id)
    assert engine.task_run_start(event_id=event_id) is False


def test_admission_respects_concurrency_and_fifo(sent, django_capture_on_commit_callbacks):
    # five independent roots on one event type with concurrency 2
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("fan", [(f"n{i}", ECHO) for i in range(5)], event_type="narrow"))
    EventType.objects.filter(name="narrow").update(concurrency=2)
    run = start(wf, capture=cap)
    assert [n for n, _, _ in sent] == ["n0", "n1"]
    assert TaskRun.objects.filter(holds_slot=True).count() == 2
    run_task(run, "n1", cap)
    assert [n for n, _, _ in sent] == ["n0", "n1", "n2"]
    with cap(execute=True):
        engine.event_type_set_concurrency(name="narrow", concurrency=4)
    assert [n for n, _, _ in sent] == ["n0", "n1", "n2", "n3", "n4"]
    assert TaskRun.objects.filter(holds_slot=True).count() == 4


def test_failure_retries_then_fails_and_keeps_independent_branch(sent, django_capture_on_commit_callbacks):
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
    assert statuses(run)["b"] == "RETRY"
    assert sent[-1][:2] == ("b", 2) and sent[-1][2]["countdown"] == 2
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
    run_task(run, "b", cap)
    run_task(run, "c", cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS"
    assert TaskRun.objects.get(run=run, node_key="a").result == {"kept": True}
    assert [n for n, _, _ in sent].count("a") == 1


def test_cancel_then_late_start_is_refused(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("stop", [(k, ECHO) for k in "ab"], [["a", "b"]]))
    run = start(wf, capture=cap)
    event_id = str(TaskRun.objects.get(run=run, node_key="a").current_event_id)
    with cap(execute=True):
        engine.workflow_run_cancel(trace_id=str(run.trace_id))
    assert engine.task_run_start(event_id=event_id) is False
    assert set(statuses(run).values()) == {"REVOKED"}
    assert Event.objects.get(event_id=event_id).status == "REVOKED"


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
    from django.utils import timezone
    from django_celery_results.models import TaskResult

    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("lapsed", [("a", ECHO), ("b", ECHO)], [["a", "b"]]))
    run = start(wf, capture=cap)
    event_id = str(TaskRun.objects.get(run=run, node_key="a").current_event_id)
    assert engine.task_run_start(event_id=event_id, attempt=1, worker="gone")
    TaskResult.objects.create(task_id=event_id, status="SUCCESS", result='{"n": 7}')
    TaskRun.objects.filter(run=run, node_key="a").update(
        lease_expires_at=timezone.now() - timezone.timedelta(seconds=1)
    )
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 1
    a = TaskRun.objects.get(run=run, node_key="a")
    assert (a.status, a.attempts, a.result, a.holds_slot) == ("SUCCESS", 1, {"n": 7}, False)
    assert Event.objects.get(event_id=event_id).result == {"n": 7}
    assert [node for node, _, _ in sent] == ["a", "b"]


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
    assert held("c") == (2, 2) and [n for n, _, _ in sent] == ["n0", "n1", "n2"]
    run_task(run, "n1", cap)  # gives its slot to z
    assert held("c") == (2, 2) and [n for n, _, _ in sent][-1] == "z"
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
    assert held("d") == (1, 0) and sent == []  # admission reads the count, not the rows
    with cap(execute=True):
        engine.task_runs_reconcile()
    assert held("d") == (1, 1) and [n for n, _, _ in sent] == ["a"]
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
    assert engine._args_repr(short, 1024) == repr([short])
    long = {"event_id": "e", "payload": {"text": "x" * 5000}}
    shown = engine._args_repr(long, 1024)
    assert len(shown) == 1024 and shown.endswith("...") and shown.startswith("[{'event_id': 'e'")


@pytest.fixture
def one_trips(monkeypatch) -> list[bool | None]:
    """What each success recorded in one round trip answered (None: the general path recorded it)."""
    answers: list[bool | None] = []
    original = engine._finish_success_in_one_trip

    def spy(**kwargs):
        answers.append(original(**kwargs))
        return answers[-1]

    monkeypatch.setattr(engine, "_finish_success_in_one_trip", spy)
    engine._version_id_named.cache_clear()  # versions of other tests' workflows, rolled back since
    return answers


def recorded(run: WorkflowRun) -> dict[str, tuple]:
    """Per node: the task's status and result, and its Event's status, payload, result and context."""
    events = {e.event_id: e for e in Event.objects.filter(trace_id=run.trace_id)}
    shown = {}
    for task in TaskRun.objects.filter(run=run):
        event = events.get(task.current_event_id)
        stored = event and (event.status, event.payload, event.result, event.context, event.task_name)
        shown[task.node_key] = (task.status, task.result, task.holds_slot, stored)
    return shown


def test_successes_before_single_parent_nodes_take_one_trip_and_record_what_the_general_path_does(
    sent, one_trips, django_capture_on_commit_callbacks
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
    assert one_trips == [False] * 4  # each taken in one trip (False: no Celery row was asked for)
    fast, general = (recorded(r) for r in runs)
    assert fast == general
    assert fast["d"][3][1] == {"size": "L", "n": 2, "keep": [1, {"x": None}]}
    assert fast["b"][3][3]["upstream"] == {"a": {"node": "a", "nested": {"list": [1, 2]}}}
    assert [(r.status, r.finished_at is not None) for r in runs] == [("SUCCESS", True)] * 2
    assert [n for n, _, _ in sent] == list("abdc") * 2
    # the messages sent carry what was stored
    d_message = Event.objects.get(event_id=TaskRun.objects.get(run=runs[0], node_key="d").current_event_id)
    assert d_message.as_message()["payload"] == fast["d"][3][1]
    assert held("q_default") == (0, 0)


def test_a_repeated_success_sent_with_its_event_dispatches_nothing_again(
    sent, one_trips, django_capture_on_commit_callbacks
):
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
            )
            is False
        )
    assert one_trips == [False, False]
    assert [n for n, _, _ in sent] == ["a", "b"]
    assert TaskRun.objects.get(run=run, node_key="a").result == 1
    assert held("q_default") == (1, 1)  # b's


def test_joins_and_events_naming_another_graph_go_the_general_way(sent, one_trips, django_capture_on_commit_callbacks):
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
        engine.task_run_finish(trace_id=str(run.trace_id), event_id=str(b.event_id), succeeded=True, event=message)
    run_task(run, "c", cap)
    run_task(run, "d", cap)
    assert one_trips == [False, None, None, False]  # a; b (unknown version); c (join); d
    run.refresh_from_db()
    assert run.status == "SUCCESS" and set(statuses(run).values()) == {"SUCCESS"}
    assert [n for n, _, _ in sent] == list("abcd") and held("q_default") == (0, 0)


def test_an_event_naming_another_version_of_the_runs_workflow_writes_nothing_then_goes_the_general_way(
    sent, one_trips, django_capture_on_commit_callbacks
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
        engine.task_run_finish(trace_id=str(run.trace_id), event_id=str(a.event_id), succeeded=True, event=message)
    assert one_trips == [None]  # the database saw the version differ, and wrote nothing
    assert statuses(run) == {"a": "SUCCESS", "c": "QUEUED"}
    assert [n for n, _, _ in sent] == ["a", "c"] and held("q_default") == (1, 1)


def test_a_run_ends_when_its_last_success_finds_a_successor_already_ended(
    sent, one_trips, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(factories.spec("ended", [(k, ECHO) for k in "ab"], [["a", "b"]]))
    run = start(wf, capture=cap)
    TaskRun.objects.filter(run=run, node_key="b").update(status="SKIPPED")  # changed outside the engine
    run_task(run, "a", cap)
    assert one_trips == [False]
    run.refresh_from_db()
    assert run.status == "SUCCESS" and run.finished_at is not None
    assert [n for n, _, _ in sent] == ["a"] and held("q_default") == (0, 0)
