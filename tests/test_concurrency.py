"""Cluster-wide parallelism per event type, measured from stored start and finish times of real workers."""

from __future__ import annotations

from datetime import datetime

import pytest

from events_app.models import Event, EventType
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from workflows_app.models import TaskRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SLEEP, ECHO = "workflows_app.tasks.sleep", "workflows_app.tasks.echo"


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """Most intervals open at one instant; a finish at the same instant as a start closes first."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def overlap_at(instant: datetime, intervals: list[tuple[datetime, datetime]]) -> int:
    return sum(1 for start, end in intervals if start <= instant < end)


def fan_out(name: str, count: int, *, task: str, event_type: str, concurrency: int, seconds: float = 0.5):
    """A workflow of `count` independent nodes of one event type."""
    nodes = [{"key": f"n{i:03d}", "task": task, "params": {"seconds": seconds}} for i in range(count)]
    factories.workflow(factories.spec(name, nodes, event_type=event_type))
    EventType.objects.filter(name=event_type).update(concurrency=concurrency)


def intervals_of(trace_id: str) -> list[tuple[datetime, datetime]]:
    tasks = TaskRun.objects.filter(run_id=trace_id)
    assert {t.status for t in tasks} == {"SUCCESS"}
    return [(t.started_at, t.finished_at) for t in tasks]


def test_limit_holds_across_two_worker_processes(workers, api):
    fan_out("twelve", 12, task=SLEEP, event_type="narrow", concurrency=2)
    workers(["narrow"], concurrency=4, name="host-a")
    workers(["narrow"], concurrency=4, name="host-b")
    trace_id = trigger(api, "twelve")
    wait_final([trace_id], timeout=60)

    assert max_overlap(intervals_of(trace_id)) == 2
    workers_used = set(TaskRun.objects.filter(run_id=trace_id).values_list("worker", flat=True))
    assert len(workers_used) == 2, "both worker processes should have taken tasks"


def test_raising_the_limit_mid_run_applies_at_once_and_lowering_stops_nothing(workers, api):
    fan_out("twenty", 20, task=SLEEP, event_type="narrow", concurrency=2)
    workers(["narrow"], concurrency=4, name="host-a")
    workers(["narrow"], concurrency=4, name="host-b")
    trace_id = trigger(api, "twenty")

    def done_count() -> int:
        return TaskRun.objects.filter(run_id=trace_id, status="SUCCESS").count()

    wait_for(lambda: done_count() >= 4, timeout=30, what="four tasks done")
    assert api.patch("/api/event-types/narrow/", {"concurrency": 4}, format="json").status_code == 200
    raised_at = TaskRun.objects.filter(run_id=trace_id, status="SUCCESS").latest("finished_at").finished_at
    wait_for(
        lambda: TaskRun.objects.filter(run_id=trace_id, status="STARTED").count() == 4,
        timeout=30,
        what="four running at once",
    )
    assert api.patch("/api/event-types/narrow/", {"concurrency": 2}, format="json").status_code == 200
    lowered_at = datetime.now(tz=raised_at.tzinfo)
    wait_final([trace_id], timeout=60)

    intervals = intervals_of(trace_id)  # every task SUCCESS: lowering stopped none
    assert max_overlap(intervals) == 4
    assert max_overlap([i for i in intervals if i[1] <= raised_at]) <= 2
    for start, _ in intervals:
        if start > lowered_at:
            assert overlap_at(start, intervals) <= 2 or any(
                s < lowered_at < e for s, e in intervals if s <= start < e
            ), "a task started above the lowered limit"
    assert not TaskRun.objects.filter(holds_slot=True).exists()


def test_two_hundred_racing_completions_never_admit_an_eleventh(workers, api):
    fan_out("two_hundred", 200, task=ECHO, event_type="race", concurrency=10)
    for host in ("a", "b", "c"):
        workers(["race"], concurrency=4, name=f"race-{host}")
    trace_id = trigger(api, "two_hundred")
    wait_final([trace_id], timeout=120)

    intervals = intervals_of(trace_id)
    assert len(intervals) == 200
    assert max_overlap(intervals) <= 10
    assert not TaskRun.objects.filter(event_type_id="race", holds_slot=True).exists()
    assert not TaskRun.objects.filter(event_type_id="race").exclude(status="SUCCESS").exists()


LEASE, RECONCILE = 3.0, 1.0
FAST_LEASE = {"EVENTFLOW_LEASE_SECONDS": str(LEASE), "EVENTFLOW_RECONCILE_SECONDS": str(RECONCILE)}


def test_killed_worker_gives_its_slot_back_within_the_lease_bound(workers, api):
    nodes = [
        {"key": f"n{i}", "task": SLEEP, "params": {"seconds": 1.5}, "max_retries": 1, "retry_delay": 0.1}
        for i in range(6)
    ]
    factories.workflow(factories.spec("doomed", nodes, event_type="narrow"))
    EventType.objects.filter(name="narrow").update(concurrency=2)
    victim = workers(["narrow"], concurrency=2, name="victim", env=FAST_LEASE)
    workers(["narrow"], concurrency=2, name="survivor", env=FAST_LEASE)
    trace_id = trigger(api, "doomed")
    held = TaskRun.objects.filter(run_id=trace_id, status="STARTED", worker=victim.name)
    wait_for(held.exists, timeout=30, what="the victim to hold a slot")
    lost = set(held.values_list("node_key", flat=True))

    victim.kill()
    killed_at = datetime.now(tz=TaskRun.objects.first().queued_at.tzinfo)
    wait_for(
        lambda: (
            not TaskRun.objects.filter(run_id=trace_id, node_key__in=lost, status="STARTED", worker=victim.name)
            .exclude(attempts__gt=1)
            .exists()
        ),
        timeout=LEASE + RECONCILE + 10,
        what="the lost attempts to be settled",
    )
    freed_after = (datetime.now(tz=killed_at.tzinfo) - killed_at).total_seconds()
    assert freed_after <= LEASE + RECONCILE + 2, f"slot came back after {freed_after:.1f}s"

    wait_final([trace_id], timeout=60)
    tasks = {t.node_key: t for t in TaskRun.objects.filter(run_id=trace_id)}
    assert {t.status for t in tasks.values()} == {"SUCCESS"}
    for key in lost:
        assert tasks[key].attempts == 2
        first = Event.objects.get(trace_id=trace_id, context__node=key, context__attempt=1)
        assert first.status == "FAILURE" and "worker lost" in first.result["error"]
    assert max_overlap([(t.started_at, t.finished_at) for t in tasks.values()]) <= 2
    assert not TaskRun.objects.filter(holds_slot=True).exists()
