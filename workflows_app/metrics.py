"""`GET /metrics`: Prometheus metrics read from the database at scrape time, the same from every process.

Why the database and not counters in memory (or prometheus_client's multiprocess mode): runs move
on many worker hosts and are triggered through many web processes, and both restart. Counters kept
in a process are lost with it and describe only what that process saw; the multiprocess mode shares
files between the processes of one host only. The task and run rows already hold every number, so
`EventflowCollector` asks PostgreSQL on each scrape, and any web process answers for the cluster.

What each scrape costs (four statements, whatever the number of runs stored):

- `eventflow_runs_total` counts the run table grouped by (workflow, status), a scan of the table or
  of its (workflow, status) index; `eventflow_runs_running` comes from the same statement.
- `eventflow_tasks_total` counts finished task rows grouped by (event type, status). No index holds
  both columns, so it scans the task table. These two grow with the history kept (bench/metrics.py
  times each part; `purge_runs` bounds the history). Constant cost needs counts kept by the engine
  in the statements that end tasks and runs, which this module may not add.
- The gauges are the queue page's own selector (`selectors.event_type_queue_list`), which counts
  occupied slots and the waiting line through their partial indexes.
- The histograms cannot be cumulative over all history at a bounded cost: that would read every
  finished task row on every scrape. They describe instead the task attempts that finished within
  the last `EVENTFLOW_METRICS_WINDOW_SECONDS` (default 300), read through the partial index of
  finished tasks by (event type, finished_at), so their cost follows the recent throughput, not the
  stored history. Their buckets therefore go down as attempts leave the window: read them with
  `histogram_quantile` over the buckets themselves, not over `rate()` (docs/grafana-dashboard.json).

Limits of reading rows: a counter goes down when `purge_runs` deletes runs (Prometheus takes that
as a reset), and a task row keeps only its latest attempt, so an attempt that failed and was retried
is not in the duration histogram, and the wait of a retried attempt is unknown (the row keeps when
the task first became ready): the wait histogram counts first attempts only.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models.functions import Now
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import selectors
from .models import TaskRun, WorkflowDefinition, WorkflowRun

# Upper bounds of the buckets, in seconds: from a no-op task's few milliseconds to an hour's wait.
BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

RUN_FINAL = [str(s) for s in WorkflowRun.FINAL]
TASK_FINAL = [str(s) for s in TaskRun.FINAL]
_QUEUE_FIELDS = ("name", "concurrency", "running", "queued", "oldest_queued_at", "now")


def _runs_by_status() -> list[tuple[str, str, int]]:
    """(workflow, status, runs) for every pair with runs; grouped on the index before the join."""
    sql = f"""
        SELECT w.name, c.status, c.n
        FROM (SELECT workflow_id, status, count(*) AS n FROM {WorkflowRun._meta.db_table}
              GROUP BY workflow_id, status) AS c
        JOIN {WorkflowDefinition._meta.db_table} AS w ON w.id = c.workflow_id
    """
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _tasks_by_status() -> list[tuple[str | None, str, int]]:
    """(event type, final status, tasks): nodes that run no task (approvals, delays) have no type."""
    sql = f"""
        SELECT event_type_id, status, count(*) FROM {TaskRun._meta.db_table}
        WHERE status = ANY(%s) GROUP BY event_type_id, status
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [TASK_FINAL])
        return cursor.fetchall()


def _histogram_sql() -> str:
    """One pass over the window's rows giving, per event type, the cumulative bucket counts, the count
    and the sum of both the run time and the wait (the bounds are this module's constants)."""

    def columns(value: str) -> str:
        buckets = ", ".join(f"count(*) FILTER (WHERE {value} <= {bound!r})" for bound in BUCKETS)
        return f"{buckets}, count({value}), coalesce(sum({value}), 0)"

    task = TaskRun._meta.db_table
    return f"""
        WITH recent AS (
            -- Attempts that ended in the window: what the partial index of finished tasks serves.
            SELECT event_type_id,
                   extract(epoch FROM finished_at - started_at)::float8 AS ran,
                   CASE WHEN attempts = 1 THEN extract(epoch FROM started_at - queued_at)::float8 END AS waited
            FROM {task}
            WHERE event_type_id = ANY(%(types)s) AND status IN ('{TaskRun.Status.SUCCESS}', '{TaskRun.Status.FAILURE}')
              AND finished_at >= now() - make_interval(secs => %(window)s) AND started_at IS NOT NULL
            UNION ALL
            -- Attempts running now have waited already: the partial index of occupied slots.
            SELECT event_type_id, NULL,
                   CASE WHEN attempts = 1 THEN extract(epoch FROM started_at - queued_at)::float8 END
            FROM {task}
            WHERE holds_slot AND status = '{TaskRun.Status.STARTED}' AND started_at IS NOT NULL
        )
        SELECT event_type_id, {columns("ran")}, {columns("waited")}
        FROM recent GROUP BY event_type_id
    """


def _histograms(types: list[str], window: float) -> list[tuple[Any, ...]]:
    if not types:
        return []
    with connection.cursor() as cursor:
        cursor.execute(_histogram_sql(), {"types": types, "window": window})
        return cursor.fetchall()


def _add_histogram(family: HistogramMetricFamily, event_type: str, row: Iterable[Any]) -> None:
    values = list(row)
    counts, total, total_sum = values[: len(BUCKETS)], values[-2], values[-1]
    buckets = [(repr(bound), count) for bound, count in zip(BUCKETS, counts, strict=True)]
    family.add_metric([event_type], buckets + [("+Inf", total)], float(total_sum))


class EventflowCollector(Collector):
    """Every Eventflow metric, read from the database when collected (see the module's docstring)."""

    def describe(self) -> list[Metric]:
        # Nothing to describe ahead: registering must not query the database.
        return []

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "eventflow_runs", "Runs ended, by workflow and final status.", labels=["workflow", "status"]
        )
        running_runs = GaugeMetricFamily(
            "eventflow_runs_running", "Runs not ended yet, by workflow.", labels=["workflow"]
        )
        for workflow, status, n in _runs_by_status():
            if status in RUN_FINAL:
                runs.add_metric([workflow, status], n)
            elif status == WorkflowRun.Status.RUNNING:
                running_runs.add_metric([workflow], n)
        yield runs
        yield running_runs

        tasks = CounterMetricFamily(
            "eventflow_tasks",
            "Task runs ended, by event type and final status (an empty event type: nodes that run no task).",
            labels=["event_type", "status"],
        )
        for event_type, status, n in _tasks_by_status():
            tasks.add_metric([event_type or "", status], n)
        yield tasks

        gauges = {
            "running": GaugeMetricFamily(
                "eventflow_event_type_running",
                "Tasks of the event type holding a slot: handed to Celery and not finished.",
                labels=["event_type"],
            ),
            "queued": GaugeMetricFamily(
                "eventflow_event_type_queued",
                "Tasks of the event type waiting in its line for a slot.",
                labels=["event_type"],
            ),
            "concurrency": GaugeMetricFamily(
                "eventflow_event_type_concurrency",
                "Most tasks of the event type that may run at once, cluster-wide.",
                labels=["event_type"],
            ),
        }
        oldest = GaugeMetricFamily(
            "eventflow_oldest_queued_seconds",
            "Seconds the head of the event type's line has waited, on the database's clock (0: none waits).",
            labels=["event_type"],
        )
        types = list(selectors.event_type_queue_list().annotate(now=Now()).values(*_QUEUE_FIELDS))
        for row in types:
            name = row["name"]
            gauges["running"].add_metric([name], row["running"] or 0)
            gauges["queued"].add_metric([name], row["queued"] or 0)
            gauges["concurrency"].add_metric([name], row["concurrency"])
            since = row["oldest_queued_at"]
            oldest.add_metric([name], max((row["now"] - since).total_seconds(), 0.0) if since else 0.0)
        yield from gauges.values()
        yield oldest

        window = settings.EVENTFLOW["METRICS_WINDOW_SECONDS"]
        about = f"of task attempts that ended in the last {window:g} s (a window: buckets go down as attempts leave it)"
        duration = HistogramMetricFamily(
            "eventflow_task_duration_seconds",
            f"Run time, started to success or failure, {about}.",
            labels=["event_type"],
        )
        wait = HistogramMetricFamily(
            "eventflow_task_wait_seconds",
            f"Wait, ready to started, of first attempts running now or {about}.",
            labels=["event_type"],
        )
        for event_type, *values in _histograms([row["name"] for row in types], window):
            middle = len(BUCKETS) + 2
            _add_histogram(duration, event_type, values[:middle])
            _add_histogram(wait, event_type, values[middle:])
        yield duration
        yield wait


# One registry per process holding only this collector: the numbers are the cluster's, so the
# process's own (prometheus_client's default process and platform collectors) stay out.
registry = CollectorRegistry(auto_describe=False)
registry.register(EventflowCollector())


def _authorized(request: HttpRequest) -> bool:
    """True when no token is configured, or the request carries it as a Bearer token (compared in
    constant time, so response times do not reveal how much of a guess was right)."""
    token = settings.EVENTFLOW["METRICS_TOKEN"]
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics in the text format the scraper asks for (Prometheus' or OpenMetrics)."""
    if not _authorized(request):
        response = HttpResponse(
            "401 Unauthorized: a Bearer token is required.\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry), content_type=content_type)
