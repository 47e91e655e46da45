"""Branches and fan-out driven directly on PostgreSQL (each test states its graph): edges with `when`,
mapped nodes and their instances, and a retry that runs again only the instances that failed."""

from __future__ import annotations

import pytest

from events_app.models import EventType
from tests import factories
from tests.test_engine import ECHO, Sent, finish_task, start, statuses
from tests.workers import purge_broker
from workflows_app import engine
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent() -> Sent:
    purge_broker()
    return Sent()


def finish(run: WorkflowRun, task: TaskRun, capture, *, ok: bool = True, result=None) -> None:
    finish_task(run, task, capture, ok=ok, result=result)


def node_row(run: WorkflowRun, key: str) -> TaskRun:
    return TaskRun.objects.get(run=run, node_key=key, map_index=None)


def instances(run: WorkflowRun, key: str) -> list[TaskRun]:
    return list(TaskRun.objects.filter(run=run, node_key=key, map_index__isnull=False).order_by("map_index"))


def started_map(capture, items: list, *, concurrency: int, done: int = 0) -> WorkflowRun:
    """A run of `mapped_spec` over `items` on a type of that concurrency, its first `done` instances
    finished with their index as result."""
    workflow = factories.workflow(mapped_spec())
    EventType.objects.filter(name="q_default").update(concurrency=concurrency)
    run = start(workflow, {"items": items}, capture=capture)
    for index in range(done):
        finish(run, instances(run, "each")[index], capture, result=index)
    return run


def mapped_spec(map_over: str = "payload.items", **node) -> dict:
    # each -> after
    return factories.spec(
        "fan",
        [{"key": "each", "task": ECHO, "map_over": map_over, **node}, {"key": "after", "task": ECHO}],
        [["each", "after"]],
    )


def test_a_map_runs_one_instance_per_element_within_its_types_concurrency(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(mapped_spec())
    EventType.objects.filter(name="q_default").update(concurrency=2)
    run = start(wf, {"items": ["a", "b", "c", "d", "e"]}, capture=cap)

    assert node_row(run, "each").status == "STARTED"
    rows = instances(run, "each")
    assert [(t.map_index, t.status, t.holds_slot) for t in rows] == [
        (0, "QUEUED", True),
        (1, "QUEUED", True),
        (2, "QUEUED", False),
        (3, "QUEUED", False),
        (4, "QUEUED", False),
    ]
    first = sent.events()
    assert [(e["context"]["map_index"], e["context"]["item"]) for e in first] == [(0, "a"), (1, "b")]
    # Each holds its element, not the whole list again.
    assert all(e["payload"] == {} and e["context"]["upstream"] == {} for e in first)
    assert len({e["event_id"] for e in first}) == 2

    for index in range(5):
        finish(run, instances(run, "each")[index], cap, result={"got": index})
        held = TaskRun.objects.filter(run=run, holds_slot=True).count()
        assert held <= 2
        if index < 4:
            assert node_row(run, "each").status == "STARTED"
            assert statuses(run)["after"] == "WAITING"

    each = node_row(run, "each")
    assert (each.status, each.result) == ("SUCCESS", [{"got": i} for i in range(5)])
    after = node_row(run, "after")
    assert after.status == "QUEUED"
    assert after.current_event.context["upstream"] == {"each": [{"got": i} for i in range(5)]}
    items = [(e["context"]["map_index"], e["context"]["item"]) for e in sent.events() if e["context"]["node"] == "each"]
    assert items == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")]
    finish(run, after, cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS"


def test_an_empty_list_skips_the_mapped_node_and_what_needs_it(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(mapped_spec()), {"items": []}, capture=cap)
    each = node_row(run, "each")
    assert each.status == "SKIPPED"
    assert "empty list" in each.error
    assert node_row(run, "after").status == "SKIPPED"
    assert "each was SKIPPED" in node_row(run, "after").error
    assert instances(run, "each") == []
    run.refresh_from_db()
    assert run.status == "SUCCESS"


def test_too_many_elements_fail_the_node_with_a_message(sent, django_capture_on_commit_callbacks, settings):
    settings.EVENTFLOW = {**settings.EVENTFLOW, "MAX_MAP_ITEMS": 3}
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(mapped_spec()), {"items": [1, 2, 3, 4]}, capture=cap)
    each = node_row(run, "each")
    assert each.status == "FAILURE"
    assert "4 elements, more than the 3 allowed" in each.error
    assert node_row(run, "after").status == "UPSTREAM_FAILED"
    run.refresh_from_db()
    assert run.status == "FAILED"


def test_a_map_over_that_fails_at_run_time_fails_its_node_naming_the_expression(
    sent, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(mapped_spec("payload.items")), {"other": 1}, capture=cap)
    each = node_row(run, "each")
    assert each.status == "FAILURE"
    assert "`payload.items`" in each.error
    run = start(factories.workflow(mapped_spec("payload.items")), {"items": "not a list"}, capture=cap)
    assert "not a list" in node_row(run, "each").error


def test_a_failed_instance_fails_the_node_once_all_end_and_a_retry_runs_it_alone(
    sent, django_capture_on_commit_callbacks
):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(mapped_spec())
    EventType.objects.filter(name="q_default").update(concurrency=10)
    run = start(wf, {"items": [10, 11, 12]}, capture=cap)
    finish(run, instances(run, "each")[1], cap, ok=False)
    assert node_row(run, "each").status == "STARTED"  # the others still run
    finish(run, instances(run, "each")[0], cap, result=0)
    finish(run, instances(run, "each")[2], cap, result=2)
    each = node_row(run, "each")
    assert each.status == "FAILURE"
    assert "1 of 3 instances" in each.error
    assert node_row(run, "after").status == "UPSTREAM_FAILED"
    run.refresh_from_db()
    assert run.status == "FAILED"

    before = {t.map_index: (t.current_event_id, t.status) for t in instances(run, "each")}
    sent.events()
    with cap(execute=True):
        engine.workflow_run_retry(trace_id=str(run.trace_id))
    rows = instances(run, "each")
    assert [(t.map_index, t.status) for t in rows] == [(0, "SUCCESS"), (1, "QUEUED"), (2, "SUCCESS")]
    assert rows[0].current_event_id == before[0][0] and rows[2].current_event_id == before[2][0]
    assert rows[1].current_event_id != before[1][0]
    again = [e for e in sent.events() if e["context"]["node"] == "each"][-1]
    assert (again["context"]["map_index"], again["context"]["item"]) == (1, 11)
    assert node_row(run, "each").status == "STARTED"
    assert node_row(run, "after").status == "WAITING"

    finish(run, rows[1], cap, result=1)
    assert node_row(run, "each").result == [0, 1, 2]
    finish(run, node_row(run, "after"), cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS"


def test_an_instance_retries_on_its_own(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(mapped_spec(max_retries=1, retry_delay=0))
    EventType.objects.filter(name="q_default").update(concurrency=5)
    run = start(wf, {"items": ["x", "y"]}, capture=cap)
    finish(run, instances(run, "each")[0], cap, ok=False)
    first = instances(run, "each")[0]
    assert (first.status, first.holds_slot) == ("RETRY", True)
    assert first.current_event.context["attempt"] == 2
    assert first.current_event.context["item"] == "x"


def branch_spec(when: str) -> dict:
    # check -> yes (when), check -> no, yes -> below, {yes, no} -> join (none_failed)
    return factories.spec(
        "branch",
        [
            {"key": "check", "task": ECHO},
            {"key": "yes", "task": ECHO},
            {"key": "no", "task": ECHO},
            {"key": "below", "task": ECHO},
            {"key": "join", "task": ECHO, "trigger_rule": "none_failed"},
        ],
        [
            {"from": "check", "to": "yes", "when": when},
            ["check", "no"],
            ["yes", "below"],
            ["below", "join"],
            ["no", "join"],
        ],
    )


def test_a_false_condition_skips_its_branch_and_says_why(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    wf = factories.workflow(branch_spec("result.payload.go"))
    EventType.objects.filter(name="q_default").update(concurrency=10)
    run = start(wf, {"go": False}, capture=cap)
    finish(run, node_row(run, "check"), cap, result={"payload": {"go": False}})
    assert statuses(run) == {
        "check": "SUCCESS",
        "yes": "SKIPPED",
        "no": "QUEUED",
        "below": "SKIPPED",
        "join": "WAITING",
    }
    assert "the condition of edge check -> yes (`result.payload.go`) was false" in node_row(run, "yes").error
    assert "yes was SKIPPED" in node_row(run, "below").error
    finish(run, node_row(run, "no"), cap)
    finish(run, node_row(run, "join"), cap)
    run.refresh_from_db()
    assert run.status == "SUCCESS"

    taken = start(wf, {"go": True}, capture=cap)
    finish(taken, node_row(taken, "check"), cap, result={"payload": {"go": True}})
    assert statuses(taken)["yes"] == "QUEUED"


def test_a_condition_that_fails_at_run_time_fails_its_target_naming_it(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    run = start(factories.workflow(branch_spec("result.missing")), {}, capture=cap)
    finish(run, node_row(run, "check"), cap, result={"other": 1})
    yes = node_row(run, "yes")
    assert yes.status == "FAILURE"
    assert "edge check -> yes" in yes.error and "`result.missing`" in yes.error
    assert node_row(run, "below").status == "UPSTREAM_FAILED"


def test_a_lost_instance_is_failed_by_the_reconciler_and_ends_its_node(sent, django_capture_on_commit_callbacks):
    from datetime import timedelta

    from django.db.models.functions import Now

    cap = django_capture_on_commit_callbacks
    run = started_map(cap, ["x", "y"], concurrency=5, done=1)
    lost = instances(run, "each")[1]
    assert engine.task_run_start(event_id=str(lost.current_event_id), attempt=1)
    TaskRun.objects.filter(pk=lost.pk).update(lease_expires_at=Now() - timedelta(hours=1))
    with cap(execute=True):
        assert engine.task_runs_reconcile() == 1
    lost.refresh_from_db()
    assert lost.status == "FAILURE" and "worker lost" in lost.error
    assert node_row(run, "each").status == "FAILURE"
    assert node_row(run, "after").status == "UPSTREAM_FAILED"
    assert not TaskRun.objects.filter(run=run, holds_slot=True).exists()


def test_cancel_revokes_the_unfinished_instances_and_frees_their_slots(sent, django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    run = started_map(cap, [1, 2, 3, 4], concurrency=2, done=1)
    with cap(execute=True):
        engine.workflow_run_cancel(trace_id=str(run.trace_id))
    assert [t.status for t in instances(run, "each")] == ["SUCCESS", "REVOKED", "REVOKED", "REVOKED"]
    assert node_row(run, "each").status == "REVOKED"
    assert EventType.objects.get(name="q_default").held == 0
    with cap(execute=True):
        engine.workflow_run_retry(trace_id=str(run.trace_id))
    assert [t.status for t in instances(run, "each")] == ["SUCCESS", "QUEUED", "QUEUED", "QUEUED"]
    assert [t.holds_slot for t in instances(run, "each")] == [False, True, True, False]


def test_the_database_refuses_to_go_on_when_no_other_instance_is_open(sent, django_capture_on_commit_callbacks):
    """Two last instances ending at once each take the other to be open; the database lets only the
    first go on (`p_open`), and the second decides again from what it reads."""
    from workflows_app.engine import rules, sql, transitions
    from workflows_app.engine.rules import RunContext

    cap = django_capture_on_commit_callbacks
    run = started_map(cap, ["x", "y"], concurrency=5, done=1)
    last = instances(run, "each")[1]
    assert engine.task_run_start(event_id=str(last.current_event_id), attempt=1)
    graph = engine.graph_for_version(run.version_id)
    context = RunContext(str(run.trace_id), {}, graph)
    plan = rules.plan_finish(context, "each", rules.Outcome("SUCCESS"), {}, map_index=1)
    assert plan.open == "each"
    code, *_ = transitions._advance(
        str(run.trace_id), run.version_id, plan, event_id=str(last.current_event_id), outcome=rules.Outcome("SUCCESS")
    )
    assert code == sql.STALE
    last.refresh_from_db()
    assert last.status == "STARTED"  # nothing written


def test_workflow_status_counts_a_mapped_nodes_instances_and_lists_those_running_or_failed(
    sent, django_capture_on_commit_callbacks
):
    import io

    from django.core.management import call_command

    cap = django_capture_on_commit_callbacks
    run = started_map(cap, ["a", "b", "c", "d"], concurrency=2, done=1)
    finish(run, instances(run, "each")[1], cap, ok=False)
    assert engine.task_run_start(event_id=str(instances(run, "each")[2].current_event_id), attempt=1)
    out = io.StringIO()
    call_command("workflow_status", str(run.trace_id), stdout=out)
    lines = out.getvalue().splitlines()
    each = next(line for line in lines if line.startswith("each "))
    assert "STARTED (1 FAILURE, 1 QUEUED, 1 STARTED, 1 SUCCESS)" in each
    listed = [line.split()[0] for line in lines if line.startswith("each[")]
    assert listed == ["each[1]", "each[2]"]
