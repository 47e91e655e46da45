"""Clocks that disagree, with real workers: time that crosses hosts comes from the database.

Lease expiry, the reconciler's "overdue", dispatch grace and retry due times are read on the
database's clock, so a worker whose own clock is minutes off neither takes over nor fails a live
attempt of a healthy worker, nor delays retries. Each scenario runs a healthy worker (the true
clock, which is also the database's on this machine) beside one whose wall clock libfaketime moves
by the skew, both with short leases (5 s lease, 1 s reconcile, 5 s dispatch grace), each consuming
its own queue and reconciling on its own timer.

CLOCK_SKEW_SECONDS (default "300,-300") chooses the skews; "0" runs the same scenarios under
libfaketime with true clocks, which tells a failure of the clocks from a failure of the scenario.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pprint import pformat

import pytest
from django.db import connection, models

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from events_app.models import Event
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.e2e_tasks import _redis
from tests.test_faults import COUNT, FAST, assert_sound
from tests.workers import Worker
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = [pytest.mark.e2e, pytest.mark.fault, pytest.mark.django_db(transaction=True)]

SKEWS = [float(s) for s in os.environ.get("CLOCK_SKEW_SECONDS", "300,-300").split(",")]
HEALTHY, SKEWED = "clock-healthy", "clock-skewed"
# The fault suite's short leases, a little longer: a renewal may be late by up to four of a worker's
# one-second ticks (a loaded machine, a commit waiting for the disk) before its lease lapses. What is
# tested is whose clock says so, not how short a lease can be.
TIMING = {**FAST, "EVENTFLOW_LEASE_SECONDS": "5"}
LONG = 2 * float(TIMING["EVENTFLOW_LEASE_SECONDS"])  # a task two leases long
# A time the engine stores may differ from the database's clock, read around it, by this much
# (a statement's `now()` is its transaction's start).
SLACK = timedelta(seconds=0.5)
# Log lines of a reconciler that found an attempt overdue, or a message that did not start in time.
OVERDUE = re.compile(r".*(brought \d+ overdue task\(s\)|again: it did not start in time).*")


@pytest.fixture(params=SKEWS, ids=lambda skew: f"{skew:+g}s")
def skew(request) -> float:
    return request.param


def database_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def overdue_lines(*workers: Worker) -> list[str]:
    return [f"{w.name}: {m.group(0).strip()}" for w in workers for m in OVERDUE.finditer(w.log())]


def lost_attempts(trace_id: str) -> list[str]:
    """The attempts a reconciler failed as lost: `node#attempt`."""
    errors = Event.objects.filter(trace_id=trace_id).values_list("context", "result")
    return sorted(f"{c['node']}#{c['attempt']}" for c, r in errors if "worker lost" in str((r or {}).get("error", "")))


def stamps_off_the_database_clock(trace_id: str, opened: datetime, closed: datetime) -> list[str]:
    """The times the engine stored for the run that fall outside the database's clock read before it
    began and after it ended: each should come from that clock, on whichever host it was written."""
    fields = ("queued_at", "started_at", "finished_at")
    stamps = [
        (f"{task['node_key']}.{field}", task[field])
        for task in TaskRun.objects.filter(run_id=trace_id).values("node_key", *fields)
        for field in fields
    ]
    stamps += [
        (f"event {context['node']}#{context['attempt']}.timestamp", timestamp)
        for context, timestamp in Event.objects.filter(trace_id=trace_id).values_list("context", "timestamp")
    ]
    run = WorkflowRun.objects.filter(trace_id=trace_id).values("created_at", "finished_at").get()
    stamps += [(f"run.{field}", value) for field, value in run.items()]
    low, high = opened - SLACK, closed + SLACK
    return sorted(f"{name} = {value}" for name, value in stamps if value is not None and not low <= value <= high)


def test_a_skewed_worker_leaves_the_live_attempts_of_a_healthy_one_alone(workers, api, skew):
    """Both workers run a task three leases long while each reconciles every second; the successor
    of each runs on the other worker. Nothing is found overdue, nothing runs twice."""
    node = {"task": COUNT, "params": {"seconds": LONG}, "max_retries": 1, "retry_delay": 0.2}
    factories.workflow(
        factories.spec(
            "skewed_pair",
            [
                {"key": "steady", "event_type": HEALTHY, **node},
                {"key": "drifting", "event_type": SKEWED, **node},
                {"key": "after_steady", "task": COUNT, "event_type": SKEWED},
                {"key": "after_drifting", "task": COUNT, "event_type": HEALTHY},
            ],
            [["steady", "after_steady"], ["drifting", "after_drifting"]],
        )
    )
    healthy = workers([HEALTHY], name="healthy", env=TIMING)
    skewed = workers([SKEWED], name="skewed", env=TIMING, clock_offset=skew)
    opened = database_now()
    trace_id = trigger(api, "skewed_pair")
    status = wait_final([trace_id], timeout=2 * LONG + 30)[trace_id]
    closed = database_now()

    tasks = TaskRun.objects.filter(run_id=trace_id)
    keys = ["steady", "drifting", "after_steady", "after_drifting"]
    observed = {
        "run": status,
        "attempts": dict(tasks.values_list("node_key", "attempts")),
        "bodies run": {key: int(_redis().get(f"node-runs:{trace_id}:{key}") or 0) for key in keys},
        "lost attempts": lost_attempts(trace_id),
        "overdue in the logs": overdue_lines(healthy, skewed),
        "stored off the database's clock": stamps_off_the_database_clock(trace_id, opened, closed),
    }
    assert observed == {
        "run": "SUCCESS",
        "attempts": dict.fromkeys(keys, 1),
        "bodies run": dict.fromkeys(keys, 1),
        "lost attempts": [],
        "overdue in the logs": [],
        "stored off the database's clock": [],
    }, pformat(observed, width=110)
    assert_sound([trace_id])


def move_queue(queue: str, *, off: Worker, to: Worker) -> None:
    """`off` stops consuming `queue`, then `to` consumes it."""
    from config.celery import app

    for command, worker in ((app.control.cancel_consumer, off), (app.control.add_consumer, to)):
        # Celery's control messages expire at the sender's time plus the reply timeout, and a worker
        # whose clock is ahead drops one that expired by its own clock: the timeout covers the
        # worker's offset, and `limit=1` returns at its reply.
        timeout = abs(worker.clock_offset or 0) + 10
        replies = command(queue, destination=[worker.name], reply=True, timeout=timeout, limit=1)
        assert replies, f"{worker.name} did not answer {command.__name__}({queue})"


def test_a_retry_scheduled_by_a_skewed_worker_starts_on_time(workers, api, skew):
    retry_on_time(workers, api, skew, retried_by="healthy")


@pytest.mark.parametrize("ahead", [s for s in SKEWS if s >= 0], ids=lambda skew: f"{skew:+g}s")
def test_a_worker_ahead_that_takes_a_retry_early_starts_it_on_time(workers, api, ahead):
    retry_on_time(workers, api, ahead, retried_by="skewed")


def retry_on_time(workers, api, skew: float, *, retried_by: str) -> None:
    """The skewed worker runs a node's first attempt, which fails, and schedules its retry, due 2 s
    later; the healthy worker (`retried_by="healthy"`) or the skewed one runs the retry.

    The retry goes to the node's queue. With `retried_by="healthy"`, the skewed worker hands that
    queue to the healthy one while the first attempt waits at its gate, so the retry waits on a true
    clock for whatever due time the skewed worker gave it: taken from the database's clock, it starts
    2 s after the failure; from a clock ahead, late; from one behind, early. With "skewed", the
    skewed worker runs the retry too: a clock ahead takes the message at once (its ETA passed on that
    clock), and the worker waits out the time the database says is left. (A worker whose clock runs
    behind holds the message until its own clock reaches the ETA: Celery's ETA is an instant read
    on the consumer's clock, so that case is not run.)

    When the failure was recorded and when the retry started are read on the database's clock, in
    the same statement that polls the task's row every 50 ms: the engine's own stamps are not used
    for that, since today each is the clock of the process that wrote it, the skewed one's for the
    failure. Once every time the engine stores comes from the database's clock they must fall
    between the database's readings before and after the run, as `stamps_off_the_database_clock`
    checks.
    """
    delay, tolerance = 2.0, 2.0
    late = 3 * delay + 5  # how long to watch for the retry before calling it late
    factories.workflow(
        factories.spec(
            "late_retry",
            [{"key": "wobbly", "task": "tests.e2e_tasks.fail_first_attempt", "max_retries": 1, "retry_delay": delay}],
            event_type=SKEWED,
        )
    )
    healthy = workers([HEALTHY], name="healthy", env=TIMING)
    skewed = workers([SKEWED], name="skewed", env=TIMING, clock_offset=skew)
    opened = database_now()
    trace_id = trigger(api, "late_retry")
    row = TaskRun.objects.filter(run_id=trace_id, node_key="wobbly").annotate(
        database_now=models.Func(function="clock_timestamp", output_field=models.DateTimeField())
    )
    wait_for(lambda: row.filter(started_at__isnull=False).exists(), timeout=20, what="the first attempt to start")
    if retried_by == "healthy":
        move_queue(SKEWED, off=skewed, to=healthy)
    _redis().set(f"gate:{trace_id}", 1, ex=600)

    seen: dict[str, datetime] = {}

    def retried_or_overdue() -> bool:
        status, attempts, now = row.values_list("status", "attempts", "database_now").get()
        if status == "RETRY" or attempts > 1:
            seen.setdefault("failed", now)
        if attempts > 1 and status != "RETRY":
            seen.setdefault("retried", now)
        return "retried" in seen or ("failed" in seen and now - seen["failed"] > timedelta(seconds=late))

    wait_for(retried_or_overdue, timeout=30, interval=0.05, what="the first attempt to fail")
    gap = (seen["retried"] - seen["failed"]).total_seconds() if "retried" in seen else None
    when = f"{gap:.2f} s after it" if gap is not None else f"not within {late:g} s of it"
    assert gap is not None and delay - 0.5 <= gap <= delay + tolerance, (
        f"the retry, due {delay:g} s after the failure, started {when}; the task then: "
        f"{row.values('status', 'lease_expires_at').get()}, the database's clock: {database_now()}"
    )
    print(f"the retry started {when}")

    assert wait_final([trace_id], timeout=20) == {trace_id: "SUCCESS"}
    closed = database_now()
    errors = dict(Event.objects.filter(trace_id=trace_id).values_list("context__attempt", "result__error"))
    assert "the first attempt fails" in errors[1], errors  # its own failure, not a reconciler's
    assert row.get().attempts == 2
    assert stamps_off_the_database_clock(trace_id, opened, closed) == []
    assert_sound([trace_id])
