"""Admission cost per admitted task, one key against many fairness keys: run `python bench/admission.py`.

Each case fills an event type with N QUEUED tasks (one run each) spread over K fairness keys, builds
the keys' rows the way the reconciler does (`sql.RECOUNT_KEYS` under the type's lock) and lets the
engine fill the type's slots once. Then each timed step, in a transaction: one slot holder ends (set
SUCCESS, no longer holding its slot, untimed), and the engine's admission (`eventflow_admit`, given
that slot back for the holder's type and key) picks the next task, whose message is built (the
outbox, as a finish does). Each step must admit exactly one task. Nothing is published: this measures
the database side and the message's construction.

The cases: `one` (1,000 waiting, one key, no rate limit), `keys` (10,000 waiting over 1,000 keys, a
rate limit that never blocks but whose window is kept, and a per-key share) and `one-10k` (10,000
waiting, one key). All three lines are filled side by side, and the cases take turns step by step,
so the machine's drift reaches all alike; "step by step" is the median of each case's step over the
base case's step of the same turn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from _setup import print_table, setup_django, summary

# eventflow_admit with the slots a finish gives back (`sql.ADMIT` gives none back).
ADMIT_RELEASED = (
    "SELECT eventflow_admit(%(types)s::varchar[], %(released)s::jsonb, '{}', '{}', '{}', NULL, NULL, %(grace)s)"
)
TASK = "workflows_app.tasks.echo"
# Slots of every case's type: several holders, as a type in use has.
CONCURRENCY = 8
# Run priorities drawn for every task: mostly the default, some above and below it.
PRIORITIES = [5] * 8 + [7, 3]


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    waiting: int
    keys: int
    rate_limit: str | None = None
    per_key: int | None = None

    @property
    def event_type(self) -> str:
        return f"bench_admit_{self.name.replace('-', '_')}"


CASES = {
    "one": Case("one", "1,000 waiting, one key, no rate limit", 1000, 1),
    "keys": Case(
        "keys",
        "10,000 waiting over 1,000 keys, rate 1000000/hour, 2 per key",
        10_000,
        1000,
        rate_limit="1000000/hour",
        per_key=2,
    ),
    "one-10k": Case("one-10k", "10,000 waiting, one key, no rate limit", 10_000, 1),
}


def define(case: Case):
    """The case's workflow (one node on its own event type) and the type's admission settings."""
    from tests import factories
    from workflows_app import engine

    workflow = factories.workflow(factories.spec(f"wf_{case.event_type}", [("only", TASK)], event_type=case.event_type))
    settings = {"concurrency": CONCURRENCY, "rate_limit": case.rate_limit, "per_key_concurrency": case.per_key}
    settings["fairness_key"] = "payload.tenant" if case.keys > 1 else None
    engine.event_type_update(name=case.event_type, **settings)
    return workflow


def empty() -> None:
    from events_app.models import Event, EventType, EventTypeKey
    from workflows_app.models import TaskRun, WorkflowRun

    TaskRun.objects.all().delete()
    WorkflowRun.objects.all().delete()
    Event.objects.all().delete()
    EventTypeKey.objects.all().delete()
    # The rows deleted above took their slots and rate window with them.
    EventType.objects.update(held=0, rate_times=[], rate_counts=[], rate_wake_at=None)


def fill(case: Case, workflow, rng: random.Random) -> None:
    """N QUEUED tasks not holding a slot, each of its own run (its tenant's key, a drawn priority, its
    own start time), the keys' rows recounted from them, then one admission fills the type's slots."""
    from django.db import connection, transaction
    from django.utils import timezone

    from events_app.models import Event
    from workflows_app import pgsql
    from workflows_app.engine import sql
    from workflows_app.models import TaskRun, WorkflowRun

    version = workflow.versions.get()
    now = timezone.now()
    tenants = [f"tenant-{i:04d}" if case.keys > 1 else "" for i in range(case.keys)]
    drawn = [(tenants[i % case.keys], rng.choice(PRIORITIES)) for i in range(case.waiting)]
    rng.shuffle(drawn)
    runs = WorkflowRun.objects.bulk_create(
        WorkflowRun(
            workflow=workflow,
            version=version,
            workflow_version=version.version,
            payload={"tenant": tenant} if tenant else {},
            priority=priority,
        )
        for tenant, priority in drawn
    )
    events = Event.objects.bulk_create(
        Event(
            event_id=uuid.uuid4(),
            trace_id=r.trace_id,
            event_type=case.event_type,
            task_name=TASK,
            payload=r.payload,
            context={"node": "only", "attempt": 1},
            timestamp=now,
        )
        for r in runs
    )
    # Runs started a millisecond apart, each task ready right after its run's start.
    started = [now - timedelta(milliseconds=case.waiting - i) for i in range(case.waiting)]
    TaskRun.objects.bulk_create(
        TaskRun(
            run=r,
            node_key="only",
            event_type_id=case.event_type,
            task_name=TASK,
            status="QUEUED",
            holds_slot=False,
            queued_at=at + timedelta(microseconds=100),
            priority=r.priority,
            run_created_at=at,
            fair_key=tenant,
            current_event=e,
        )
        for r, e, at, (tenant, _) in zip(runs, events, started, drawn, strict=True)
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE workflows_app_workflowrun AS run SET created_at = task.run_created_at "
            "FROM workflows_app_taskrun AS task WHERE task.run_id = run.trace_id"
        )
    with transaction.atomic():
        pgsql.fetch_one(sql.LOCK_TYPE, {"name": case.event_type})
        (keys,) = pgsql.fetch_one(sql.RECOUNT_KEYS, {"name": case.event_type})
        assert keys == case.keys, (keys, case.keys)
        (sent,) = pgsql.fetch_one(sql.ADMIT, {"types": [case.event_type], "grace": 60})
        admitted = [item for item in pgsql.loads(sent) if "event" in item]
        assert len(admitted) == CONCURRENCY, sent


def fill_all(cases: list[Case], workflows: dict, rng: random.Random) -> None:
    """Every case's line, side by side in the same tables (each on its own event type), from empty."""
    from django.db import connection

    empty()
    for case in cases:
        fill(case, workflows[case.name], rng)
    with connection.cursor() as cursor:
        # As autovacuum would after a fill of this size; the previous fill's deletes left dead rows.
        cursor.execute("VACUUM ANALYZE workflows_app_taskrun, events_app_eventtypekey, events_app_eventtype")
    for case in cases:
        check(case)


def check(case: Case) -> None:
    """The counts admission keeps agree with the task rows: the type's and each key's slots held."""
    from django.db.models import Count

    from events_app.models import EventType, EventTypeKey
    from workflows_app.models import TaskRun

    holders = TaskRun.objects.filter(event_type_id=case.event_type, holds_slot=True)
    assert EventType.objects.get(name=case.event_type).held == holders.count() == CONCURRENCY
    by_key = dict(holders.values_list("fair_key").annotate(n=Count("pk")))
    kept = {k: h for k, h in EventTypeKey.objects.filter(event_type_id=case.event_type).values_list("key", "held")}
    assert by_key == {k: h for k, h in kept.items() if h}, (by_key, kept)


def step(case: Case) -> float:
    """Seconds for one admission: a holder ends and gives its slot back, and exactly one task is admitted."""
    from django.db import transaction

    from workflows_app import pgsql
    from workflows_app.engine import outbox
    from workflows_app.models import TaskRun

    with transaction.atomic():
        # The longest holder finishes, as task_run_finish would: its slot frees (untimed).
        holder = (
            TaskRun.objects.filter(event_type_id=case.event_type, holds_slot=True)
            .order_by("dispatched_at", "id")
            .values_list("pk", "fair_key")
            .first()
        )
        TaskRun.objects.filter(pk=holder[0]).update(holds_slot=False, status="SUCCESS")
        released = json.dumps([{"type": case.event_type, "key": holder[1], "n": 1}])
        start = time.perf_counter()
        (sent,) = pgsql.fetch_one(ADMIT_RELEASED, {"types": [case.event_type], "released": released, "grace": 60})
        box = outbox.Outbox()
        box.add_sent(pgsql.loads(sent), None)
        elapsed = time.perf_counter() - start
        assert len(box.messages) == 1, sent
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases, first = base")
    parser.add_argument("--samples", type=int, default=300, help="admissions timed per case and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="fills; the median of all samples")
    args = parser.parse_args()
    setup_django(os.environ.get("BENCH_DB_NAME", "eventflow_bench"))
    cases = [CASES[name] for name in args.cases]
    workflows = {case.name: define(case) for case in cases}
    rng = random.Random(20)
    with open("/proc/loadavg") as loadavg:
        start_load = " ".join(loadavg.read().split()[:3])
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(args.repeats):
        fill_all(cases, workflows, rng)
        for case in cases:
            for _ in range(20):  # warm caches, prepared statements and the graph snapshot
                step(case)
        # The cases take turns step by step, so the machine's drift reaches all alike.
        for i in range(args.samples):
            shift = i % len(cases)
            for case in cases[shift:] + cases[:shift]:
                samples[case.name].append(step(case))
        for case in cases:
            check(case)
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    first = samples[cases[0].name]
    base = summary(first)[0]
    rows = []
    for case in cases:
        med, lo, hi = summary(samples[case.name])
        ordered = sorted(samples[case.name])
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        times = [f"{x * 1e3:.3f}" for x in (med, p95, lo, hi)]
        paired = statistics.median(x / y for x, y in zip(samples[case.name], first, strict=True))
        rows.append([case.label, *times, f"{med / base:.2f}", f"{paired:.2f}"])
    name = cases[0].name
    print_table(
        ["case", "median ms/admission", "p95 ms", "min ms", "max ms", f"ratio to {name}", "step by step"],
        rows,
    )
    print(f"load average (1, 5, 15 min) at the start: {start_load}, at the end: {load}")


if __name__ == "__main__":
    main()
