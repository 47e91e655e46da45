"""Resuming one waiting node as the number of waiters grows: run `python bench/waits.py`.

Starts N runs of a workflow whose root is a wait_event node (`bench.moderated`, keyed by the
payload's sku, then an echo task), so N nodes are DEFERRED on one event type, each with its own
key. Then times `engine.event_publish(event_type="bench.moderated", key=sku)` for one waiting sku
at a time: it stores the event, finds the waiters of that type and key through the partial index
`task_run_waiting_idx`, resumes the one it finds and queues its successor. After each (untimed),
a new run with a fresh sku takes the resumed one's place, so every publish meets N waiters. The
successor's message goes to a Redis database of the bench's own (`BENCH_WAITS_BROKER_URL`,
default db 6), flushed before and after; no worker consumes it.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from _setup import print_table, setup_django, summary

BROKER_URL = os.environ.get("BENCH_WAITS_BROKER_URL", "redis://127.0.0.1:6379/6")
EVENT_TYPE = "bench.moderated"
ECHO = "workflows_app.tasks.echo"


def define_workflow():
    from workflows_app.definitions import workflow_definition_save

    return workflow_definition_save(
        data={
            "name": "bench_waits",
            "nodes": [
                {"key": "moderated", "kind": "wait_event", "event_type": EVENT_TYPE, "event_key": "payload.sku"},
                {"key": "publish", "task": ECHO, "event_type": "bench"},
            ],
            "edges": [["moderated", "publish"]],
        }
    )


def fill(workflow, waiters: int, batch: int) -> list[str]:
    """Empty the tables, then start `waiters` runs, each DEFERRED at its root with its own sku."""
    from django.db import connection, transaction

    from events_app.models import Event
    from workflows_app import engine
    from workflows_app.models import TaskRun, WorkflowRun

    TaskRun.objects.all().delete()
    WorkflowRun.objects.all().delete()
    Event.objects.all().delete()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE workflows_app_taskrun")
    skus = [f"SKU-{waiters}-{i:06d}" for i in range(waiters)]
    for start in range(0, waiters, batch):
        with transaction.atomic():
            for sku in skus[start : start + batch]:
                engine.workflow_run_start(workflow=workflow, payload={"sku": sku}, source="bench")
    assert TaskRun.objects.filter(status="DEFERRED", wait_type=EVENT_TYPE).count() == waiters
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # as autovacuum would, after a fill of this size
    return skus


def index_kib() -> float:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_total_relation_size('task_run_waiting_idx')")
        return cursor.fetchone()[0] / 1024


def rss_kib(pid: int) -> int | None:
    """Resident size of a process of this host, from /proc (None if it is not readable)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def backend_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def plan_uses_index(sku: str) -> bool:
    from django.db import connection
    from django.utils import timezone

    from workflows_app.engine import sql

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql.WAITERS, {"type": EVENT_TYPE, "key": sku, "timestamp": timezone.now()})
        return "task_run_waiting_idx" in "\n".join(r[0] for r in cursor.fetchall())


def resume(workflow, skus: list[str], count: int, rng: random.Random) -> list[float]:
    """Publish one event for each of `count` skus drawn from the waiting `skus`; each must resume
    exactly one run. After each (untimed), a run with a fresh sku takes the resumed one's place, so
    every publish meets the same number of waiters."""
    from workflows_app import engine

    timings = []
    for _ in range(count):
        sku = skus.pop(rng.randrange(len(skus)))
        start = time.perf_counter()
        event, _, _ = engine.event_publish(event_type=EVENT_TYPE, payload={}, key=sku)
        timings.append(time.perf_counter() - start)
        assert len(event.resumed) == 1, (sku, event.resumed)
        fresh = f"{sku}-next"
        engine.workflow_run_start(workflow=workflow, payload={"sku": fresh}, source="bench")
        skus.append(fresh)
    return timings


def kib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, nargs="+", default=[10, 10000], help="DEFERRED runs per measurement")
    parser.add_argument("--samples", type=int, default=30, help="resumes timed per number of waiters")
    parser.add_argument("--warmup", type=int, default=3, help="resumes before the timed ones")
    parser.add_argument("--batch", type=int, default=500, help="runs started per transaction")
    args = parser.parse_args()
    os.environ["CELERY_BROKER_URL"] = BROKER_URL
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    setup_django()
    import redis

    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    from events_app.models import EventType
    from workflows_app.models import TaskRun

    workflow = define_workflow()
    # The successor's event type admits every resumed run, so none is held back by a slot.
    EventType.objects.filter(name="bench").update(concurrency=100_000)
    pid = os.getpid()
    rows, medians = [], {}
    try:
        for n in args.waiters:
            t0 = time.perf_counter()
            skus = fill(workflow, n, args.batch)
            fill_s = time.perf_counter() - t0
            rng = random.Random(n)
            uses_index = plan_uses_index(skus[-1])
            resume(workflow, skus, args.warmup, rng)
            db_pid = backend_pid()
            before = (index_kib(), rss_kib(pid), rss_kib(db_pid))
            samples = resume(workflow, skus, args.samples, rng)
            after = (index_kib(), rss_kib(pid), rss_kib(db_pid))
            assert TaskRun.objects.filter(status="DEFERRED", wait_type=EVENT_TYPE).count() == n
            med, lo, hi = summary(samples)
            medians[n] = med
            rows.append(
                [
                    f"{n:,}",
                    f"{fill_s:.1f}",
                    "yes" if uses_index else "no",
                    f"{med * 1e3:.2f}",
                    f"{lo * 1e3:.2f}",
                    f"{hi * 1e3:.2f}",
                    f"{med / medians[args.waiters[0]]:.2f}",
                    f"{kib(before[0])} / {kib(after[0])}",
                    f"{kib(before[1])} / {kib(after[1])}",
                    f"{kib(before[2])} / {kib(after[2])}",
                ]
            )
    finally:
        queued = broker.dbsize()
        broker.flushdb()
    print_table(
        [
            "DEFERRED waiters",
            "fill s",
            "plan uses waiting index",
            "median ms/resume",
            "min ms",
            "max ms",
            f"ratio to {args.waiters[0]:,}",
            "waiting index KiB before / after",
            "bench RSS KiB before / after",
            "PostgreSQL backend RSS KiB before / after",
        ],
        rows,
    )
    print(f"\n{queued} Redis key(s) left by the queued successors, flushed.")


if __name__ == "__main__":
    main()
