"""`GET /metrics`: Prometheus metrics read from the database at scrape time, the same from every process.

Why the database and not counters in memory (or prometheus_client's multiprocess mode): runs move
on many worker hosts and are triggered through many web processes, and both restart. Counters kept
in a process are lost with it and describe only what that process saw; the multiprocess mode shares
files between the processes of one host only. The task and run rows already hold every number, so
`EventflowCollector` asks PostgreSQL on each scrape, and any web process answers for the cluster.

What each scrape costs (four statements, whatever the number of runs stored):

- `eventflow_runs_total` and `eventflow_tasks_total` count the runs and tasks that ended: those that
  ended before a watermark are counted once into `MetricsRollup` (moved on at most once a minute, to
  five minutes ago, by one scrape; far longer ago than any transition's transaction lasts, since a
  row's end time is its transaction's start), and each scrape adds those that ended since, read
  through the indexes of ended runs and of ended tasks by (event type, time). So a scrape's cost
  follows the recent throughput, not the history stored, and the counters count endings: `purge_runs`
  does not make them drop, and a run retried after failing counts its failure and its new end.
  `eventflow_runs_running` comes from the same statement, through the index of runs by status.
- The gauges are the queue page's own selector (`selectors.event_type_queue_list`), which counts
  occupied slots and the waiting line through their partial indexes.
- The histograms cannot be cumulative over all history at a bounded cost: that would read every
  finished task row on every scrape. They describe instead the task attempts that finished within
  the last `EVENTFLOW_METRICS_WINDOW_SECONDS` (default 300), read through the partial index of
  finished tasks by (event type, finished_at), so their cost follows the recent throughput, not the
  stored history. Their buckets therefore go down as attempts leave the window: read them with
  `histogram_quantile` over the buckets themselves, not over `rate()` (docs/grafana-dashboard.json).

Limits of reading rows: a task row keeps only its latest attempt, so an attempt that failed and was retried
is not in the duration histogram, and the wait of a retried attempt is unknown (the row keeps when
the task first became ready): the wait histogram counts first attempts only.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
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

from events_app.models import EventType

from . import selectors
from .models import MetricsRollup, MetricsWatermark, TaskRun, WorkflowDefinition, WorkflowRun

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


# Runs and tasks that ended longer ago than this are counted once into `MetricsRollup`; those since,
# on every scrape. Far longer than any transition's transaction, whose end time is its start's.
ROLLUP_LAG = timedelta(minutes=5)
# The rollup moves on when it is at least this far behind: a scrape in a minute does it once.
ROLLUP_STEP = timedelta(minutes=1)
_ROLLUP_LOCK = 0x6576656E74666C6F  # any fixed key: one scrape rolls up at a time


def _roll_up() -> None:
    """Count the runs and tasks that ended between the watermark and `ROLLUP_LAG` ago into the rollup,
    and move the watermark there; at most once a `ROLLUP_STEP`, by one scrape at a time (the others
    do not wait: they read the rollup as it is, and count a little more themselves)."""
    rollup, mark = MetricsRollup._meta.db_table, MetricsWatermark._meta.db_table
    run, workflow, task = WorkflowRun._meta.db_table, WorkflowDefinition._meta.db_table, TaskRun._meta.db_table
    types = _type_names()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT pg_try_advisory_xact_lock(%s), (SELECT until FROM {mark} WHERE id = 1), now() - %s, now() - %s
            """,
            [_ROLLUP_LOCK, ROLLUP_LAG, ROLLUP_LAG + ROLLUP_STEP],
        )
        locked, until, new, due = cursor.fetchone()
        if not locked or (until is not None and until > due):
            return
        since = until or datetime.min.replace(tzinfo=UTC)
        cursor.execute(
            f"""
            WITH ended AS (
                SELECT 'run' AS kind, w.name AS label, r.status, count(*) AS n
                FROM {run} AS r JOIN {workflow} AS w ON w.id = r.workflow_id
                WHERE r.finished_at > %(since)s AND r.finished_at <= %(new)s AND r.status = ANY(%(runs)s)
                GROUP BY w.name, r.status
                UNION ALL
                SELECT 'task', coalesce(t.event_type_id, ''), t.status, count(*) FROM {task} AS t
                WHERE (t.event_type_id = ANY(%(types)s) OR t.event_type_id IS NULL) AND t.status = ANY(%(tasks)s)
                  AND t.finished_at > %(since)s AND t.finished_at <= %(new)s
                GROUP BY t.event_type_id, t.status
            ), added AS (
                INSERT INTO {rollup} (kind, label, status, count) SELECT kind, label, status, n FROM ended
                ON CONFLICT (kind, label, status) DO UPDATE SET count = {rollup}.count + EXCLUDED.count
            )
            INSERT INTO {mark} (id, until) VALUES (1, %(new)s) ON CONFLICT (id) DO UPDATE SET until = EXCLUDED.until
            """,
            {"since": since, "new": new, "runs": RUN_FINAL, "tasks": TASK_FINAL, "types": types},
        )


def _type_names() -> list[str]:
    return list(EventType.objects.values_list("name", flat=True))


def _ended_counts(types: list[str]) -> tuple[list[tuple[str, str, str, int]], bool]:
    """(kind, workflow or event type, status, count) of every run and task that ended, from the rollup
    and what ended after its watermark (through the indexes of ended runs and tasks by time), and
    the runs still running; and whether the rollup is due to move on. One statement."""
    rollup, mark = MetricsRollup._meta.db_table, MetricsWatermark._meta.db_table
    run, workflow, task = WorkflowRun._meta.db_table, WorkflowDefinition._meta.db_table, TaskRun._meta.db_table
    sql = f"""
        WITH mark AS (SELECT coalesce((SELECT until FROM {mark} WHERE id = 1), '-infinity'::timestamptz) AS until),
        counts AS (
            SELECT kind, label, status, count AS n FROM {rollup}
            UNION ALL
            SELECT 'run', w.name, r.status, count(*) FROM {run} AS r JOIN {workflow} AS w ON w.id = r.workflow_id
            WHERE r.finished_at > (SELECT until FROM mark) AND r.status = ANY(%(runs)s) GROUP BY w.name, r.status
            UNION ALL
            SELECT 'task', coalesce(t.event_type_id, ''), t.status, count(*) FROM {task} AS t
            WHERE (t.event_type_id = ANY(%(types)s) OR t.event_type_id IS NULL) AND t.status = ANY(%(tasks)s)
              AND t.finished_at > (SELECT until FROM mark)
            GROUP BY t.event_type_id, t.status
            UNION ALL
            SELECT 'running', w.name, r.status, count(*) FROM {run} AS r JOIN {workflow} AS w ON w.id = r.workflow_id
            WHERE r.status = %(running)s GROUP BY w.name, r.status
        )
        SELECT kind, label, status, sum(n)::bigint, (SELECT until FROM mark) < now() - %(due)s
        FROM counts GROUP BY kind, label, status
        UNION ALL SELECT 'due', '', '', 0, (SELECT until FROM mark) < now() - %(due)s
    """
    params = {
        "runs": RUN_FINAL,
        "tasks": TASK_FINAL,
        "types": types,
        "running": WorkflowRun.Status.RUNNING,
        "due": ROLLUP_LAG + ROLLUP_STEP,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [row[:4] for row in rows if row[0] != "due"], any(row[4] for row in rows)


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
        types = list(selectors.event_type_queue_list().annotate(now=Now()).values(*_QUEUE_FIELDS))
        runs = CounterMetricFamily(
            "eventflow_runs", "Runs ended, by workflow and final status.", labels=["workflow", "status"]
        )
        running_runs = GaugeMetricFamily(
            "eventflow_runs_running", "Runs not ended yet, by workflow.", labels=["workflow"]
        )
        tasks = CounterMetricFamily(
            "eventflow_tasks",
            "Task runs ended, by event type and final status (an empty event type: nodes that run no task).",
            labels=["event_type", "status"],
        )
        counted, due = _ended_counts([row["name"] for row in types])
        for kind, label, status, n in sorted(counted):
            if kind == "run":
                runs.add_metric([label, status], n)
            elif kind == "running":
                running_runs.add_metric([label], n)
            else:
                tasks.add_metric([label, status], n)
        yield runs
        yield running_runs
        yield tasks
        if due:  # counted already: the next scrapes read the moved watermark, and count less themselves
            _roll_up()

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
