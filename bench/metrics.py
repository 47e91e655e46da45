"""Time of a /metrics scrape and its query count with 100,000 runs stored: run `python bench/metrics.py`."""

# Stores 100,000 finished and running runs of two workflows, each with three task rows of three
# event types (300,000 task rows: successes, failures, skipped and upstream-failed tasks finished
# over 30 days), a recent window's attempts, a line of queued tasks and some holding slots, as a
# busy cluster would have. Then scrapes GET /metrics through Django's test client (routing,
# middleware, the collector, the exposition) many times, and times each of the collector's
# statements alone. Nothing is published: no broker or worker is needed.

from __future__ import annotations

import argparse
import os
import statistics
import time

from _setup import print_table, setup_django, summary

TYPES = ("bench_m_a", "bench_m_b", "bench_m_c")


def build(*, runs: int, recent: int, queued: int) -> None:
    """`runs` runs with three tasks each, `recent` of those tasks ended in the last 5 minutes, and a
    line of `queued` tasks behind 5 running ones on the first event type."""
    from datetime import timedelta

    from django.db import connection

    from tests import factories
    from tests.test_pages import runs_bulk_insert
    from workflows_app.models import TaskRun, WorkflowDefinition, WorkflowRun

    nodes = [{"key": k, "task": "workflows_app.tasks.echo", "event_type": t} for k, t in zip("abc", TYPES, strict=True)]
    for name in ("bench_metrics_one", "bench_metrics_two"):
        factories.workflow(
            factories.spec(name, nodes, [["a", "b"], ["b", "c"]], event_types={t: {"concurrency": 5} for t in TYPES})
        )
    started = time.perf_counter()
    one, two = (
        WorkflowDefinition.objects.get(name="bench_metrics_one"),
        WorkflowDefinition.objects.get(name="bench_metrics_two"),
    )
    runs_bulk_insert(one, runs * 4 // 5, spread=timedelta(days=30))
    runs_bulk_insert(two, runs - runs * 4 // 5, spread=timedelta(days=30))
    task, run = TaskRun._meta.db_table, WorkflowRun._meta.db_table
    with connection.cursor() as cursor:
        # Three tasks per run, ended as their run did: a failed run's b failed and its c never ran; a
        # canceled run's c was revoked; a running run's c waits. Each ran a few seconds after a wait.
        cursor.execute(
            f"""
            INSERT INTO {task} (run_id, node_key, event_type_id, task_name, status, attempts, holds_slot,
                                error, worker, queued_at, started_at, finished_at)
            SELECT r.trace_id, n.key, n.type, 'workflows_app.tasks.echo', s.status,
                   CASE WHEN s.status IN ('SUCCESS', 'FAILURE') THEN 1 ELSE 0 END, false, '', '',
                   r.created_at, s.started, CASE WHEN s.status = 'WAITING' THEN NULL ELSE s.started + s.ran END
            FROM {run} r
            CROSS JOIN (VALUES ('a', %s, 1), ('b', %s, 2), ('c', %s, 3)) AS n(key, type, place)
            CROSS JOIN LATERAL (SELECT
                CASE
                    WHEN r.status = 'SUCCESS' OR n.place = 1 THEN 'SUCCESS'
                    WHEN r.status = 'FAILED' THEN (ARRAY['FAILURE', 'UPSTREAM_FAILED'])[n.place - 1]
                    WHEN r.status = 'CANCELED' THEN (ARRAY['SUCCESS', 'REVOKED'])[n.place - 1]
                    ELSE (ARRAY['SUCCESS', 'WAITING'])[n.place - 1]
                END AS status,
                r.created_at + make_interval(secs => n.place * 3) AS started,
                make_interval(secs => (hashtext(r.trace_id::text || n.key) & 1023) / 100.0) AS ran
            ) AS s
            """,
            list(TYPES),
        )
        # Attempts that ended in the last five minutes: what the histograms read.
        cursor.execute(
            f"""
            UPDATE {task} SET finished_at = now() - make_interval(secs => (id %% 290)),
                started_at = now() - make_interval(secs => (id %% 290) + (id %% 7)),
                queued_at = now() - make_interval(secs => (id %% 290) + (id %% 7) + (id %% 3))
            WHERE id IN (SELECT id FROM {task} WHERE status IN ('SUCCESS', 'FAILURE') ORDER BY id DESC LIMIT %s)
            """,
            [recent],
        )
        # A line on the first type: 5 running, `queued` waiting, ready over the last ten minutes.
        cursor.execute(
            f"""
            WITH waiting AS (
                SELECT id, row_number() OVER (ORDER BY id) AS i FROM {task}
                WHERE status = 'WAITING' ORDER BY id LIMIT %s
            )
            UPDATE {task} t SET event_type_id = %s,
                status = CASE WHEN w.i <= 5 THEN 'STARTED' ELSE 'QUEUED' END,
                holds_slot = w.i <= 5, attempts = CASE WHEN w.i <= 5 THEN 1 ELSE 0 END,
                queued_at = now() - make_interval(secs => 600 - w.i * 600.0 / %s),
                started_at = CASE WHEN w.i <= 5 THEN now() - interval '1 second' END
            FROM waiting w WHERE t.id = w.id
            """,
            [queued + 5, TYPES[0], queued + 5],
        )
        cursor.execute("VACUUM ANALYZE")
        cursor.execute(f"SELECT count(*) FROM {task}")
        tasks = cursor.fetchone()[0]
    print(f"stored {runs:,} runs and {tasks:,} task rows in {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--recent", type=int, default=3_000, help="task attempts ended in the histograms' window")
    parser.add_argument("--queued", type=int, default=1_000, help="tasks waiting in one event type's line")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    os.environ["CELERY_BROKER_URL"] = "memory://"
    setup_django("eventflow_bench_metrics")
    from django.conf import settings
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from workflows_app import metrics, selectors

    build(runs=args.runs, recent=args.recent, queued=args.queued)
    client = Client()
    began = time.perf_counter()
    client.get("/metrics")  # the first scrape also rolls up the history ended before five minutes ago
    first = (time.perf_counter() - began) * 1000
    with CaptureQueriesContext(connection) as captured:
        response = client.get("/metrics")
    assert response.status_code == 200, response.status_code
    queries = len(captured.captured_queries)
    series = sum(1 for line in response.content.decode().splitlines() if line and not line.startswith("#"))
    for _ in range(3):
        client.get("/metrics")

    def timed(call) -> list[float]:
        samples = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            call()
            samples.append((time.perf_counter() - began) * 1000)
        return samples

    window = settings.EVENTFLOW["METRICS_WINDOW_SECONDS"]
    parts = [
        (
            f"GET /metrics, whole ({queries} queries, {series} series, {len(response.content) // 1024} KiB)",
            lambda: client.get("/metrics"),
        ),
        ("runs and tasks ended: the rollup and what ended since", lambda: metrics._ended_counts(list(TYPES))),
        ("queue gauges (selectors.event_type_queue_list)", lambda: list(selectors.event_type_queue_list().values())),
        (f"histograms over the last {window:g} s", lambda: metrics._histograms(list(TYPES), window)),
    ]
    rows = []
    for label, call in parts:
        samples = timed(call)
        median, low, high = summary(samples)
        p95 = statistics.quantiles(samples, n=20)[-1]
        rows.append([label, f"{median:.1f}", f"{p95:.1f}", f"{low:.1f}", f"{high:.1f}"])
    print(f"the first scrape, rolling up the history: {first:.0f} ms")
    print(f"{args.repeats} scrapes after 3 warm-up ones; times in ms; load {os.getloadavg()[0]:.1f}")
    print_table(["what", "median ms", "p95 ms", "min ms", "max ms"], rows)


if __name__ == "__main__":
    main()
