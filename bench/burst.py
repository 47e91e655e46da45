"""A burst of pipeline runs on small concurrencies, Eventflow against canvas: run `python bench/burst.py`.

500 runs of intake -> (llm, image) -> upload -> (publish_a, publish_b) are started at once. Each step
is a sleep (`bench/tasks.py`, BURST_MS) on its own queue, served by a worker of its own whose pool is
the step's concurrency; for Eventflow each queue is an event type of that concurrency, and a worker on
the engine's `celery` queue runs its own tasks. Canvas runs the same shape,
`chain(intake, group(llm, image), upload, group(publish_a, publish_b))`, each signature routed to
the same queue, on the same workers and broker (Redis, database 9 by default). That is
`--layout per-step`; with `shared` every step goes to one queue (one event type) served by one worker
instead; with `marketplace` intake, upload and both publishes share the marketplace API's event type
(concurrency 2), llm and image the model provider's (4), a worker each; with `pooled` each step keeps
its queue and event type, and one worker consumes all of them; with `grouped` upload and both
publishes share the marketplace's event type, of concurrency 1 (its queue then holds later steps of
early runs behind earlier steps of later ones), a worker each. By default `shared`, `marketplace`,
then `per-step`.

Beside the figures, each layout's bottleneck: the worker pool or event type needing the longest time
per run. No order of the lines ends the k-th run sooner than k such times after the first start, so
the median run cannot end sooner than half the runs' times (less the spread of the starts) whatever
the scheduler: set against canvas's median, the lowest ratio any engine could reach on that layout.
And each system's median over its own total: a scheduler that ends runs one after another at its
bottleneck's pace ends the median run halfway (0.5); one that goes breadth-first, near its end (1).
Eventflow's median can be 0.6 of canvas's at equal throughput only where canvas's is above 0.83.

A run's time is from its start to its end. Eventflow: from the run's `created_at` (PostgreSQL's
`now()` in the transaction that starts it: runs are started in-process, `--batch` per transaction) to
its `finished_at` (`now()` in the transaction that ends it). Canvas: from just before `apply_async`
(the bench process's clock) to the later `date_done` of the two publish tasks' results (the worker's
clock, as django-celery-results stores each in PostgreSQL). PostgreSQL runs on this host, so every
time is read from the one system clock. The total is from the first start to the last end; the
throughput, runs over that total. The systems take turns, each round starting with the next one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _procs import Worker, bench_env, wait_for
from _setup import print_table, setup_django

DB_NAME = os.environ.get("BENCH_DB_NAME", "eventflow_bench_burst")
BROKER_URL = os.environ.get("BENCH_BURST_BROKER_URL", "redis://127.0.0.1:6379/9")
# Each step's concurrency (its event type's, and its worker's pool): 15 pool processes in all.
CONCURRENCY = {"intake": 4, "llm": 2, "image": 2, "upload": 3, "publish_a": 2, "publish_b": 2}
EDGES = [
    ("intake", "llm"),
    ("intake", "image"),
    ("llm", "upload"),
    ("image", "upload"),
    ("upload", "publish_a"),
    ("upload", "publish_b"),
]
# The sleep of each step, in milliseconds, passed to the workers (bench/tasks.py reads it).
SLEEP_MS = {"intake": 20, "llm": 80, "image": 40, "upload": 30, "publish_a": 20, "publish_b": 20}
# TYPE_ORDER: the event types are named in the pipeline's order (burst_1_intake, burst_2_llm, ...). A
# trigger locks its root's type for admission and, at its commit, its foreign keys take a share lock on
# every type of its tasks; a finish locks its types in name order. Named intake, llm, ... a trigger
# holding burst_intake while its commit waits for burst_image deadlocks with an intake's finish
# holding burst_image and waiting for burst_intake (PostgreSQL aborts one after a second).
EVENTFLOW = "Eventflow"
CANVAS = "canvas"


@dataclass(frozen=True)
class Layout:
    """Which queue (and event type) each step goes to, and each queue's concurrency."""

    queues: dict[str, str]
    concurrency: dict[str, int]
    # The workers: the queues each consumes (comma-separated) and its pool; by default one per queue.
    workers: dict[str, int] | None = None

    def pools(self) -> dict[str, int]:
        return self.workers or dict(self.concurrency)

    def bottleneck(self, sleeps: dict[str, int], *, keeps_types: bool) -> tuple[str, float]:
        """The resource that needs the longest time per run, and that time in seconds: a worker's pool
        (its queues' steps' sleeps over its processes) and, for a system that keeps each event type's
        concurrency (Eventflow; canvas knows no types), each type (its steps' sleeps over its
        concurrency). However its line is ordered, a system that keeps those limits cannot end its
        k-th run less than k times that after the first start."""

        def work(queues: set[str]) -> float:
            return sum(ms for step, ms in sleeps.items() if self.queues[step] in queues)

        needs = {f"worker {queues}": work(set(queues.split(","))) / pool for queues, pool in self.pools().items()}
        if keeps_types:
            needs |= {f"type {queue}": work({queue}) / concurrency for queue, concurrency in self.concurrency.items()}
        name = max(needs, key=lambda k: needs[k])
        return name, needs[name] / 1000

    @classmethod
    def per_step(cls) -> Layout:
        # Named in the pipeline's order: see TYPE_ORDER.
        queues = {step: f"burst_{i}_{step}" for i, step in enumerate(CONCURRENCY, 1)}
        return cls(queues, {queues[step]: c for step, c in CONCURRENCY.items()})

    @classmethod
    def shared(cls, concurrency: int) -> Layout:
        return cls(dict.fromkeys(CONCURRENCY, "burst_all"), {"burst_all": concurrency})

    @classmethod
    def grouped(cls) -> Layout:
        """Steps on the event type of the service they call: intake, llm and image each on its own as
        per_step, but upload and both publishes on the one marketplace's, of concurrency 1, which is
        then the slowest; a worker for each type."""
        queues = {"intake": "burst_1_intake", "llm": "burst_2_llm", "image": "burst_3_image"}
        queues |= dict.fromkeys(("upload", "publish_a", "publish_b"), "burst_4_marketplace")
        concurrency = {"burst_1_intake": 4, "burst_2_llm": 2, "burst_3_image": 2, "burst_4_marketplace": 1}
        return cls(queues, concurrency)

    @classmethod
    def marketplace(cls) -> Layout:
        """Steps on the event type of the service they call: intake, upload and both publishes on the
        marketplace's API, one quota of 2 at once for reads and writes, the slowest line; llm and image
        on the model provider's, of 4; a worker for each type."""
        queues = dict.fromkeys(("intake", "upload", "publish_a", "publish_b"), "burst_1_marketplace")
        queues |= dict.fromkeys(("llm", "image"), "burst_2_models")
        return cls(queues, {"burst_1_marketplace": 2, "burst_2_models": 4})

    @classmethod
    def pooled(cls, concurrency: int) -> Layout:
        """Each step on its own queue and event type of its concurrency, as per_step, but one worker of
        `concurrency` processes consumes them all: a worker per host serving every queue."""
        per_step = cls.per_step()
        return cls(per_step.queues, per_step.concurrency, {",".join(per_step.concurrency): concurrency})


@dataclass
class Burst:
    """One system's burst: each run's start and end (epoch seconds), in the order started."""

    spans: list[tuple[float, float]]

    @property
    def latencies(self) -> list[float]:
        return [end - start for start, end in self.spans]

    @property
    def total(self) -> float:
        return max(end for _, end in self.spans) - min(start for start, _ in self.spans)

    @property
    def spread(self) -> float:
        """From the first start to the last."""
        return max(start for start, _ in self.spans) - min(start for start, _ in self.spans)

    @property
    def first_end(self) -> float:
        return min(end for _, end in self.spans) - min(start for start, _ in self.spans)

    def figures(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {
            "median s": statistics.median(ordered),
            "p95 s": ordered[int(0.95 * (len(ordered) - 1))],
            "first end s": self.first_end,
            "total s": self.total,
            "runs/s": len(self.spans) / self.total,
        }


def define_workflow(layout: Layout) -> Any:
    from workflows_app.definitions import workflow_definition_save

    return workflow_definition_save(
        data={
            "name": "bench_burst",
            "event_types": {queue: {"concurrency": c} for queue, c in layout.concurrency.items()},
            "nodes": [
                {"key": step, "task": f"bench.burst_{step}", "event_type": layout.queues[step]} for step in CONCURRENCY
            ],
            "edges": [list(edge) for edge in EDGES],
        },
        known_tasks={f"bench.burst_{step}" for step in CONCURRENCY},
    )


def eventflow_burst(workflow: Any, count: int, batch: int) -> Burst:
    """Start `count` runs, `batch` per transaction, as fast as one process can; wait for all to end."""
    from django.db import transaction

    from workflows_app import engine
    from workflows_app.models import WorkflowRun

    ids = []
    for first in range(0, count, batch):
        with transaction.atomic():
            for _ in range(min(batch, count - first)):
                ids.append(engine.workflow_run_start(workflow=workflow, payload={}, source="bench")[0].pk)
    runs = WorkflowRun.objects.filter(pk__in=ids)
    wait_for(
        lambda: runs.filter(finished_at__isnull=False).count() == count,
        timeout=300 + count,
        interval=0.2,
        what=f"{count} Eventflow runs",
    )
    assert not runs.exclude(status=WorkflowRun.Status.SUCCESS).exists()
    return Burst([(c.timestamp(), f.timestamp()) for c, f in runs.values_list("created_at", "finished_at")])


def canvas_burst(layout: Layout, count: int) -> Burst:
    """Send `count` canvases as fast as one process can; wait for both publish results of each."""
    from celery import chain, group
    from django_celery_results.models import TaskResult

    from bench.tasks import BURST_TASKS

    def sig(step: str) -> Any:
        return BURST_TASKS[step].s().set(queue=layout.queues[step])

    starts, ends = [], []
    for _ in range(count):
        canvas = chain(
            sig("intake"), group(sig("llm"), sig("image")), sig("upload"), group(sig("publish_a"), sig("publish_b"))
        )
        starts.append(time.time())
        result = canvas.apply_async()
        ends.append([r.id for r in result.results])
    wanted = [task_id for pair in ends for task_id in pair]
    done = TaskResult.objects.filter(task_id__in=wanted, status="SUCCESS")
    wait_for(lambda: done.count() == len(wanted), timeout=300 + count, interval=0.2, what=f"{count} canvases")
    at = {task_id: d.timestamp() for task_id, d in done.values_list("task_id", "date_done")}
    return Burst([(start, max(at[a], at[b])) for start, (a, b) in zip(starts, ends, strict=True)])


def load_average() -> str:
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


LAYOUTS = ["shared", "marketplace", "per-step", "pooled", "grouped"]


def layout_named(name: str, pool: int) -> Layout:
    return {
        "per-step": Layout.per_step,
        "shared": lambda: Layout.shared(pool),
        "pooled": lambda: Layout.pooled(pool),
        "grouped": Layout.grouped,
        "marketplace": Layout.marketplace,
    }[name]()


def median_bound(burst: Burst, per_run: float) -> float:
    """No run order ends the median run of `burst` sooner: its k-th run to end does so at least k times
    the bottleneck's time per run after the first start, and that run started at most the spread
    after the first start; the median is the mean of the middle two."""
    count = len(burst.spans)
    return max(0.0, (count // 2 + 0.5) * per_run - burst.spread)


def run_layout(name: str, args: argparse.Namespace, sleeps: dict[str, int], log_dir: Path) -> dict[str, Any]:
    """The rounds of one layout, each system taking its turn; its figures, printed as they come."""
    import redis
    from run import as_autovacuum_would

    layout = layout_named(name, args.shared_concurrency)
    print(f"\nlayout {name}: event types {layout.concurrency}, workers {layout.pools()}", flush=True)
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()  # the bench's own Redis database: messages left by an interrupted run
    workflow = define_workflow(layout)
    env = bench_env(BENCH_BURST_MS=",".join(f"{step}={ms}" for step, ms in sleeps.items()))
    workers = [
        Worker(f"burst-{name}-{i}", queue=queue, concurrency=c, log_dir=log_dir, env=env)
        for i, (queue, c) in enumerate(layout.pools().items())
    ]
    workers.append(Worker(f"burst-{name}-engine", queue="celery", concurrency=1, log_dir=log_dir, env=env))
    systems = {
        EVENTFLOW: lambda n: eventflow_burst(workflow, n, args.batch),
        CANVAS: lambda n: canvas_burst(layout, n),
    }
    bursts: dict[str, list[Burst]] = {system: [] for system in systems}
    rows = []
    try:
        for worker in workers:
            worker.wait_ready()
        for run in systems.values():
            run(20)  # warm every side: imports, connections, caches
        names = list(systems)
        for i in range(args.rounds):
            for system in names[i % 2 :] + names[: i % 2]:
                as_autovacuum_would()
                before = load_average()
                burst = systems[system](args.runs)
                bursts[system].append(burst)
                figures = burst.figures()
                rows.append(
                    [name, str(i + 1), system, *(f"{v:.2f}" for v in figures.values()), f"{before} / {load_average()}"]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
    finally:
        for worker in workers:
            worker.stop()
        broker.flushdb()
    return {"layout": layout, "rows": rows, "bursts": bursts}


def ratios(outcome: dict[str, Any], measure: str) -> list[float]:
    pairs = zip(outcome["bursts"][EVENTFLOW], outcome["bursts"][CANVAS], strict=True)
    return [e.figures()[measure] / c.figures()[measure] for e, c in pairs]


def main() -> None:
    from run import autovacuum_is_off

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="runs started at once")
    parser.add_argument("--rounds", type=int, default=3, help="bursts of each system, taking turns")
    parser.add_argument("--batch", type=int, default=10, help="Eventflow runs started per transaction")
    parser.add_argument(
        "--layout",
        nargs="+",
        choices=LAYOUTS,
        default=["shared", "marketplace", "per-step"],
        help="one or more, in turn",
    )
    parser.add_argument(
        "--shared-concurrency", type=int, default=6, help="the one worker's pool (--layout shared or pooled)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step's sleep")
    args = parser.parse_args()
    sleeps = {step: round(ms * args.scale) for step, ms in SLEEP_MS.items()}

    os.environ["CELERY_BROKER_URL"] = BROKER_URL
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    setup_django(DB_NAME)

    log_dir = Path(tempfile.mkdtemp(prefix="eventflow-burst-"))
    print(f"database {DB_NAME}, broker {BROKER_URL}, logs in {log_dir}", flush=True)
    print(f"{args.runs} runs a burst; sleeps ms {sleeps}", flush=True)
    if autovacuum_is_off():
        print("PostgreSQL's autovacuum is off here: each burst starts with VACUUM ANALYZE, as it would", flush=True)
    outcomes = {name: run_layout(name, args, sleeps, log_dir) for name in args.layout}

    measures = list(Burst([(0.0, 1.0)]).figures())
    print()
    print_table(
        ["layout", "round", "system", *measures, "load average before / after"],
        [row for outcome in outcomes.values() for row in outcome["rows"]],
    )
    print()
    targets = {"median s": "<= 0.6", "runs/s": ">= 0.9"}
    rows = []
    for name, outcome in outcomes.items():
        for measure in measures:
            by_round = ratios(outcome, measure)
            rows.append(
                [
                    name,
                    measure,
                    *(
                        f"{statistics.median(b.figures()[measure] for b in outcome['bursts'][system]):.2f}"
                        for system in (EVENTFLOW, CANVAS)
                    ),
                    ", ".join(f"{r:.2f}" for r in by_round),
                    f"{statistics.median(by_round):.2f}",
                    targets.get(measure, ""),
                ]
            )
    print_table(
        ["layout", "measure", "Eventflow, median of rounds", "canvas, median of rounds", "by round", "median", "goal"],
        rows,
    )
    print()
    rows = []
    for name, outcome in outcomes.items():
        eventflow, canvas = outcome["bursts"][EVENTFLOW], outcome["bursts"][CANVAS]
        bottleneck, per_run = outcome["layout"].bottleneck(sleeps, keeps_types=True)
        _, canvas_per_run = outcome["layout"].bottleneck(sleeps, keeps_types=False)
        bounds = [median_bound(b, per_run) for b in eventflow]
        canvas_bounds = [median_bound(b, canvas_per_run) for b in canvas]
        floor = [bound / c.figures()["median s"] for bound, c in zip(bounds, canvas, strict=True)]
        median_ratio = statistics.median(ratios(outcome, "median s"))
        in_order = [
            statistics.median(b.figures()["median s"] / b.figures()["total s"] for b in bursts)
            for bursts in (eventflow, canvas)
        ]
        runs_ratio = statistics.median(ratios(outcome, "runs/s"))
        rows.append(
            [
                name,
                f"{bottleneck}, {per_run * 1000:.1f} ms a run",
                f"{statistics.median(bounds):.2f}",
                f"{statistics.median(canvas_bounds):.2f}",
                f"{statistics.median(floor):.2f}",
                f"{in_order[0]:.2f}",
                f"{in_order[1]:.2f}",
                f"{median_ratio:.2f}",
                f"{runs_ratio:.2f}",
                "met" if median_ratio <= 0.6 and runs_ratio >= 0.9 else "not met",
            ]
        )
    print_table(
        [
            "layout",
            "Eventflow's bottleneck",
            "lowest median any order gives, s",
            "canvas's lowest, s",
            "lowest median ratio reachable",
            "Eventflow's median / total",
            "canvas's",
            "median ratio",
            "runs/s ratio",
            "median <= 0.6, runs/s >= 0.9",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
