"""Admission cost per task as the waiting line grows: run `python bench/admission.py`.

Fills an event type of concurrency 1 with N QUEUED tasks (one run each), then repeatedly frees
the slot and times the engine's admission step (`eventflow_admit`: lock the type, read its count of
held slots, take the head of the line, mark it; then build its message). Nothing is published: this
measures the database side.
"""

from __future__ import annotations

import argparse
import time
import uuid

from _setup import print_table, setup_django, summary


def fill(line_length: int) -> None:
    from django.utils import timezone

    from events_app.models import Event, EventType
    from tests import factories
    from workflows_app.models import TaskRun, WorkflowRun

    TaskRun.objects.all().delete()
    WorkflowRun.objects.all().delete()
    Event.objects.all().delete()
    workflow = factories.workflow(
        factories.spec("bench_one", [("only", "workflows_app.tasks.echo")], event_type="bench")
    )
    # The rows deleted above took their slots with them: start the type's count from none.
    EventType.objects.filter(name="bench").update(concurrency=1, held=0)
    version = workflow.versions.get()
    now = timezone.now()
    runs = WorkflowRun.objects.bulk_create(
        WorkflowRun(workflow=workflow, version=version, workflow_version=version.version) for _ in range(line_length)
    )
    events = Event.objects.bulk_create(
        Event(
            event_id=uuid.uuid4(),
            trace_id=r.trace_id,
            event_type="bench",
            task_name="workflows_app.tasks.echo",
            context={"node": "only", "attempt": 1},
            timestamp=now,
        )
        for r in runs
    )
    TaskRun.objects.bulk_create(
        TaskRun(
            run=r,
            node_key="only",
            event_type_id="bench",
            task_name="workflows_app.tasks.echo",
            status="QUEUED",
            queued_at=now,
            current_event=e,
        )
        for r, e in zip(runs, events, strict=True)
    )
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def measure(samples: int) -> list[float]:
    from django.db import transaction

    from workflows_app import pgsql
    from workflows_app.engine import outbox, sql
    from workflows_app.models import TaskRun

    timings = []
    for _ in range(samples):
        with transaction.atomic():
            # The holder finishes: its slot frees, as task_run_finish does.
            freed = TaskRun.objects.filter(event_type_id="bench", holds_slot=True).update(
                holds_slot=False, status="SUCCESS"
            )
            start = time.perf_counter()
            (sent,) = pgsql.fetch_one(sql.ADMIT, {"types": ["bench"], "released": [freed], "grace": 60})
            box = outbox.Outbox()
            box.add_sent(pgsql.loads(sent), None)
            timings.append(time.perf_counter() - start)
            assert len(box.messages) == 1
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[1000, 10000], help="waiting-line lengths")
    parser.add_argument("--samples", type=int, default=300, help="admissions timed per length")
    parser.add_argument("--repeats", type=int, default=3, help="fills per length; the median of all samples")
    args = parser.parse_args()
    setup_django()
    results = {}
    for length in args.lines:
        samples: list[float] = []
        for _ in range(args.repeats):
            fill(length)
            measure(20)  # warm caches and the graph snapshot
            samples += measure(args.samples)
        results[length] = summary(samples)
    base = results[args.lines[0]][0]
    rows = [
        [f"{n:,}", f"{med * 1e3:.3f}", f"{lo * 1e3:.3f}", f"{hi * 1e3:.3f}", f"{med / base:.2f}"]
        for n, (med, lo, hi) in results.items()
    ]
    print_table(["QUEUED waiting", "median ms/admission", "min ms", "max ms", f"ratio to {args.lines[0]:,}"], rows)


if __name__ == "__main__":
    main()
