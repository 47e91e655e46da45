"""Faults with real processes: every run still ends in a final state, nothing is dispatched twice, no slot leaks.

Workers here run with short leases (3 s lease, 1 s reconcile, 5 s dispatch grace) so recovery is
quick; each scenario states its deadline. Scenarios that restart PostgreSQL or Redis are marked
`disruptive` and run as a separate CI step, since they cut every connection on the machine.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections import Counter

import pytest
import redis
from django.conf import settings
from django.db import OperationalError, close_old_connections

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from events_app.models import Event, EventType
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.e2e_tasks import _redis
from workflows_app.engine import graph_for_version
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = [pytest.mark.e2e, pytest.mark.fault, pytest.mark.django_db(transaction=True)]

FAST = {
    "EVENTFLOW_LEASE_SECONDS": "3",
    "EVENTFLOW_RECONCILE_SECONDS": "1",
    "EVENTFLOW_DISPATCH_GRACE_SECONDS": "5",
}
SLEEP, COUNT = "workflows_app.tasks.sleep", "tests.e2e_tasks.count"


def diamond(name: str, *, task: str = SLEEP, seconds: float = 0.3, retries: int = 5, queue: str = "fault") -> None:
    """a -> (b, c) -> d, every node `task` on one queue with concurrency 4."""
    node = {"task": task, "params": {"seconds": seconds}, "max_retries": retries, "retry_delay": 0.2}
    factories.workflow(
        factories.spec(
            name,
            [{"key": k, **node} for k in "abcd"],
            [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]],
            event_type=queue,
        )
    )
    EventType.objects.filter(name=queue).update(concurrency=4)


def assert_sound(trace_ids: list[str]) -> None:
    """Nothing dispatched twice, successors after predecessors, no slot left held."""
    for trace_id in trace_ids:
        attempts = Counter((e.context["node"], e.context["attempt"]) for e in Event.objects.filter(trace_id=trace_id))
        doubled = [key for key, n in attempts.items() if n > 1]
        assert not doubled, f"dispatched twice in {trace_id}: {doubled}"
        run = WorkflowRun.objects.get(trace_id=trace_id)
        graph = graph_for_version(run.version_id)
        tasks = {t.node_key: t for t in run.tasks.all()}
        for key, task in tasks.items():
            first = attempts.get((key, 1), 0)
            assert first <= 1
            if task.status == "SUCCESS":
                for pred in graph.preds[key]:
                    assert task.started_at >= tasks[pred].finished_at, f"{key} before {pred} in {trace_id}"
    assert not TaskRun.objects.filter(holds_slot=True).exists(), "a slot is still held"


def test_kill_9_of_workers_at_random_points(workers, api):
    diamond("crashy")
    rng = random.Random(int(os.environ.get("FAULT_SEED", "20261122")))
    print(f"seed {rng.random()}")
    pool = [workers(["fault"], concurrency=2, name=f"crash-{i}", env=FAST) for i in range(2)]
    trace_ids = [trigger(api, "crashy") for _ in range(20)]
    for kill in range(6):
        wait_for(
            lambda: (
                TaskRun.objects.filter(status="STARTED").exists()
                or all(r == "SUCCESS" for r in WorkflowRun.objects.values_list("status", flat=True))
            ),
            timeout=30,
            what="a task to be running",
        )
        time.sleep(rng.uniform(0.1, 0.8))  # a random point within the running tasks
        victim = pool.pop(rng.randrange(len(pool)))
        victim.kill()
        pool.append(workers(["fault"], concurrency=2, name=f"crash-{kill + 2}", env=FAST))

    statuses = wait_final(trace_ids, timeout=180)
    assert set(statuses.values()) == {"SUCCESS"}, Counter(statuses.values())
    assert_sound(trace_ids)
    lost = Event.objects.filter(trace_id__in=trace_ids, status="FAILURE").count()
    print(f"{lost} attempts were lost to kills and retried")


def test_worker_killed_after_the_outcome_was_recorded_before_the_ack(workers, api):
    factories.workflow(
        factories.spec(
            "dying",
            [{"key": "a", "task": "tests.e2e_tasks.die_after_return"}, {"key": "b", "task": COUNT}],
            [["a", "b"]],
            event_type="fault",
        )
    )
    victim = workers(["fault"], concurrency=1, name="victim", env=FAST)
    trace_id = trigger(api, "dying")
    wait_for(lambda: victim.process.poll() is not None, timeout=30, what="the worker to die after the body")
    workers(["fault"], concurrency=1, name="survivor", env=FAST)

    assert wait_final([trace_id], timeout=30) == {trace_id: "SUCCESS"}
    a = TaskRun.objects.get(run_id=trace_id, node_key="a")
    # The recorded outcome stands: the body is not run again and its value is kept.
    assert a.attempts == 1 and a.result == {"answer": 42}
    assert Event.objects.filter(trace_id=trace_id, context__node="a").count() == 1
    assert_sound([trace_id])


def test_the_same_message_delivered_twice_runs_once(workers, api):
    from config.celery import app

    factories.workflow(
        factories.spec(
            "twice",
            [{"key": "a", "task": COUNT, "params": {"seconds": 0.5}}, ("b", COUNT)],
            [["a", "b"]],
            event_type="fault",
        )
    )
    workers(["fault"], concurrency=2, env=FAST)
    trace_id = trigger(api, "twice")
    event = TaskRun.objects.get(run_id=trace_id, node_key="a").current_event.as_message()
    app.send_task(event["task_name"], args=[event], task_id=event["event_id"], queue="fault")
    assert wait_final([trace_id], timeout=30) == {trace_id: "SUCCESS"}
    app.send_task(event["task_name"], args=[event], task_id=event["event_id"], queue="fault")

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    wait_for(lambda: broker.llen("fault") == 0, timeout=20, what="the duplicates to be consumed")
    wait_for(lambda: not any(app.control.inspect(timeout=0.5).active().values()), timeout=20, what="idle workers")
    assert int(_redis().get(f"runs:{event['event_id']}")) == 1
    assert int(_redis().get(f"node-runs:{trace_id}:b")) == 1
    assert_sound([trace_id])


def test_cancel_then_worker_restart_starts_nothing_of_that_run(workers, api):
    from config.celery import app

    factories.workflow(
        factories.spec(
            "stopme",
            [{"key": "a", "task": COUNT, "params": {"seconds": 5}}, ("b", COUNT), ("c", COUNT)],
            [["a", "b"], ["b", "c"]],
            event_type="fault",
        )
    )
    worker = workers(["fault"], concurrency=2, env=FAST)
    trace_id = trigger(api, "stopme")
    a = TaskRun.objects.filter(run_id=trace_id, node_key="a")
    wait_for(lambda: a.filter(status="STARTED").exists(), timeout=20, what="a to start")
    assert api.post(f"/api/runs/{trace_id}/cancel/").json()["status"] == "CANCELED"
    worker.stop()
    # The stale message comes back after the restart, as a redelivery would bring it.
    event = a.get().current_event.as_message()
    app.send_task(event["task_name"], args=[event], task_id=event["event_id"], queue="fault")
    workers(["fault"], concurrency=2, name="restarted", env=FAST)

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    wait_for(lambda: broker.llen("fault") == 0, timeout=20, what="the stale message to be consumed")
    wait_for(lambda: not any(app.control.inspect(timeout=0.5).active().values()), timeout=20, what="idle workers")
    assert set(TaskRun.objects.filter(run_id=trace_id).values_list("status", flat=True)) == {"REVOKED"}
    assert int(_redis().get(f"runs:{event['event_id']}") or 0) == 1  # only the run before the cancel
    assert not _redis().exists(f"node-runs:{trace_id}:b")
    assert WorkflowRun.objects.get(trace_id=trace_id).status == "CANCELED"
    assert_sound([trace_id])


def test_retry_from_failure_keeps_successes_and_can_succeed(workers, api):
    factories.workflow(
        factories.spec(
            "mended",
            [
                {"key": "a", "task": COUNT, "params": {"seconds": 1}},
                ("b", "tests.e2e_tasks.flaky"),
                ("c", COUNT),
                ("side", COUNT),
            ],
            [["a", "b"], ["b", "c"], ["a", "side"]],
            event_type="fault",
        )
    )
    workers(["fault"], concurrency=2, env=FAST)
    trace_id = trigger(api, "mended")
    _redis().set(f"broken:{trace_id}", 1)  # while a sleeps its second, b's dependency breaks
    assert wait_final([trace_id], timeout=30) == {trace_id: "FAILED"}
    tasks = dict(TaskRun.objects.filter(run_id=trace_id).values_list("node_key", "status"))
    assert tasks == {"a": "SUCCESS", "b": "FAILURE", "c": "UPSTREAM_FAILED", "side": "SUCCESS"}

    _redis().delete(f"broken:{trace_id}")
    assert api.post(f"/api/runs/{trace_id}/retry/").json()["status"] == "RUNNING"
    assert wait_final([trace_id], timeout=30) == {trace_id: "SUCCESS"}
    assert int(_redis().get(f"node-runs:{trace_id}:a")) == 1
    assert int(_redis().get(f"node-runs:{trace_id}:side")) == 1
    assert int(_redis().get(f"node-runs:{trace_id}:c")) == 1
    assert not TaskRun.objects.filter(holds_slot=True).exists()


# --------------------------------------------------------------------------- disruptive: services restart

REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def _cluster() -> str:
    return sorted(os.listdir("/etc/postgresql"))[0]


@pytest.mark.disruptive
def test_redis_restarted_during_runs(workers, api):
    diamond("redis_outage", seconds=0.5)
    for i in range(2):
        workers(["fault"], concurrency=2, name=f"r{i}", env=FAST)
    trace_ids = [trigger(api, "redis_outage") for _ in range(6)]
    wait_for(lambda: TaskRun.objects.filter(status="STARTED").exists(), timeout=20, what="tasks running")
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], check=False)
    wait_for(
        lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).returncode != 0, timeout=10, what="down"
    )
    subprocess.run(REDIS_START, check=True)
    wait_for(lambda: redis.Redis().ping(), timeout=10, what="Redis back")

    statuses = wait_final(trace_ids, timeout=120)
    assert set(statuses.values()) == {"SUCCESS"}, Counter(statuses.values())
    assert_sound(trace_ids)


@pytest.mark.disruptive
def test_postgresql_stopped_for_five_seconds_during_runs(workers, api):
    diamond("pg_outage", seconds=0.5)
    slow_lease = {**FAST, "EVENTFLOW_LEASE_SECONDS": "20"}
    for i in range(2):
        workers(["fault"], concurrency=2, name=f"p{i}", env=slow_lease)
    trace_ids = [trigger(api, "pg_outage") for _ in range(6)]
    wait_for(lambda: TaskRun.objects.filter(status="STARTED").exists(), timeout=20, what="tasks running")
    close_old_connections()
    cluster = _cluster()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "stop", "-m", "fast"], check=True)
    try:
        time.sleep(5)  # the outage itself is the scenario: five seconds without a database
    finally:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "start"], check=True)

    def reachable() -> bool:
        try:
            close_old_connections()
            return WorkflowRun.objects.exists()
        except OperationalError:
            from django.db import connection

            connection.close()
            return False

    wait_for(reachable, timeout=30, what="PostgreSQL back")
    statuses = wait_final(trace_ids, timeout=150)
    assert set(statuses.values()) == {"SUCCESS"}, Counter(statuses.values())
    assert_sound(trace_ids)
