"""Render time and query count of each status page at scale: run `python bench/pages.py`."""

# Builds a 300-node run part-way through (successes, failures with tracebacks, retries, running,
# queued and waiting tasks, an Event per attempt), a run whose mapped node has 1,000 instances (each
# with its Event) beside a branch skipped by its condition, and 100,000 runs spread over 30 days, then times
# each page through Django's test client (URL routing, middleware, session, template), several
# times; among them the run list and the API finding one run of the 100,000 by its payload (JSON
# containment, on the GIN index). Nothing is published: runs start against an in-memory broker.

from __future__ import annotations

import argparse
import os
import time

from _setup import print_table, setup_django, summary

# Payload searches: one SKU held by a single run, and one shop of 50 (about 2% of the runs).
SKU = '{"sku": "A-1"}'
SHOP = '{"shop": 7}'
FAILED_LIST = {"workflow": "bench_list", "status": "FAILED"}


def build(*, nodes: int, runs: int, instances: int) -> dict[str, str]:
    """The data the pages read; returns the ids the page URLs need."""
    from django.db import connection

    from tests import factories
    from tests.test_pages import branching_run, layered_workflow, run_with_history, runs_bulk_insert
    from workflows_app import engine
    from workflows_app.models import WorkflowRun

    big, _ = engine.workflow_run_start(workflow=layered_workflow("bench_wide", nodes), payload={"product": "lamp"})
    run_with_history(big)
    # Most instances done, some failed, a slot's worth running and the rest waiting in line.
    shares = (("SUCCESS", 0.7), ("FAILURE", 0.05), ("STARTED", 0.1))
    statuses = [status for status, share in shares for _ in range(int(instances * share))]
    mapped = branching_run(statuses + ["QUEUED"] * (instances - len(statuses)), events=True)
    listed = factories.workflow(factories.spec("bench_list", event_type="bench_list"))
    other = factories.workflow(factories.spec("bench_other", event_type="bench_list"))
    started = time.perf_counter()
    runs_bulk_insert(listed, runs * 4 // 5)
    runs_bulk_insert(other, runs - runs * 4 // 5)
    print(f"inserted {runs:,} runs in {time.perf_counter() - started:.1f} s")
    middle = WorkflowRun.objects.order_by("-created_at", "trace_id")[runs // 2]
    with connection.cursor() as cursor:
        # A payload for each run as a shop would send it: its own SKU, one of 50 shops. One run, in the middle
        # of the table by age, has the SKU a seller asks about.
        cursor.execute(
            f"""
            UPDATE {WorkflowRun._meta.db_table} SET payload = jsonb_build_object(
                'sku', CASE WHEN trace_id = %s THEN 'A-1' ELSE 'S-' || left(trace_id::text, 13) END,
                'shop', abs(hashtext(trace_id::text)) %% 50, 'product', 'lamp')
            """,
            [middle.trace_id],
        )
        cursor.execute("ANALYZE")
    return {
        "big": str(big.trace_id),
        "mapped": str(mapped.trace_id),
        "node": "n150" if nodes > 150 else "n000",
        "cursor": f"{middle.created_at.isoformat()}_{middle.trace_id}",
        "sku_run": str(middle.trace_id),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=1_000, help="instances of the mapped node of one run")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--counts-at",
        type=int,
        default=0,
        help="then grow the table to this many runs and time the per-status counts, exact and capped",
    )
    args = parser.parse_args()

    os.environ["CELERY_BROKER_URL"] = "memory://"
    setup_django("eventflow_bench_pages")
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    ids = build(nodes=args.nodes, runs=args.runs, instances=args.instances)
    client = Client()
    client.force_login(get_user_model().objects.create_user(username="bench", password="bench-pw-123"))
    big = f"/runs/{ids['big']}/"
    mapped = f"/runs/{ids['mapped']}/"
    last_page = (args.instances + 49) // 50
    pages = [
        (f"run page, {args.nodes} nodes", big, {}),
        (f"run live fragment, {args.nodes} nodes", f"{big}live/", {}),
        ("node detail fragment", f"{big}nodes/{ids['node']}/", {"fragment": "1"}),
        (f"run page, a map of {args.instances:,}", mapped, {}),
        (f"run live fragment, a map of {args.instances:,}", f"{mapped}live/", {}),
        ("mapped node detail fragment", f"{mapped}nodes/upload/", {"fragment": "1"}),
        ("mapped node, last page", f"{mapped}nodes/upload/", {"instances": str(last_page)}),
        ("mapped node, FAILURE only", f"{mapped}nodes/upload/", {"status": "FAILURE"}),
        (f"run list, {args.runs:,} runs", "/runs/", {}),
        ("run list, workflow + FAILED", "/runs/", {"workflow": "bench_list", "status": "FAILED"}),
        ("run list, last 7 days + SUCCESS", "/runs/", {"since": "7d", "status": "SUCCESS"}),
        ("run list, page at the middle", "/runs/", {"older": ids["cursor"]}),
        (f"run list, payload finds 1 of {args.runs:,}", "/runs/", {"payload": SKU}),
        (
            "run list, payload + workflow + FAILED",
            "/runs/",
            {"payload": SHOP, "workflow": "bench_list", "status": "FAILED"},
        ),
        (f"API run list, payload finds 1 of {args.runs:,}", "/api/runs/", {"payload": SKU}),
        ("workflows", "/workflows/", {}),
        (f"workflow page, {args.nodes} nodes", "/workflows/bench_wide/", {}),
        (f"workflow page, {args.runs * 4 // 5:,} runs", "/workflows/bench_list/", {}),
        ("queues", "/queues/", {}),
        ("workers", "/workers/", {}),
    ]
    rows = []
    for label, url, params in pages:
        with CaptureQueriesContext(connection) as captured:
            response = client.get(url, params)
        assert response.status_code == 200, (url, response.status_code)
        if params.get("payload") == SKU:
            # The search finds the one run, and only it.
            assert ids["sku_run"].encode() in response.content, label
            found = (
                response.json()["count"] if url.startswith("/api/") else response.content.count(b"<tr data-trace-id=")
            )
            assert found == 1, (label, found)
        # Read now: the next request clears the connection's query log the capture reads from.
        queries = len(captured.captured_queries)
        for _ in range(3):
            client.get(url, params)
        samples, cpu = [], []
        for _ in range(args.repeats):
            began, began_cpu = time.perf_counter(), time.process_time()
            client.get(url, params)
            samples.append((time.perf_counter() - began) * 1000)
            cpu.append((time.process_time() - began_cpu) * 1000)
        median, low, high = summary(samples)
        rows.append(
            [
                label,
                str(queries),
                f"{median:.1f}",
                f"{low:.1f}",
                f"{high:.1f}",
                f"{summary(cpu)[0]:.1f}",
                f"{len(response.content) // 1024}",
            ]
        )
    # Wall time includes waiting for the CPU when other work shares the machine; the web process's
    # own CPU time does not (the database's share is in the wall time only).
    print(f"{args.repeats} requests per page after 3 warm-up requests; times in ms; load {os.getloadavg()[0]:.1f}")
    print_table(["page", "queries", "median ms", "min ms", "max ms", "median CPU ms", "KiB"], rows)
    if args.counts_at > args.runs:
        counts_compare(total=args.counts_at, grow_by=args.counts_at - args.runs, repeats=5)


def counts_compare(*, total: int, grow_by: int, repeats: int) -> None:
    """The run list's per-status counts at `total` runs: one exact aggregate against capped counts."""
    from datetime import timedelta

    from django.db import connection

    from tests.test_pages import runs_bulk_insert
    from workflows_app import selectors, views
    from workflows_app.models import WorkflowDefinition

    runs_bulk_insert(WorkflowDefinition.objects.get(name="bench_other"), grow_by, spread=timedelta(days=300))
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE workflows_app_workflowrun")
    rows = []
    for label, kwargs in (
        ("all runs", {}),
        ("one workflow", {"workflow": "bench_other"}),
        ("last 7 days", {"since": views.parse_moment("7d")}),
    ):
        for how, cap in (("exact", None), (f"capped at {views.RUN_COUNT_CAP:,}", views.RUN_COUNT_CAP)):
            samples = []
            for _ in range(repeats):
                began = time.perf_counter()
                selectors.run_status_counts(**kwargs, cap=cap)
                samples.append((time.perf_counter() - began) * 1000)
            median, low, high = summary(samples)
            rows.append([label, how, f"{median:.1f}", f"{low:.1f}", f"{high:.1f}"])
    print(f"\nper-status counts with {total:,} runs ({repeats} queries each); times in ms")
    print_table(["runs counted", "count", "median ms", "min ms", "max ms"], rows)


if __name__ == "__main__":
    main()
