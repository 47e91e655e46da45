"""End to end: admission's quotas on real worker processes, driven through the public API — a rate
limit changed mid-way, fairness keys, priorities and queue timeouts."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from events_app.models import EventType
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from workflows_app.models import TaskRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ECHO, SLEEP = "workflows_app.tasks.echo", "workflows_app.tasks.sleep"


def one(name: str, task: str = ECHO, **event_type) -> None:
    factories.workflow(
        factories.spec(
            name, [("a", task)], event_type="quota", event_types={"quota": {"concurrency": 40, **event_type}}
        )
    )


def most_in_any_window(times: list, seconds: float = 1.0) -> int:
    """The most of these instants inside any half-open window [t, t + seconds)."""
    times = sorted(times)
    width = timedelta(seconds=seconds)
    return max((sum(1 for u in times[i:] if u < t + width) for i, t in enumerate(times)), default=0)


def trigger_with(api, workflow: str, payload: dict | None = None, priority: int | None = None) -> str:
    body = {"payload": payload or {}, **({"priority": priority} if priority is not None else {})}
    response = api.post(f"/api/workflows/{workflow}/runs/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["trace_id"]


def dispatched(trace_ids: list[str]) -> list:
    rows = TaskRun.objects.filter(run_id__in=trace_ids).values_list("dispatched_at", flat=True)
    return sorted(rows)


def test_a_rate_limit_holds_in_every_window_and_a_raised_one_speeds_the_line_up(workers, api):
    one("rated", rate_limit="5/second")
    workers(["celery", "quota"], concurrency=4)
    began = time.monotonic()
    runs = [trigger(api, "rated") for _ in range(40)]
    assert set(wait_final(runs, timeout=30).values()) == {"SUCCESS"}
    took = time.monotonic() - began
    times = dispatched(runs)
    assert len(times) == 40 and all(times)
    # No more than 5 handed to Celery in any one-second window, read from the stored dispatch times;
    # the window's room is used, not left idle: 40 at 5 a second take about 7 s, under 12.
    assert most_in_any_window(times) <= 5
    assert took < 12, f"40 tasks at 5/second took {took:.1f} s"
    assert times[-1] - times[0] >= timedelta(seconds=7)

    # Mid-way through a second line, 20 a second: the rest go faster, without a restart.
    more = [trigger(api, "rated") for _ in range(60)]
    wait_for(
        lambda: TaskRun.objects.filter(run_id__in=more, dispatched_at__isnull=False).count() >= 10,
        timeout=10,
        what="10 of the second line dispatched",
    )
    response = api.patch("/api/event-types/quota/", {"rate_limit": "20/second"}, format="json")
    assert response.status_code == 200 and response.json()["rate_limit"] == "20/second"
    changed = EventType.objects.get(name="quota").updated_at
    assert set(wait_final(more, timeout=30).values()) == {"SUCCESS"}
    before = [t for t in dispatched(more) if t < changed]
    after = [t for t in dispatched(more) if t >= changed]
    assert most_in_any_window(before) <= 5
    assert 5 < most_in_any_window(after) <= 20


def test_a_small_key_is_served_before_a_big_keys_tenth_task(workers, api):
    one("fair", SLEEP, concurrency=3, fairness_key="payload.shop", per_key_concurrency=2)
    big = [trigger(api, "fair", {"shop": "A", "seconds": 0.2}) for _ in range(200)]
    small = [trigger(api, "fair", {"shop": "B", "seconds": 0.2}) for _ in range(2)]
    # The line is full before any worker runs: A holds its share of 2, B the third slot.
    assert TaskRun.objects.filter(run_id__in=big, holds_slot=True).count() == 2
    workers(["celery", "quota"], concurrency=3)
    wait_final(small, timeout=30)
    tenth_of_a = wait_for(
        lambda: list(
            TaskRun.objects.filter(run_id__in=big, started_at__isnull=False)
            .order_by("started_at")
            .values_list("started_at", flat=True)[9:10]
        ),
        timeout=30,
        what="A's tenth task to start",
    )[0]
    b_starts = TaskRun.objects.filter(run_id__in=small).values_list("started_at", flat=True)
    assert all(start < tenth_of_a for start in b_starts)
    at_once = TaskRun.objects.filter(run_id__in=big, status="STARTED").count()
    assert at_once <= 2


def test_a_later_run_with_priority_9_starts_before_the_waiting_ones(workers, api):
    one("urgent", SLEEP, concurrency=1)
    waiting = [trigger(api, "urgent", {"seconds": 0.1}) for _ in range(8)]
    urgent = trigger_with(api, "urgent", {"seconds": 0.1}, priority=9)
    workers(["celery", "quota"], concurrency=1)
    wait_final([*waiting, urgent], timeout=60)
    rows = TaskRun.objects.filter(run_id__in=[*waiting, urgent]).values_list("run_id", "started_at")
    starts = {str(run): started for run, started in rows}
    # The first run took the slot before the urgent one began; every other waiting task started after it.
    assert min(starts, key=starts.get) == waiting[0]
    assert all(starts[urgent] < starts[t] for t in waiting[1:])


def test_a_task_queued_past_its_timeout_fails_without_leaking_a_slot(workers, api):
    one("patient", SLEEP, concurrency=1, queue_timeout=1)
    blocker = trigger(api, "patient", {"seconds": 4})
    late = [trigger(api, "patient", {"seconds": 0}) for _ in range(2)]
    workers(["celery", "quota"], concurrency=1, env={"EVENTFLOW_RECONCILE_SECONDS": "0.5"})
    assert wait_final(late, timeout=20) == dict.fromkeys(late, "FAILED")
    for task in TaskRun.objects.filter(run_id__in=late):
        assert (task.status, task.attempts, task.error) == ("FAILURE", 0, "waited 1 s for a slot of quota")
    assert wait_final([blocker], timeout=20) == {blocker: "SUCCESS"}
    assert EventType.objects.get(name="quota").held == 0
    after = trigger(api, "patient", {"seconds": 0})
    assert wait_final([after], timeout=20) == {after: "SUCCESS"}
